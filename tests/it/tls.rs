//! TLS towards RabbitMQ (`amqps://`) and PostgreSQL (`sslmode`), and the gRPC listener's
//! certificate checks at start-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use saga::app::Application;
use saga::proto::v1 as pb;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A TLS-terminating proxy in front of the local RabbitMQ: what it forwards was encrypted on
/// the way in, so traffic through it proves the client spoke TLS. Counts finished handshakes.
struct TlsProxy {
    port: u16,
    handshakes: Arc<AtomicUsize>,
    ca_file: tempfile::NamedTempFile,
}

async fn tls_proxy(upstream: &'static str) -> TlsProxy {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut ca_file, cert.cert.pem().as_bytes()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(client).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    TlsProxy {
        port,
        handshakes,
        ca_file,
    }
}

#[tokio::test]
async fn amqps_carries_the_saga_commands_through_tls() {
    let env = TestEnv::new();
    let proxy = tls_proxy("127.0.0.1:5672").await;
    let amqps = format!("amqps://guest:guest@localhost:{}/{}", proxy.port, env.name);
    let mut settings = env.settings(&repo_sagas());
    settings.amqp_url = amqps.clone();
    settings.amqp_ca_file = Some(proxy.ca_file.path().to_path_buf());
    let mut app = spawn_app(settings).await;
    // The demo participants take the same amqps URL and CA, through the same connect helper.
    let ca = saga::broker::load_amqp_ca(&amqps, Some(proxy.ca_file.path())).unwrap();
    let demo = spawn_demo(&env, |c| {
        c.amqp_url = amqps.clone();
        c.amqp_ca = ca;
    });
    let id = start(&mut app.client, json!({"order_id": "T-1"})).await;
    wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    // Relays, consumer, topology and the demo: nothing reached RabbitMQ but through the proxy.
    assert!(proxy.handshakes.load(Ordering::SeqCst) >= 3);
    demo.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn amqps_is_never_downgraded_to_plain_text() {
    let env = TestEnv::new();
    // The plain-text listener: a TLS client must fail there, not fall back.
    let plain = format!("amqps://guest:guest@127.0.0.1:5672/{}", env.name);
    let attempt =
        tokio::time::timeout(Duration::from_secs(10), saga::broker::connect(&plain, None)).await;
    assert!(
        matches!(attempt, Ok(Err(_))),
        "amqps:// to a plain-text listener must fail"
    );
    // And a certificate the system does not trust fails without the CA file.
    let proxy = tls_proxy("127.0.0.1:5672").await;
    let untrusted = format!("amqps://guest:guest@localhost:{}/{}", proxy.port, env.name);
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        saga::broker::connect(&untrusted, None),
    )
    .await;
    assert!(matches!(attempt, Ok(Err(_))), "unverified server accepted");
    assert_eq!(proxy.handshakes.load(Ordering::SeqCst), 0);

    // A CA file that says TLS was meant, with a plain URL or without a certificate, stops sagad.
    let empty = tempfile::NamedTempFile::new().unwrap();
    for (url, ca) in [
        (env.amqp_url(), proxy.ca_file.path()),
        (untrusted.clone(), empty.path()),
    ] {
        let mut settings = env.settings(&repo_sagas());
        settings.amqp_url = url;
        settings.amqp_ca_file = Some(ca.to_path_buf());
        let refused = Application::build(settings, CancellationToken::new()).await;
        let e = refused
            .err()
            .expect("sagad refuses the CA file")
            .to_string();
        assert!(e.contains(&ca.display().to_string()), "{e}");
    }
}

/// The local cluster's certificate, trusted as its own root (it is self-signed), and the host
/// name it was issued for.
async fn postgres_certificate() -> String {
    let pool = sqlx::PgPool::connect(&format!("{PG}/postgres?sslmode=disable"))
        .await
        .unwrap();
    let (ssl,): (String,) = sqlx::query_as("SHOW ssl").fetch_one(&pool).await.unwrap();
    assert_eq!(
        ssl, "on",
        "these tests need SSL on the local PostgreSQL (Debian/Ubuntu clusters have it)"
    );
    let (file,): (String,) = sqlx::query_as("SHOW ssl_cert_file")
        .fetch_one(&pool)
        .await
        .unwrap();
    file
}

