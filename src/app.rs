//! Start-up and shutdown: loads definitions, prepares the database, binds the gRPC listener and
//! runs the background tasks (outbox relay, reply consumer, timer sweeper) until cancelled.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::api::SagaApi;
use crate::api::admin::AdminApi;
use crate::api::auth::{Authenticator, Scope, Secret, Tokens};
use crate::breaker::CircuitSettings;
use crate::broker::{self, ConsumerSettings, RelaySettings};
use crate::clock::Clock;
use crate::config::{Settings, SettingsError, redact_url};
use crate::definition::{self, DefinitionError, Registry};
use crate::driver::Driver;
use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::saga_service_server::SagaServiceServer;
use crate::store::{Store, StoreError};
use crate::supervisor::{Policy, Readiness, Supervisor};
use crate::telemetry;
use crate::timers;

/// Largest gRPC request accepted; saga inputs are further limited by
/// [`MAX_INPUT_BYTES`](crate::api::MAX_INPUT_BYTES).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid setting {0}")]
    Settings(#[from] SettingsError),
    #[error("invalid saga definition: {0}")]
    Definition(#[from] DefinitionError),
    #[error("no saga definitions found in {0}")]
    NoDefinitions(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("AMQP: {0}")]
    Amqp(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Application {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    console_addr: SocketAddr,
    driver: Driver,
    tasks: Supervisor,
    readiness: Readiness,
    shutdown: CancellationToken,
    grace: std::time::Duration,
}

impl Application {
    /// Everything that can fail at start-up happens here, before any task runs, so that
    /// `sagad` refuses to start with a clear reason (an invalid definition names its file and
    /// line). Binding port 0 picks a free port (see [`Application::local_addr`]).
    pub async fn build(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Application, StartupError> {
        settings.validate()?;
        let defs = definition::load_dir(&settings.definitions)?;
        if defs.is_empty() {
            return Err(StartupError::NoDefinitions(
                settings.definitions.display().to_string(),
            ));
        }
        info!(database = %redact_url(&settings.database_url), "connecting to PostgreSQL");
        let tokens = Arc::new(load_tokens(&settings)?);
        let (tls, console_tls) = load_tls(&settings)?.unzip();
        let amqp_ca = broker::load_amqp_ca(&settings.amqp_url, settings.amqp_ca_file.as_deref())
            .map_err(StartupError::Amqp)?;
        let store = Store::connect(&settings.database_url, settings.db_max_connections).await?;
        store.migrate().await?;
        let registry = Arc::new(store.sync_definitions(&defs).await?);
        for d in &defs {
            info!(definition = %d.name, version = d.version, steps = d.steps.len(), "definition loaded");
        }
        let mut participants: Vec<String> = registry
            .all()
            .flat_map(|d| d.participants().map(str::to_owned))
            .collect();
        participants.sort();
        participants.dedup();
        store.register_participants(&participants).await?;
        let driver = Driver::new(store, registry)
            .with_clock(Clock::System)
            .with_circuit(CircuitSettings {
                failure_threshold: settings.circuit_failures.max(1),
                cooldown: settings.circuit_cooldown,
            });

        // Declared now so participants and clients find the queues as soon as we are up. If the
        // broker is down this only warns: the relay and consumer declare again on connect.
        match declare_topology(&settings.amqp_url, amqp_ca.as_deref(), &participants).await {
            Ok(()) => info!(participants = ?participants, "broker topology declared"),
            Err(e) => warn!(error = %e, "broker unreachable at start-up; will keep trying"),
        }

        let (listener, addr) = bind(settings.listen).await?;
        let (metrics_listener, metrics_addr) = bind(settings.metrics_listen).await?;
        let (console_listener, console_addr) = bind(settings.console_listen).await?;

        let mut tasks = Supervisor::new(
            Policy {
                window: settings.task_failure_window,
                ..Policy::default()
            },
            shutdown.clone(),
        );
        let readiness = tasks.readiness();
        tasks.spawn("start writer", {
            let (driver, shutdown) = (driver.clone(), shutdown.clone());
            move || driver.start_writer(shutdown.clone())
        });
        let metrics_listener = Rebind::new(metrics_listener, metrics_addr);
        tasks.spawn("metrics endpoint", {
            let (driver, readiness, shutdown) =
                (driver.clone(), readiness.clone(), shutdown.clone());
            move || {
                let (listener, store, metrics, readiness, shutdown) = (
                    metrics_listener.clone(),
                    driver.store().clone(),
                    driver.metrics().clone(),
                    readiness.clone(),
                    shutdown.clone(),
                );
                async move {
                    let listener = listener.get().await?;
                    crate::endpoints::serve_http(listener, store, metrics, readiness, shutdown)
                        .await;
                    Ok::<(), std::io::Error>(())
                }
            }
        });
        info!(amqp = %redact_url(&settings.amqp_url), "starting outbox relay and reply consumer");
        let relay = RelaySettings {
            amqp_url: settings.amqp_url.clone(),
            amqp_ca: amqp_ca.clone(),
            participants: participants.clone(),
            batch_size: settings.outbox_batch,
            poll_interval: settings.outbox_poll,
        };
        // Several relays overlap their confirm round trips; SKIP LOCKED shares the rows out.
        for i in 0..settings.relay_workers.max(1) {
            let (driver, relay, shutdown) = (driver.clone(), relay.clone(), shutdown.clone());
            tasks.spawn(&format!("outbox relay {i}"), move || {
                broker::run_relay(driver.clone(), relay.clone(), shutdown.clone())
            });
        }
        let console = crate::console::ConsoleSettings {
            tls: console_tls,
            tokens: tokens.clone(),
            amqp_url: settings.amqp_url.clone(),
            amqp_ca: amqp_ca.as_deref().map(str::to_owned),
        };
        info!(url = %crate::console::url(console_addr, console.tls.is_some()), "operator console");
        let console_listener = Rebind::new(console_listener, console_addr);
        tasks.spawn("console", {
            let (driver, shutdown) = (driver.clone(), shutdown.clone());
            move || {
                let (listener, console, driver, shutdown) = (
                    console_listener.clone(),
                    console.clone(),
                    driver.clone(),
                    shutdown.clone(),
                );
                async move {
                    let listener = listener
                        .get()
                        .await
                        .map_err(|e| format!("cannot listen: {e}"))?;
                    crate::console::serve(listener, console, driver, shutdown).await
                }
            }
        });
        let consumer = ConsumerSettings {
            amqp_url: settings.amqp_url.clone(),
            amqp_ca,
            participants,
            prefetch: settings.reply_prefetch,
        };
        tasks.spawn("reply consumer", {
            let (driver, shutdown) = (driver.clone(), shutdown.clone());
            move || broker::run_reply_consumer(driver.clone(), consumer.clone(), shutdown.clone())
        });
        tasks.spawn("timer sweeper", {
            let (driver, shutdown) = (driver.clone(), shutdown.clone());
            let poll = settings.timer_poll;
            move || timers::run_sweeper(driver.clone(), poll, shutdown.clone())
        });
        let (health_reporter, health) = tonic_health::server::health_reporter();
        tasks.spawn("gRPC health", {
            let (store, readiness, shutdown) =
                (driver.store().clone(), readiness.clone(), shutdown.clone());
            move || {
                report_health(
                    health_reporter.clone(),
                    store.clone(),
                    readiness.clone(),
                    shutdown.clone(),
                )
            }
        });
        let listener = Rebind::new(listener, addr);
        let grpc = GrpcSettings {
            tls,
            tokens,
            max_watches_per_token: settings.max_watches_per_token,
        };
        tasks.spawn("gRPC server", {
            let (driver, shutdown) = (driver.clone(), shutdown.clone());
            move || {
                serve(
                    listener.clone(),
                    grpc.clone(),
                    health.clone(),
                    driver.clone(),
                    shutdown.clone(),
                )
            }
        });
        info!(%addr, "sagad listening");
        Ok(Application {
            addr,
            metrics_addr,
            console_addr,
            driver,
            tasks,
            readiness,
            shutdown,
            grace: settings.shutdown_grace,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Where the operator console is served.
    pub fn console_addr(&self) -> SocketAddr {
        self.console_addr
    }

    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    pub fn store(&self) -> &Store {
        self.driver.store()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        self.driver.registry()
    }

    /// The supervised tasks' health, as `/readyz` and gRPC health report it.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Runs until the shutdown token is cancelled, then waits (at most the grace period) for
    /// the tasks to finish their in-flight work.
    pub async fn run_until_stopped(mut self) {
        self.shutdown.cancelled().await;
        info!("shutting down");
        let drained = tokio::time::timeout(self.grace, self.tasks.join_all()).await;
        if drained.is_err() {
            warn!(grace = ?self.grace, "tasks still running after the grace period; aborting them");
            self.tasks.abort_all();
        }
        self.driver.store().close().await;
        info!("stopped");
    }
}

/// Binds `addr` (port 0: a free one) and says which address it got.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartupError> {
    let bound = |source| StartupError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bound)?;
    let local = listener.local_addr().map_err(bound)?;
    Ok((listener, local))
}

async fn declare_topology(
    amqp_url: &str,
    amqp_ca: Option<&str>,
    participants: &[String],
) -> Result<(), String> {
    let attempt = async {
        let (conn, channel) = broker::open(amqp_url, amqp_ca, participants).await?;
        // Closed in order: a dropped lapin channel closes itself, racing the connection close.
        channel.close(200, "topology declared".into()).await?;
        conn.close(200, "topology declared".into()).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), attempt).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 5s".into()),
    }
}

/// Cancels `token` on SIGINT or SIGTERM; a second signal gets the default handling.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the process");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        token.cancel();
    });
}

