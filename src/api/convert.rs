//! Conversions between the proto messages and the domain, in one place.

use std::time::Duration;

use time::OffsetDateTime;
use tonic::Status;

use crate::breaker::Circuit;
use crate::definition::{Definition, Registry};
use crate::engine::{self, Kind};
use crate::graph::GraphState;
use crate::proto::v1 as pb;
use crate::store::{self, ListFilter};

/// Longest `stuck_for` accepted: far beyond any saga's age, and far from the ends of the clock.
pub const MAX_STUCK_FOR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

fn from_timestamp(
    field: &str,
    t: &Option<prost_types::Timestamp>,
) -> Result<Option<OffsetDateTime>, Status> {
    let Some(t) = t else { return Ok(None) };
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map(Some)
        .map_err(|_| Status::invalid_argument(format!("{field} is not a valid time")))
}

pub fn status_to_pb(s: engine::Status) -> pb::SagaStatus {
    match s {
        engine::Status::Running => pb::SagaStatus::Running,
        engine::Status::Compensating => pb::SagaStatus::Compensating,
        engine::Status::Completed => pb::SagaStatus::Completed,
        engine::Status::Compensated => pb::SagaStatus::Compensated,
        engine::Status::NeedsOperator => pb::SagaStatus::NeedsOperator,
        engine::Status::Resolved => pb::SagaStatus::Resolved,
    }
}

pub fn status_from_pb(s: pb::SagaStatus) -> Option<engine::Status> {
    Some(match s {
        pb::SagaStatus::Unspecified => return None,
        pb::SagaStatus::Running => engine::Status::Running,
        pb::SagaStatus::Compensating => engine::Status::Compensating,
        pb::SagaStatus::Completed => engine::Status::Completed,
        pb::SagaStatus::Compensated => engine::Status::Compensated,
        pb::SagaStatus::NeedsOperator => engine::Status::NeedsOperator,
        pb::SagaStatus::Resolved => engine::Status::Resolved,
    })
}

