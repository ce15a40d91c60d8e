//! Supervision: a background task that dies is logged, restarted with back-off, and named by
//! readiness (`/readyz`, gRPC health) while it is down or crash-looping; then sagad is whole
//! again.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(30);

/// `/readyz` as (status code, body), or None while nothing listens.
async fn readyz(app: &TestApp) -> Option<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(app.metrics_addr)
        .await
        .ok()?;
    conn.write_all(b"GET /readyz HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .ok()?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, serde_json::from_str(body).ok()?))
}

/// The gRPC health status of the whole server, or None while it does not answer.
async fn grpc_health(app: &TestApp) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let status = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.SagaService".into(),
        })
        .await
        .ok()?;
    Some(status.into_inner().status)
}

async fn wait_ready(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let ready = matches!(readyz(app).await, Some((200, _)));
        let serving = grpc_health(app).await == Some(ServingStatus::Serving as i32);
        if ready && serving {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready: {:?}",
            readyz(app).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_task_that_dies_is_restarted_and_named_by_readiness_until_it_runs_again() {
    let env = TestEnv::new();
    let mut settings = env.settings(&repo_sagas());
    settings.task_failure_window = Duration::from_secs(2);
    let app = spawn_app(settings).await;
    let demo = spawn_demo(&env, |_| {});
    wait_ready(&app).await;

    let tasks: BTreeSet<String> = app.readiness.tasks().into_iter().map(|t| t.0).collect();
    for expected in [
        "start writer",
        "outbox relay 0",
        "reply consumer",
        "timer sweeper",
        "metrics endpoint",
        "gRPC server",
        "gRPC health",
    ] {
        assert!(tasks.contains(expected), "{expected} supervised: {tasks:?}");
    }

    // Each task panics three times in a row: crash-looping, so not ready for a whole window.
    for task in &tasks {
        assert!(app.readiness.inject_fault(task, 3));
    }
    let mut named = BTreeSet::new();
    let mut not_serving = false;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while named != tasks || !not_serving {
        if let Some((code, body)) = readyz(&app).await {
            let failing = body["failing_tasks"].as_array().unwrap().clone();
            assert_eq!(code == 200, failing.is_empty(), "{body}");
            for t in failing {
                let t = t.as_str().unwrap().to_owned();
                let cause = body["tasks"][&t]["last_error"].as_str().unwrap_or_default();
                assert!(cause.contains("fault injected"), "{t}: {body}");
                named.insert(t);
            }
        }
        not_serving |= grpc_health(&app).await == Some(ServingStatus::NotServing as i32);
        assert!(
            tokio::time::Instant::now() < deadline,
            "named {named:?} of {tasks:?}; gRPC health NOT_SERVING seen: {not_serving}"
        );
    }

    // Restarted, they run again: readiness recovers and a saga goes through every one of them.
    wait_ready(&app).await;
    for (name, _, restarts) in app.readiness.tasks() {
        assert_eq!(restarts, 3, "{name}");
    }
    let mut client = app.client.clone();
    let id = start(&mut client, json!({"order_id": "S-1"})).await;
    wait_for_status(
        &mut client,
        &id,
        saga::proto::v1::SagaStatus::Completed,
        WITHIN,
    )
    .await;
    demo.stop().await;
    app.stop().await;
}