fn load_tokens(settings: &Settings) -> Result<Tokens, StartupError> {
    let mut tokens = Tokens::default();
    if let Some(file) = &settings.tokens_file {
        tokens.load_file(file).map_err(StartupError::Auth)?;
    }
    if let Some(t) = &settings.operator_token {
        tokens
            .add("operator", Scope::Operator, Secret::new(t.clone()))
            .map_err(StartupError::Auth)?;
    }
    if let Some(t) = &settings.participant_token {
        tokens
            .add("participant", Scope::Participant, Secret::new(t.clone()))
            .map_err(StartupError::Auth)?;
    }
    if tokens.is_empty() {
        for addr in [settings.listen, settings.console_listen] {
            if !addr.ip().is_loopback() && !settings.allow_anonymous {
                return Err(StartupError::Auth(format!(
                    "no API tokens configured and {addr} is reachable from other machines; configure \
                     --tokens-file / SAGA_OPERATOR_TOKEN, or pass --allow-anonymous",
                )));
            }
        }
        warn!("AUTHENTICATION DISABLED: no API tokens configured, every caller is an operator");
    } else {
        info!(tokens = tokens.len(), "API authentication on");
    }
    Ok(tokens)
}

/// Reads and checks the gRPC listener's certificate and key, so that unreadable or mismatched
/// PEM contents stop `sagad` here, naming the file, instead of after it announced it listens.
fn load_tls(
    settings: &Settings,
) -> Result<Option<(ServerTlsConfig, Arc<tokio_rustls::rustls::ServerConfig>)>, StartupError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
        warn!(
            "TLS DISABLED: the gRPC API and the console are served in plain text (configure --tls-cert and --tls-key)"
        );
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StartupError::Tls(format!("{}: {e}", p.display())))
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            StartupError::Tls(format!(
                "{}: not a PEM certificate chain: {e}",
                cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(StartupError::Tls(format!(
            "{}: holds no PEM certificate",
            cert.display()
        )));
    }
    // Only whether it parses: the key itself is not kept, nor ever printed.
    PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| StartupError::Tls(format!("{}: not a PEM private key: {e}", key.display())))?;
    let console = crate::console::tls_config(&cert_pem, &key_pem).map_err(|e| {
        StartupError::Tls(format!(
            "{} and {}: unusable for the console: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    // Builds the server's TLS acceptor once now: this is where a certificate that does not
    // belong to the key, or one rustls cannot use, is found.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            StartupError::Tls(format!(
                "{} and {}: unusable certificate and key: {}",
                cert.display(),
                key.display(),
                error_chain(&e)
            ))
        })?;
    info!(cert = %cert.display(), "TLS on");
    Ok(Some((config, console)))
}

