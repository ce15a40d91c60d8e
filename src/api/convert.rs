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
            after: after_names(def, i),
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

/// The names of the steps step `i` waits for.
fn after_names(def: &Definition, i: usize) -> Vec<String> {
    def.deps(i)
        .into_iter()
        .filter_map(|d| def.steps.get(d).map(|s| s.name.clone()))
        .collect()
}

/// What the registry and the store add to a definition version as the API shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefinitionState {
    pub retired: bool,
    pub current: bool,
    pub active_sagas: u64,
}

pub fn definition_to_pb(def: &Definition, state: DefinitionState) -> pb::Definition {
    let name_of = |i: usize| def.steps.get(i).map(|s| s.name.clone());
    // Durations come from validated files (at most days); one built in code beyond what a
    // protobuf Duration holds shows as unset rather than failing the whole listing.
    let duration = |d: Duration| prost_types::Duration::try_from(d).ok();
    let after_pivot = def.descendants(def.pivot);
    let steps = def
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| pb::DefinitionStep {
            name: s.name.clone(),
            participant: s.participant.clone(),
            action: s.action.clone(),
            compensation: s.compensation.clone().unwrap_or_default(),
            after: after_names(def, i),
            when: s
                .when
                .as_ref()
                .map(|c| c.source().to_string())
                .unwrap_or_default(),
            input_json: s
                .input
                .as_ref()
                .map(|m| m.source().to_string())
                .unwrap_or_default(),
            compensation_input_json: s
                .compensation_input
                .as_ref()
                .map(|m| m.source().to_string())
                .unwrap_or_default(),
            pivot: i == def.pivot,
            after_pivot: after_pivot.binary_search(&i).is_ok(),
            timeout: duration(s.timeout),
            retry: Some(pb::RetryPolicy {
                max_attempts: s.retry.max_attempts,
                initial_backoff: duration(s.retry.initial_backoff),
                max_backoff: duration(s.retry.max_backoff),
                multiplier: s.retry.multiplier,
            }),
        })
        .collect();
    pb::Definition {
        name: def.name.clone(),
        version: def.version,
        description: def.description.clone(),
        retired: state.retired,
        current: state.current,
        steps,
        pivot_step: name_of(def.pivot).unwrap_or_default(),
        compensation_max_attempts: def.compensation_max_attempts,
        active_sagas: state.active_sagas,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::definition;

    fn example(path: &str) -> Definition {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let text = std::fs::read_to_string(&file).unwrap();
        definition::parse(&file, &text).unwrap()
    }

    #[test]
    fn a_corridor_shows_the_implicit_previous_step_as_after() {
        let pb = definition_to_pb(
            &example("sagas/order_fulfillment.toml"),
            DefinitionState::default(),
        );
        let after: Vec<Vec<&str>> = pb
            .steps
            .iter()
            .map(|s| s.after.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            after,
            [
                vec![],
                vec!["create_order"],
                vec!["authorize_payment"],
                vec!["schedule_delivery"]
            ]
        );
        assert_eq!(pb.pivot_step, "schedule_delivery");
        let pivots: Vec<bool> = pb.steps.iter().map(|s| s.pivot).collect();
        assert_eq!(pivots, [false, false, true, false]);
        let pay = &pb.steps[1];
        assert_eq!(
            (
                pay.compensation.as_str(),
                pay.input_json.as_str(),
                pay.when.as_str()
            ),
            ("refund_payment", "", "")
        );
        assert_eq!(
            pay.timeout,
            Some(prost_types::Duration {
                seconds: 15,
                nanos: 0
            })
        );
        let retry = pay.retry.unwrap();
        assert_eq!((retry.max_attempts, retry.multiplier), (3, 2.0));
        assert_eq!(
            retry.initial_backoff,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000
            })
        );
        assert_eq!(pb.steps[3].compensation, "");
        let after_pivot: Vec<bool> = pb.steps.iter().map(|s| s.after_pivot).collect();
        assert_eq!(after_pivot, [false, false, false, true]);
    }

    #[test]
    fn the_food_delivery_graph_converts_and_draws_with_its_edges_conditions_and_inputs() {
        let def = example("sagas/food_delivery.toml");
        let state = DefinitionState {
            retired: false,
            current: true,
            active_sagas: 4,
        };
        let pb = definition_to_pb(&def, state);
        assert_eq!((pb.active_sagas, pb.current, pb.retired), (4, true, false));
        let rider = &pb.steps[4];
        assert_eq!(
            rider.after,
            ["authorize_payment", "shop_accepts", "redeem_coupon"]
        );
        assert!(rider.pivot);
        assert_eq!(pb.steps[3].when, "has(input.coupon) && input.coupon != ''");
        // The mapping as written, `${…}` and literals alike, not as rendered for a saga.
        let input: serde_json::Value = serde_json::from_str(&pb.steps[1].input_json).unwrap();
        assert_eq!(
            input,
            json!({"order_id": "${steps.create_order.output.order_id}",
                   "amount_cents": "${input.amount_cents}", "currency": "KRW"})
        );
        let undo: serde_json::Value =
            serde_json::from_str(&pb.steps[0].compensation_input_json).unwrap();
        assert_eq!(
            undo,
            json!({"order_id": "${steps.create_order.output.order_id}"})
        );
        assert_eq!(pb.steps[2].compensation_input_json, "");

        let text = sagactl::cli::definition_text(&pb);
        assert_eq!(text, DRAWN, "{text}");
    }

    /// `sagactl definition food_delivery`: the three branches fork from create_order, the
    /// join under the step they forked from, spelling out what it waits for.
    const DRAWN: &str = "\
definition:    food_delivery@1
description:   Create an order, pay, have the shop accept it, redeem a coupon, dispatch a rider
state:         current: new sagas start on it
pivot:         dispatch_rider
compensation:  an operator is needed after 10 failed attempts
active sagas:  4