#[tokio::test]
async fn postgres_with_sslmode_verify_full_is_encrypted() {
    let env = TestEnv::new();
    let cert = postgres_certificate().await;
    let mut settings = env.settings(&repo_sagas());
    settings.database_url = format!(
        "postgres://postgres@localhost:5432/{}?sslmode=verify-full&sslrootcert={cert}\
         &application_name=sagad-under-test",
        env.name
    );
    let mut app = spawn_app(settings).await;
    let demo = spawn_demo(&env, |_| {});
    let id = start(&mut app.client, json!({"order_id": "T-2"})).await;
    wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    // Every sagad session uses TLS.
    let observer = sqlx::PgPool::connect(&format!("{PG}/postgres?sslmode=disable"))
        .await
        .unwrap();
    let (sessions, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 \
         AND a.application_name = 'sagad-under-test'",
    )
    .bind(&env.name)
    .fetch_one(&observer)
    .await
    .unwrap();
    assert!(sessions > 0);
    assert_eq!(sessions, encrypted, "unencrypted sagad sessions");
    demo.stop().await;
    app.stop().await;

    // verify-full checks the name: the certificate is not for 127.0.0.1.
    let mut settings = env.settings(&repo_sagas());
    settings.database_url = format!(
        "postgres://postgres@127.0.0.1:5432/{}?sslmode=verify-full&sslrootcert={cert}",
        env.name
    );
    assert!(
        Application::build(settings, CancellationToken::new())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn postgres_sslmode_require_refuses_a_server_without_tls() {
    let env = TestEnv::new();
    // Answers every SSLRequest with 'N', as a server without TLS does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            if s.read_exact(&mut request).await.is_ok() {
                let _ = s.write_all(b"N").await;
                // Then whatever comes (a plain startup) is left unanswered.
                let mut rest = [0u8; 512];
                let _ = s.read(&mut rest).await;
            }
        }
    });
    let mut settings = env.settings(&repo_sagas());
    settings.database_url = format!("postgres://postgres@127.0.0.1:{port}/x?sslmode=require");
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        Application::build(settings, CancellationToken::new()),
    )
    .await
    .expect("refused, not hanging");
    assert!(refused.is_err());
}

/// Runs the `sagad` binary with these TLS files until it exits (it must, refusing them).
async fn sagad_with_tls(env: &TestEnv, cert: &std::path::Path, key: &std::path::Path) -> String {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagad"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--console-listen", "127.0.0.1:0"])
        .arg("--definitions")
        .arg(repo_sagas())
        .args(["--database-url", &env.database_url()])
        .args(["--amqp-url", &env.amqp_url()])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("SAGA_LOG_FORMAT", "text")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("sagad exits")
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "sagad must not start: {all}");
    assert!(!all.contains("listening"), "{all}");
    all
}

#[tokio::test]
async fn unusable_tls_files_stop_sagad_before_it_listens() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(path("cert.pem"), a.cert.pem()).unwrap();
    std::fs::write(path("key.pem"), a.signing_key.serialize_pem()).unwrap();
    std::fs::write(path("other-key.pem"), b.signing_key.serialize_pem()).unwrap();
    std::fs::write(path("garbage.pem"), "not a pem file\n").unwrap();
    for (cert, key, named) in [
        ("garbage.pem", "key.pem", "garbage.pem"),
        ("cert.pem", "garbage.pem", "garbage.pem"),
        ("key.pem", "cert.pem", "key.pem"),
        ("cert.pem", "other-key.pem", "other-key.pem"),
    ] {
        let out = sagad_with_tls(&env, &path(cert), &path(key)).await;
        assert!(out.contains(named), "{cert} + {key}: {out}");
    }
}

/// The recipe in README.md, run as written: its certificate must satisfy sagactl.
#[tokio::test]
async fn the_readme_certificate_recipe_works_with_sagactl() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let recipe: String = readme
        .lines()
        .skip_while(|l| !l.starts_with("openssl req"))
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!recipe.is_empty(), "no `openssl req` recipe in README.md");
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("sh")
        .args(["-c", &recipe])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let env = TestEnv::new();
    let mut settings = env.settings(&repo_sagas());
    settings.tls_cert = Some(dir.path().join("cert.pem"));
    settings.tls_key = Some(dir.path().join("key.pem"));
    let shutdown = CancellationToken::new();
    let app = Application::build(settings, shutdown.clone())
        .await
        .unwrap();
    let port = app.local_addr().port();
    let running = tokio::spawn(app.run_until_stopped());
    for host in ["localhost", "127.0.0.1"] {
        let out = tokio::process::Command::new(saga_testkit::built_bin("sagactl"))
            .args(["--server", &format!("https://{host}:{port}")])
            .arg("--ca-cert")
            .arg(dir.path().join("cert.pem"))
            .args(["--output", "json", "list"])
            .env_remove("SAGA_CA_CERT")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    shutdown.cancel();
    running.await.unwrap();
}
