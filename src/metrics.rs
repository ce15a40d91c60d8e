//! Prometheus metrics. The HTTP endpoints that serve them are in [`crate::endpoints`].
//!
//! Each [`Application`](crate::app::Application) owns its registry (no global state), so several
//! orchestrators in one process (the tests) do not mix their figures. Counters move as
//! transitions happen; gauges that describe the database (outbox backlog, circuits) are given
//! at scrape time by the caller, which reads them there, so every replica reports the shared
//! truth.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::Status;

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

    /// Sets the database-backed gauges from `gauges`, then renders everything in the text
    /// format.
    pub fn render(&self, gauges: &Gauges) -> Result<String, std::fmt::Error> {
        self.outbox_backlog.set(gauges.outbox_backlog);
        self.outbox_oldest_seconds
            .set(gauges.outbox_oldest.as_secs_f64());
        for p in &gauges.participants {
            let labels = ParticipantLabels {
                participant: p.name.clone(),
            };
            self.circuit.get_or_create(&labels).set(p.circuit);
            self.paused.get_or_create(&labels).set(i64::from(p.paused));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// What the database says at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub outbox_backlog: i64,
    pub outbox_oldest: Duration,
    pub participants: Vec<ParticipantGauge>,
}

#[derive(Debug, Clone)]
pub struct ParticipantGauge {
    pub name: String,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit: i64,
    pub paused: bool,
}