steps:
create_order  order: create_order, undo: cancel_order
│   input: customer_id=${input.customer_id} items=${input.items} shop_id=${input.shop_id}
│   compensation input: order_id=${steps.create_order.output.order_id}
│   timeout 10s; 3 attempts, back-off 200ms to 30s ×2
├── authorize_payment  payment: authorize_payment, undo: void_payment
│       input: amount_cents=${input.amount_cents} currency=KRW order_id=${steps.create_order.output.order_id}
│       compensation input: authorization=${steps.authorize_payment.output.authorization}
│       timeout 15s; 3 attempts, back-off 200ms to 30s ×2
├── shop_accepts  shop: accept_order, undo: reject_order
│       input: items=${input.items} order_id=${steps.create_order.output.order_id} shop_id=${input.shop_id}
│       timeout 10s; 3 attempts, back-off 200ms to 30s ×2
├── redeem_coupon  coupon: redeem_coupon, undo: restore_coupon
│       when: has(input.coupon) && input.coupon != ''
│       input: coupon=${input.coupon} customer_id=${input.customer_id} order_id=${steps.create_order.output.order_id}
│       compensation input: redemption_id=${steps.redeem_coupon.output.redemption_id}
│       timeout 10s; 3 attempts, back-off 200ms to 30s ×2
└── dispatch_rider (pivot)  delivery: dispatch_rider, undo: recall_rider
    │   after: authorize_payment, shop_accepts, redeem_coupon
    │   input: address=${input.address} coupon_applied=\"${steps.redeem_coupon.output != null}\" order_id=${steps.create_order.output.order_id} shop_id=${input.shop_id}
    │   timeout 10s; 3 attempts, back-off 200ms to 30s ×2
    notify_customer  notification: notify_customer
        input: customer_id=${input.customer_id} eta_minutes=${steps.dispatch_rider.output.eta_minutes} order_id=${steps.create_order.output.order_id} rider=${steps.dispatch_rider.output.rider_name}
        timeout 10s; retried until it succeeds, back-off 200ms to 30s ×2
";
}