/// An error with its sources, which tonic's transport errors keep the useful part in.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The server span of a gRPC call, named and attributed per the OpenTelemetry RPC conventions,
/// continuing the caller's trace when it sent a `traceparent`.
fn grpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        trace_id = tracing::field::Empty,
    );
    let parent = req
        .headers()
        .get(telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    telemetry::set_parent(&span, parent);
    span.record("trace_id", telemetry::trace_id(&span));
    span
}

/// A listener bound at start-up (so the port is known, and taken, before anything runs) that a
/// restarted server binds again on the same address.
#[derive(Clone)]
struct Rebind {
    first: Arc<std::sync::Mutex<Option<TcpListener>>>,
    addr: SocketAddr,
}

impl Rebind {
    fn new(listener: TcpListener, addr: SocketAddr) -> Rebind {
        Rebind {
            first: Arc::new(std::sync::Mutex::new(Some(listener))),
            addr,
        }
    }

    async fn get(&self) -> std::io::Result<TcpListener> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        match first {
            Some(l) => Ok(l),
            None => TcpListener::bind(self.addr).await,
        }
    }
}

/// Keeps the gRPC health status in step with the database and the supervised tasks: every call
/// needs the database, and a dead task means this replica is not doing its work, so the
/// services are NOT_SERVING meanwhile (probes then route around this replica).
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    store: Store,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut serving = None;
    loop {
        let database = store.ping(std::time::Duration::from_secs(2)).await;
        let problems = readiness.problems();
        let ok = database && problems.is_empty();
        if serving != Some(ok) {
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("saga.v1.SagaService", status)
                .await;
            reporter
                .set_service_status("saga.v1.AdminService", status)
                .await;
            if serving.is_some() {
                let tasks: Vec<&str> = problems.iter().map(|(n, _)| n.as_str()).collect();
                warn!(serving = ok, database, ?tasks, "gRPC health changed");
            }
            serving = Some(ok);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// How the gRPC listener is set up, kept to start it again after a failure.
#[derive(Clone)]
struct GrpcSettings {
    tls: Option<ServerTlsConfig>,
    tokens: Arc<Tokens>,
    max_watches_per_token: usize,
}

async fn serve(
    listener: Rebind,
    GrpcSettings {
        tls,
        tokens,
        max_watches_per_token,
    }: GrpcSettings,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    driver: Driver,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let listener = listener
        .get()
        .await
        .map_err(|e| format!("cannot listen: {e}"))?;
    // Both versions of the reflection protocol: grpcurl and most tools speak v1, older ones
    // (and some current clients) only v1alpha.
    let reflecting = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = match (reflecting().build_v1(), reflecting().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => Some((v1, v1alpha)),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "server reflection unavailable");
            None
        }
    };
    let (reflection, reflection_v1alpha) = reflection.unzip();
    let sagas = SagaServiceServer::new(
        SagaApi::new(driver.clone()).with_watch_limit(max_watches_per_token),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let admin =
        AdminServiceServer::new(AdminApi::new(driver)).max_decoding_message_size(MAX_REQUEST_BYTES);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| format!("invalid TLS configuration: {e}"))?;
    }
    // Health and reflection stay open, so stock probes and tools work without a token.
    builder
        .trace_fn(grpc_span)
        .add_service(health)
        .add_optional_service(reflection)
        .add_optional_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            sagas,
            Authenticator::new(tokens.clone(), Scope::Participant),
        ))
        .add_service(InterceptedService::new(
            admin,
            Authenticator::new(tokens, Scope::Operator),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| format!("gRPC server stopped: {e}"))
}
