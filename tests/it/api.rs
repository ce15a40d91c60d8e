//! The gRPC API: validation, idempotency, start-up checks.

use saga::app::Application;
use saga::proto::v1 as pb;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn the_same_idempotency_key_gives_one_saga() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let req = pb::StartSagaRequest {
        definition: "order_fulfillment".into(),
        input_json: json!({"order_id": "A-1"}).to_string(),
        idempotency_key: "order-A-1".into(),
    };
    let first = app
        .client
        .start_saga(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    // Sequential and concurrent repeats all resolve to the first saga.
    let second = app
        .client
        .start_saga(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.saga_id.as_str(), second.created),
        (first.saga_id.as_str(), false)
    );
    let concurrent = futures::future::join_all((0..8).map(|_| {
        let mut c = app.client.clone();
        let r = req.clone();
        async move { c.start_saga(r).await.unwrap().into_inner() }
    }))
    .await;
    assert!(
        concurrent
            .iter()
            .all(|r| r.saga_id == first.saga_id && !r.created)
    );

    let listed = app
        .client
        .list_sagas(pb::ListSagasRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sagas.len(), 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(&env.pool().await)
        .await
        .unwrap();
    assert_eq!(count, 1);
    app.stop().await;
}

/// Concurrent starts share statements: each call still gets its own answer, whatever the others
/// in its statement were (new, repeated keys, a value the database refuses).
#[tokio::test]
async fn concurrent_starts_each_get_their_own_answer() {
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let request = |key: String, input: String| pb::StartSagaRequest {
        definition: "order_fulfillment".into(),
        input_json: input,
        idempotency_key: key,
    };
    let mut requests = Vec::new();
    for i in 0..24 {
        // Keys k-0 … k-7 three times each, and sagas without a key.
        requests.push(request(
            format!("k-{}", i % 8),
            json!({"k": i % 8}).to_string(),
        ));
        requests.push(request(String::new(), json!({"i": i}).to_string()));
    }
    // `jsonb` cannot hold a NUL character: refused, alone.
    requests.insert(20, request(String::new(), r#"{"note": "a\u0000b"}"#.into()));
    let answers = futures::future::join_all(requests.iter().cloned().map(|r| {
        let mut c = app.client.clone();
        async move { c.start_saga(r).await }
    }))
    .await;

    let mut by_key: std::collections::HashMap<String, Vec<pb::StartSagaResponse>> =
        Default::default();
    for (req, answer) in requests.iter().zip(answers) {
        if req.input_json.contains("\\u0000") {
            let e = answer.expect_err("an input jsonb cannot hold is refused");
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("cannot store"), "{}", e.message());
            continue;
        }
        let answer = answer.unwrap().into_inner();
        if req.idempotency_key.is_empty() {
            assert!(answer.created);
        }
        by_key
            .entry(req.idempotency_key.clone())
            .or_default()
            .push(answer);
    }
    for (key, answers) in by_key.iter().filter(|(k, _)| !k.is_empty()) {
        assert_eq!(answers.len(), 3);
        assert_eq!(answers.iter().filter(|a| a.created).count(), 1, "{key}");
        assert!(
            answers.iter().all(|a| a.saga_id == answers[0].saga_id),
            "{key}"
        );
    }
    let pool = env.pool().await;
    let (sagas, keyed, attempts, started): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sagas), (SELECT count(DISTINCT idempotency_key) FROM sagas), \
         (SELECT count(*) FROM step_attempts), \
         (SELECT count(*) FROM saga_history WHERE kind = 'saga_started')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // 24 without a key, 8 keys; one first command and one `started` entry each.
    assert_eq!((sagas, keyed, attempts, started), (32, 8, 32, 32));
    app.stop().await;
}

