//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.
//!
//! Each [`Application`](crate::app::Application) owns its registry (no global state), so several
//! orchestrators in one process (the tests) do not mix their figures. Counters move as
//! transitions happen; gauges that describe the database (outbox backlog, circuits) are read
//! from it at scrape time, so every replica reports the shared truth.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::Status;
use crate::store::{Circuit, Store};
use crate::supervisor::{Readiness, TaskState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SagaLabels {
    definition: String,
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    participant: String,
    step: String,
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParticipantLabels {
    participant: String,
}

pub struct Metrics {
    registry: Registry,
    sagas: Family<SagaLabels, Counter>,
    step_seconds: Family<StepLabels, Histogram>,
    dead_lettered: Counter,
    outbox_backlog: Gauge,
    outbox_oldest_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    circuit: Family<ParticipantLabels, Gauge>,
    paused: Family<ParticipantLabels, Gauge>,
    /// Set by the outbox relay and the reply consumer while connected to the broker.
    pub relay_connected: AtomicBool,
    pub consumer_connected: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("saga");
        let sagas = Family::<SagaLabels, Counter>::default();
        registry.register(
            "lifecycle_events",
            "Sagas that started, completed, compensated, need an operator or were resolved",
            sagas.clone(),
        );
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "step_duration_seconds",
            "From a command's publication to its reply or timeout, by participant and step",
            step_seconds.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "replies_dead_lettered",
            "Replies moved to the dead-letter queue",
            dead_lettered.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "outbox_backlog",
            "Messages waiting in the outbox",
            outbox_backlog.clone(),
        );
        let outbox_oldest_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest message waiting in the outbox",
            outbox_oldest_seconds.clone(),
        );
        let circuit = Family::<ParticipantLabels, Gauge>::default();
        registry.register(
            "circuit_state",
            "Participant circuit: 0 closed, 1 open, 2 half-open",
            circuit.clone(),
        );
        let paused = Family::<ParticipantLabels, Gauge>::default();
        registry.register(
            "participant_paused",
            "1 while an operator holds dispatch to the participant",
            paused.clone(),
        );
        Metrics {
            registry,
            sagas,
            step_seconds,
            dead_lettered,
            outbox_backlog,
            outbox_oldest_seconds,
            circuit,
            paused,
            relay_connected: AtomicBool::new(false),
            consumer_connected: AtomicBool::new(false),
        }
    }

    pub fn saga_event(&self, definition: &str, status: Status) {
        let event = match status {
            Status::Running => "started",
            other => other.as_str(),
        };
        self.sagas
            .get_or_create(&SagaLabels {
                definition: definition.into(),
                event: event.into(),
            })
            .inc();
    }

    /// `outcome`: `success`, `failure` or `timeout`.
    pub fn step_ended(
        &self,
        participant: &str,
        step: &str,
        kind: &str,
        outcome: &str,
        took: Duration,
    ) {
        let labels = StepLabels {
            participant: participant.into(),
            step: step.into(),
            kind: kind.into(),
            outcome: outcome.into(),
        };
        self.step_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// Reads the database-backed gauges, then renders everything in the text format.
    async fn render(&self, store: &Store) -> Result<String, crate::store::StoreError> {
        let (backlog, oldest) = store.outbox_backlog().await?;
        self.outbox_backlog.set(backlog);
        self.outbox_oldest_seconds.set(oldest.as_secs_f64());
        for p in store.participants().await? {
            let labels = ParticipantLabels {
                participant: p.name,
            };
            let state = match p.circuit {
                Circuit::Closed => 0,
                Circuit::Open => 1,
                Circuit::HalfOpen => 2,
            };
            self.circuit.get_or_create(&labels).set(state);
            self.paused.get_or_create(&labels).set(i64::from(p.paused));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| crate::store::StoreError::Corrupt(e.to_string()))?;
        Ok(out)
    }
}

#[derive(Clone)]
struct HttpState {
    store: Store,
    metrics: Arc<Metrics>,
    readiness: Readiness,
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
    match s.metrics.render(&s.store).await {
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
