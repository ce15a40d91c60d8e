//! The HTTP endpoints `/metrics`, `/healthz` and `/readyz`, on their own listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Gauges, Metrics, ParticipantGauge};
use crate::store::{Store, StoreError};
use crate::supervisor::{Readiness, TaskState};

#[derive(Clone)]
struct HttpState {
    store: Store,
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// The gauges that describe the database, read at scrape time.
async fn gauges(store: &Store) -> Result<Gauges, StoreError> {
    let (outbox_backlog, outbox_oldest) = store.outbox_backlog().await?;
    let participants = store
        .participants()
        .await?
        .into_iter()
        .map(|p| ParticipantGauge {
            circuit: p.circuit.gauge(),
            paused: p.paused,
            name: p.name,
        })
        .collect();
    Ok(Gauges {
        outbox_backlog,
        outbox_oldest,
        participants,
    })
}

/// Serves `/metrics`, `/healthz` (the process is up) and `/readyz` (the database answers, both
/// broker connections are up and every supervised task runs) until `shutdown`.
pub async fn serve_http(
    listener: TcpListener,
    store: Store,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(HttpState {
            store,
            metrics,
            readiness,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

async fn scrape(State(s): State<HttpState>) -> impl IntoResponse {
    let rendered = match gauges(&s.store).await {
        Ok(gauges) => s.metrics.render(&gauges).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match rendered {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{e}\n"),
        ),
    }
}

async fn ready(State(s): State<HttpState>) -> impl IntoResponse {
    let database = s.store.ping(Duration::from_secs(2)).await;
    let relay = s.metrics.relay_connected.load(Ordering::Relaxed);
    let consumer = s.metrics.consumer_connected.load(Ordering::Relaxed);
    let mut tasks = serde_json::Map::new();
    let mut failing = Vec::new();
    for (name, state, restarts) in s.readiness.tasks() {
        let (state, cause) = match state {
            TaskState::Running => ("running", None),
            TaskState::Down { cause } => ("down", Some(cause)),
            TaskState::CrashLooping { cause } => ("crash-looping", Some(cause)),
        };
        if cause.is_some() {
            failing.push(name.clone());
        }
        tasks.insert(
            name,
            json!({"state": state, "restarts": restarts, "last_error": cause}),
        );
    }
    let ready = database && relay && consumer && failing.is_empty();
    let body = json!({
        "ready": ready,
        "database": database,
        "broker_publisher": relay,
        "broker_consumer": consumer,
        "failing_tasks": failing,
        "tasks": tasks,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