#[tokio::test]
async fn invalid_requests_get_a_status_that_says_what_is_wrong() {
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let mut c = app.client.clone();
    let start = |definition: &str, input: &str| pb::StartSagaRequest {
        definition: definition.into(),
        input_json: input.into(),
        idempotency_key: String::new(),
    };

    let e = c.start_saga(start("no_such_saga", "{}")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("no_such_saga") && e.message().contains("order_fulfillment"),
        "{}",
        e.message()
    );

    let e = c.start_saga(start("", "{}")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = c
        .start_saga(start("order_fulfillment", "{not json"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("input_json is not valid JSON"),
        "{}",
        e.message()
    );

    let e = c
        .start_saga(start("order_fulfillment", "[1, 2]"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "input_json must be a JSON object")
    );

    let huge = json!({"blob": "x".repeat(saga::api::MAX_INPUT_BYTES)}).to_string();
    let e = c
        .start_saga(start("order_fulfillment", &huge))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{}", e.message());

    let too_big = "x".repeat(saga::app::MAX_REQUEST_BYTES + 1);
    let e = c
        .start_saga(start("order_fulfillment", &too_big))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    let e = c
        .get_saga(pb::GetSagaRequest {
            saga_id: "42".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let missing = uuid::Uuid::now_v7().to_string();
    let e = c
        .get_saga(pb::GetSagaRequest {
            saga_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains(&missing));

    let e = c
        .list_sagas(pb::ListSagasRequest {
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_sagas(pb::ListSagasRequest {
            statuses: vec![99],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let report =
        |command_id: &str, outcome: pb::Outcome, reason: &str| pb::ReportStepResultRequest {
            command_id: command_id.into(),
            outcome: outcome as i32,
            reason: reason.into(),
            ..Default::default()
        };
    let e = c
        .report_step_result(report(&missing, pb::Outcome::Success, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .report_step_result(report(&missing, pb::Outcome::Failure, ""))
        .await
        .unwrap_err();
    // A failure without a reason is accepted (a default reason is recorded): this command
    // was never sent.
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .report_step_result(report(&missing, pb::Outcome::Unspecified, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    app.stop().await;
}

#[tokio::test]
async fn list_pages_through_every_saga_once_newest_first() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(start(&mut app.client, json!({"n": i})).await);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .client
            .list_sagas(pb::ListSagasRequest {
                page_size: 3,
                page_token: token.clone(),
                definition: "order_fulfillment".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sagas.len() <= 3);
        seen.extend(page.sagas.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);

    let none = app
        .client
        .list_sagas(pb::ListSagasRequest {
            statuses: vec![pb::SagaStatus::Completed as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.sagas.is_empty());
    let other = app
        .client
        .list_sagas(pb::ListSagasRequest {
            definition: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.sagas.is_empty());
    app.stop().await;
}

const BAD_DEFINITION: &str = "name = \"broken\"\nversion = 1\n\n[[steps]]\nname = \"a\"\nparticipant = \"p\"\naction = \"do\"\ntimeout = \"soon\"\n";

#[tokio::test]
async fn an_invalid_definition_stops_start_up_with_its_file_and_line() {
    let env = TestEnv::new();
    let dir = definitions_dir(&[("broken.toml", BAD_DEFINITION)]);
    let err = Application::build(env.settings(dir.path()), CancellationToken::new())
        .await
        .err()
        .expect("start-up must fail");
    let shown = err.to_string();
    let file = dir.path().join("broken.toml");
    assert!(
        shown.contains(&format!("{}:8: field `steps[0].timeout`", file.display())),
        "{shown}"
    );

    // The real binary refuses to start too, and says why on stderr.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sagad"))
        .args([
            "--definitions",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SAGA_DATABASE_URL", env.database_url())
        .env("SAGA_AMQP_URL", env.amqp_url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.toml:8: field `steps[0].timeout`"),
        "{stderr}"
    );
    assert!(stderr.contains("not a duration"), "{stderr}");
}

#[tokio::test]
async fn a_changed_definition_must_get_a_new_version() {
    let env = TestEnv::new();
    let v1 = "name = \"s\"\nversion = 1\n[[steps]]\nname = \"a\"\nparticipant = \"p\"\naction = \"do\"\n";
    let dir = definitions_dir(&[("s.toml", v1)]);
    spawn_app(env.settings(dir.path())).await.stop().await;

    std::fs::write(
        dir.path().join("s.toml"),
        v1.replace("\"do\"", "\"do_other\""),
    )
    .unwrap();
    let err = Application::build(env.settings(dir.path()), CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("give the changed definition a new version"),
        "{err}"
    );

    // With a new version it starts, and both versions stay known.
    std::fs::write(
        dir.path().join("s.toml"),
        v1.replace("\"do\"", "\"do_other\"")
            .replace("version = 1", "version = 2"),
    )
    .unwrap();
    let token = CancellationToken::new();
    let app = Application::build(env.settings(dir.path()), token.clone())
        .await
        .unwrap();
    assert!(app.registry().get("s", 1).is_some());
    assert_eq!(app.registry().latest("s").unwrap().version, 2);
    token.cancel();
    app.run_until_stopped().await;
}

#[tokio::test]
async fn server_reflection_lists_and_describes_the_services_so_grpcurl_needs_no_proto_files() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let call = |m: MessageRequest| {
        let tx = tx.clone();
        async move {
            tx.send(ask(m)).await.unwrap();
        }
    };
    call(MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "saga.v1.SagaService",
        "saga.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&service), "{names:?}");
    }
    // What grpcurl does: the file declaring a service, then each file it imports, by name.
    call(MessageRequest::FileContainingSymbol(
        "saga.v1.AdminService".into(),
    ))
    .await;
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
        &files.file_descriptor_proto[0][..],
    )
    .unwrap();
    assert_eq!(file.name(), "saga/v1/saga.proto");
    assert!(!file.dependency.is_empty());
    for dependency in &file.dependency {
        call(MessageRequest::FileByFilename(dependency.clone())).await;
        let answer = answers.message().await.unwrap().unwrap().message_response;
        assert!(
            matches!(answer, Some(MessageResponse::FileDescriptorResponse(_))),
            "{dependency}: {answer:?}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn with_a_certificate_the_api_is_served_over_tls_only() {
    let env = TestEnv::new();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut settings = env.settings(&repo_sagas());
    settings.tls_cert = Some(cert_path.clone());
    settings.tls_key = Some(key_path);
    let shutdown = CancellationToken::new();
    let app = Application::build(settings, shutdown.clone())
        .await
        .unwrap();
    let addr = app.local_addr();
    let console = app.console_addr();
    let running = tokio::spawn(app.run_until_stopped());

    // The console is HTTPS with the same certificate, its cookie Secure; plain HTTP gets nothing.
    let page = console_over_tls(console, &cert.cert).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.lines().any(|l| l.starts_with("set-cookie:")
            && l.contains("HttpOnly")
            && l.contains("Secure")),
        "{page}"
    );
    let (code, _) = http_get(console, "/").await;
    assert_eq!(code, 0, "the console must not answer in plain text");

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS client trusting the certificate connects");
    let mut client = pb::saga_service_client::SagaServiceClient::new(channel);
    let listed = client
        .list_sagas(pb::ListSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sagas.is_empty());

    // A plain-text client gets no answer from the TLS listener.
    let plain = async {
        let mut c =
            pb::saga_service_client::SagaServiceClient::connect(format!("http://{addr}")).await?;
        c.list_sagas(pb::ListSagasRequest::default())
            .await
            .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
    };
    let refused = tokio::time::timeout(std::time::Duration::from_secs(5), plain).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "plain text must not be served"
    );

    // sagactl trusts the certificate it is given, and refuses https without one.
    // (An async child process: the server runs on this test's runtime.)
    let sagactl = |args: &[&str]| {
        tokio::process::Command::new(saga_testkit::built_bin("sagactl"))
            .args(["--server", &format!("https://127.0.0.1:{}", addr.port())])
            .args(args)
            .env_remove("SAGA_CA_CERT")
            .output()
    };
    let ok = sagactl(&[
        "--ca-cert",
        cert_path.to_str().unwrap(),
        "--output",
        "json",
        "list",
    ])
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = sagactl(&["list"]).await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--ca-cert"));
    shutdown.cancel();
    running.await.unwrap();
}

/// GET / from the console over TLS, trusting `cert`; the raw response.
async fn console_over_tls(addr: std::net::SocketAddr, cert: &rcgen::Certificate) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    String::from_utf8_lossy(&raw).into_owned()
}