/// The filter part of a ListSagas request (shared with Redrive); paging is the caller's. `now`
/// is what `stuck_for` counts back from.
pub fn filter_from_pb(
    req: &pb::ListSagasRequest,
    now: OffsetDateTime,
) -> Result<ListFilter, Status> {
    let statuses = req
        .statuses
        .iter()
        .map(|s| {
            pb::SagaStatus::try_from(*s)
                .ok()
                .and_then(status_from_pb)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("statuses: {s} is not a saga status"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let text = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let definition = text(&req.definition);
    if req.definition_version != 0 && definition.is_none() {
        return Err(Status::invalid_argument(
            "definition_version needs a definition",
        ));
    }
    let stuck_since = match &req.stuck_for {
        None => None,
        Some(d) => {
            let d = Duration::try_from(*d)
                .map_err(|_| Status::invalid_argument("stuck_for must be a positive duration"))?;
            let too_long = || {
                Status::invalid_argument(format!(
                    "stuck_for must be at most {}",
                    humantime::format_duration(MAX_STUCK_FOR)
                ))
            };
            if d > MAX_STUCK_FOR {
                return Err(too_long());
            }
            let d = time::Duration::try_from(d).map_err(|_| too_long())?;
            Some(now.checked_sub(d).ok_or_else(too_long)?)
        }
    };
    Ok(ListFilter {
        statuses,
        definition,
        definition_version: (req.definition_version != 0).then_some(req.definition_version),
        stuck_since,
        participant: text(&req.participant),
        step: text(&req.step),
        created_after: from_timestamp("created_after", &req.created_after)?,
        created_before: from_timestamp("created_before", &req.created_before)?,
        updated_after: from_timestamp("updated_after", &req.updated_after)?,
        updated_before: from_timestamp("updated_before", &req.updated_before)?,
        error_contains: text(&req.error_contains),
        started_by: None,
        before: None,
        limit: 0,
    })
}

pub fn saga_to_pb(
    registry: &Registry,
    saga: store::SagaRecord,
    attempts: Vec<store::AttemptRecord>,
    history: Vec<store::HistoryRecord>,
) -> pb::Saga {
    let steps = match registry.get(&saga.definition, saga.definition_version) {
        Some(def) => steps_to_pb(&def, &saga.state),
        None => Vec::new(),
    };
    pb::Saga {
        current_steps: saga.current_steps.clone(),
        steps,
        id: saga.id.to_string(),
        definition: saga.definition,
        definition_version: saga.definition_version,
        status: status_to_pb(saga.state.status) as i32,
        current_step: saga.current_steps.into_iter().next().unwrap_or_default(),
        input_json: saga.input.to_string(),
        outputs_json: saga.outputs.to_string(),
        idempotency_key: saga.idempotency_key.unwrap_or_default(),
        created_at: Some(timestamp(saga.created_at)),
        updated_at: Some(timestamp(saga.updated_at)),
        error: saga.state.error.unwrap_or_default(),
        attempts: attempts.into_iter().map(attempt_to_pb).collect(),
        history: history.into_iter().map(history_to_pb).collect(),
    }
}

pub fn summary_to_pb(s: store::SagaRecord) -> pb::SagaSummary {
    pb::SagaSummary {
        id: s.id.to_string(),
        definition: s.definition,
        definition_version: s.definition_version,
        status: status_to_pb(s.state.status) as i32,
        current_step: s.current_steps.first().cloned().unwrap_or_default(),
        current_steps: s.current_steps,
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
        error: s.state.error.unwrap_or_default(),
    }
}

/// Each step of `def` with its state in `state` (none if the two disagree in length: a saga that
/// ended before step states were kept).
fn steps_to_pb(def: &Definition, state: &GraphState) -> Vec<pb::StepState> {
    if state.steps.len() != def.steps.len() {
        return Vec::new();
    }
    let names = |ids: Vec<usize>| -> Vec<String> {
        ids.into_iter()
            .filter_map(|i| def.steps.get(i).map(|s| s.name.clone()))
            .collect()
    };
    def.steps
        .iter()
        .zip(&state.steps)
        .enumerate()
        .map(|(i, (step, st))| pb::StepState {
            name: step.name.clone(),
            participant: step.participant.clone(),
            state: st.as_str().to_string(),
            attempt: st.attempt(),
            command_id: st.command_id().map(|c| c.to_string()).unwrap_or_default(),
            wake_at: st.wake_at().map(timestamp),
            reason: st.reason().unwrap_or_default().to_string(),
            after: names(def.deps(i)),
            pivot: def.pivot == i,
        })
        .collect()
}

fn attempt_to_pb(a: store::AttemptRecord) -> pb::StepAttempt {
    let outcome = match a.outcome.as_deref() {
        Some("success") => pb::Outcome::Success,
        Some("failure") => pb::Outcome::Failure,
        _ => pb::Outcome::Unspecified,
    };
    pb::StepAttempt {
        command_id: a.command_id.to_string(),
        step: a.step,
        participant: a.participant,
        kind: match a.kind {
            Kind::Action => pb::CommandKind::Action,
            Kind::Compensation => pb::CommandKind::Compensation,
        } as i32,
        attempt: a.attempt,
        sent_at: Some(timestamp(a.sent_at)),
        replied_at: a.replied_at.map(timestamp),
        outcome: outcome as i32,
        output_json: a.output.map(|o| o.to_string()).unwrap_or_default(),
        reason: a.reason.unwrap_or_default(),
        timed_out: a.timed_out,
        superseded: a.superseded,
    }
}

pub fn history_to_pb(h: store::HistoryRecord) -> pb::HistoryEvent {
    pb::HistoryEvent {
        seq: h.seq,
        at: Some(timestamp(h.at)),
        kind: h.kind,
        step: h.step.unwrap_or_default(),
        command_id: h.command_id.map(|c| c.to_string()).unwrap_or_default(),
        detail_json: h.detail.to_string(),
    }
}

pub fn participant_to_pb(p: store::ParticipantRecord) -> pb::Participant {
    pb::Participant {
        name: p.name,
        paused: p.paused,
        paused_by: p.paused_by.unwrap_or_default(),
        paused_reason: p.paused_reason.unwrap_or_default(),
        paused_at: p.paused_at.map(timestamp),
        circuit: match p.circuit {
            Circuit::Closed => pb::CircuitState::Closed,
            Circuit::Open => pb::CircuitState::Open,
            Circuit::HalfOpen => pb::CircuitState::HalfOpen,
        } as i32,
        consecutive_failures: p.consecutive_failures,
        circuit_changed_at: p.circuit_changed_at.map(timestamp),
        held_commands: p.held_commands,
    }
}
