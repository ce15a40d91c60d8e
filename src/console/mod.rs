//! The operator console: server-rendered HTML on its own HTTP listener (`--console-listen`),
//! with TLS when `sagad` has a certificate.
//!
//! It is an in-process client of the gRPC services: every read and every repair goes through
//! the same `SagaApi` / `AdminApi` methods `sagactl` calls, with the logged-in operator as the
//! caller, so the console follows the API's rules and leaves the same audit trail. Only what the
//! API has no call for (the inbox's groupings, search by key or input value, queue depths) is
//! read here directly.
//!
//! Security: operator tokens log in (participant tokens are refused); the session id lives in
//! an HttpOnly, SameSite=Strict cookie; every POST carries the session's CSRF token, checked in
//! one place ([`guard`]) before any handler runs; every page is sent with a Content-Security-Policy
//! that allows no inline script, and all user data is escaped by the templates (`maud`).

mod graph;
mod pages;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::SagaApi;
use crate::api::admin::AdminApi;
use crate::api::auth::{Caller, Scope, Tokens};
use crate::driver::Driver;
pub use session::Session;
use session::Sessions;

/// Largest form body accepted (a skip's output JSON is the biggest field).
const MAX_FORM_BYTES: usize = 256 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How the console is served, kept to start it again after a failure.
#[derive(Clone)]
pub struct ConsoleSettings {
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    pub tokens: Arc<Tokens>,
    pub amqp_url: String,
    pub amqp_ca: Option<String>,
}

#[derive(Clone)]
pub(crate) struct Console {
    driver: Driver,
    sagas: Arc<SagaApi>,
    admin: Arc<AdminApi>,
    tokens: Arc<Tokens>,
    sessions: Arc<Sessions>,
    secure: bool,
    amqp_url: String,
    amqp_ca: Option<String>,
    jobs: Arc<pages::Jobs>,
    /// Ends the event streams, which would otherwise hold a graceful shutdown open.
    shutdown: CancellationToken,
}

fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(pages::inbox))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/sagas", get(pages::saga_list))
        .route("/sagas/{id}", get(pages::saga_page))
        .route("/sagas/{id}/events", get(pages::saga_events))
        .route(
            "/sagas/{id}/actions/{action}",
            get(pages::action_preview).post(pages::action_apply),
        )
        .route("/search", get(pages::search))
        .route("/participants", get(pages::participants))
        .route(
            "/participants/{name}/{action}",
            post(pages::participant_action),
        )
        .route("/definitions", get(pages::definitions))
        .route("/definitions/{name}/{version}", get(pages::definition_page))
        .route(
            "/redrive",
            get(pages::redrive_form).post(pages::redrive_dry_run),
        )
        .route("/redrive/run", post(pages::redrive_run))
        .route("/redrive/{job}", get(pages::redrive_job))
        .route("/redrive/{job}/events", get(pages::redrive_events))
        .route("/assets/console.css", get(pages::css))
        .route("/assets/console.js", get(pages::js))
        .fallback(|| async { pages::error_page(StatusCode::NOT_FOUND, "no such page") })
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Authentication, CSRF and security headers for every request, before any handler.
async fn guard(State(c): State<Console>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/login" || path.starts_with("/assets/");
    let mut new_session = None;
    if !open {
        let cookie = req
            .headers()
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| session::cookie(h, session::COOKIE))
            .and_then(|id| c.sessions.get(id));
        let session = match cookie {
            Some(s) => s,
            // Without tokens the API treats every caller as an operator (and `sagad` refuses
            // such a listener off loopback); the console does the same, minus the login.
            None if c.tokens.is_empty() => {
                let (id, s) = c.sessions.open(Caller {
                    name: "anonymous".into(),
                    scope: Scope::Operator,
                });
                new_session = Some(id);
                s
            }
            None if req.method() == Method::GET => {
                return secured(Redirect::to("/login").into_response());
            }
            None => {
                return secured(pages::error_page(
                    StatusCode::UNAUTHORIZED,
                    "not logged in (or the session expired): log in and try again",
                ));
            }
        };
        if req.method() == Method::POST {
            match checked_form(req, &session).await {
                Ok(r) => req = r,
                Err(refusal) => return secured(refusal),
            }
        }
        req.extensions_mut().insert(session);
    }
    let mut resp = next.run(req).await;
    if let Some(id) = new_session
        && let Ok(v) = HeaderValue::from_str(&session::set_cookie(Some(&id), c.secure))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    secured(resp)
}

/// The request with its form body read back in, if the form carries the session's CSRF token.
async fn checked_form(req: Request, session: &Session) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            pages::error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the form is larger than {MAX_FORM_BYTES} bytes"),
            )
        })?;
    let presented = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned());
    if !presented.is_some_and(|t| session.csrf_matches(&t)) {
        return Err(pages::error_page(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong: reload the page and try again",
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

fn secured(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    settings: ConsoleSettings,
    driver: Driver,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let console = Console {
        sagas: Arc::new(SagaApi::new(driver.clone())),
        admin: Arc::new(AdminApi::new(driver.clone())),
        driver,
        tokens: settings.tokens,
        sessions: Arc::default(),
        secure: settings.tls.is_some(),
        amqp_url: settings.amqp_url,
        amqp_ca: settings.amqp_ca,
        jobs: Arc::default(),
        shutdown: shutdown.clone(),
    };
    let app = router(console);
    match settings.tls {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|e| format!("console stopped: {e}")),
        Some(tls) => serve_tls(listener, tls, app, shutdown).await,
    }
}

/// HTTPS: a TLS handshake per connection, then HTTP/1.1 or HTTP/2 as the browser chose.
async fn serve_tls(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), String> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "console accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, app, shutdown) = (acceptor.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "console TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The console's TLS configuration from the same PEM files as the gRPC listener.
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;

    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("not a PEM private key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Where the console listens, for the log line and the tests.
pub fn url(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}/", if tls { "https" } else { "http" })
}
