//! The gRPC API (tonic): `saga.v1.SagaService`, and the conversions between proto and domain.
//!
//! Requests are validated here and refused with `INVALID_ARGUMENT` / `NOT_FOUND` and a message
//! that says what is wrong; store errors map to statuses in one place ([`status_of`]) and never
//! leak SQL to callers.

use std::sync::Arc;

use serde_json::Value;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::definition::Registry;
use crate::engine::{self, Kind};
use crate::proto::v1 as pb;
use crate::store::{self, ListFilter, ReplyResult, Store, StoreError};

/// Largest saga input accepted, in bytes of JSON.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 256;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub struct SagaApi {
    store: Store,
    registry: Arc<Registry>,
}

impl SagaApi {
    pub fn new(store: Store, registry: Arc<Registry>) -> Self {
        SagaApi { store, registry }
    }
}

/// The single mapping from store errors to gRPC statuses.
pub fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(m) => Status::not_found(m),
        StoreError::InvalidArgument(m) => Status::invalid_argument(m),
        StoreError::DefinitionConflict(m) => Status::failed_precondition(m),
        StoreError::Database(e) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        e @ (StoreError::Corrupt(_) | StoreError::Migrate(_)) => {
            tracing::error!(error = %e, "internal error");
            Status::internal("internal error; see the orchestrator's logs")
        }
    }
}

fn parse_id(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim())
        .map_err(|_| Status::invalid_argument(format!("{field} {s:?} is not a UUID")))
}

fn parse_json(field: &str, s: &str) -> Result<Value, Status> {
    if s.len() > MAX_INPUT_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_INPUT_BYTES}",
            s.len()
        )));
    }
    serde_json::from_str(s)
        .map_err(|e| Status::invalid_argument(format!("{field} is not valid JSON: {e}")))
}

#[tonic::async_trait]
impl pb::saga_service_server::SagaService for SagaApi {
    async fn start_saga(
        &self,
        req: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        let req = req.into_inner();
        let name = req.definition.trim();
        if name.is_empty() {
            return Err(Status::invalid_argument("definition is required"));
        }
        let def = self.registry.latest(name).ok_or_else(|| {
            let known: Vec<_> = self
                .registry
                .all()
                .map(|d| d.name.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            Status::not_found(format!(
                "no saga definition named {name:?}; known: {}",
                known.join(", ")
            ))
        })?;
        let input = if req.input_json.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            parse_json("input_json", &req.input_json)?
        };
        if !input.is_object() {
            return Err(Status::invalid_argument("input_json must be a JSON object"));
        }
        let key = req.idempotency_key.trim();
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(Status::invalid_argument(format!(
                "idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        let key = (!key.is_empty()).then_some(key);
        let (id, created, status) = self
            .store
            .start_saga(&def, input, key, OffsetDateTime::now_utc())
            .await
            .map_err(status_of)?;
        tracing::info!(saga_id = %id, definition = %def.name, created, "start saga");
        Ok(Response::new(pb::StartSagaResponse {
            saga_id: id.to_string(),
            created,
            status: status_to_pb(status) as i32,
        }))
    }

    async fn get_saga(
        &self,
        req: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let id = parse_id("saga_id", &req.get_ref().saga_id)?;
        let (saga, attempts, history) = self.store.get_saga(id).await.map_err(status_of)?;
        let current_step = current_step(&self.registry, &saga);
        Ok(Response::new(pb::Saga {
            id: saga.id.to_string(),
            definition: saga.definition.clone(),
            definition_version: saga.definition_version,
            status: status_to_pb(saga.state.status) as i32,
            current_step,
            input_json: saga.input.to_string(),
            outputs_json: saga.outputs.to_string(),
            idempotency_key: saga.idempotency_key.clone().unwrap_or_default(),
            created_at: Some(timestamp(saga.created_at)),
            updated_at: Some(timestamp(saga.updated_at)),
            error: saga.state.error.clone().unwrap_or_default(),
            attempts: attempts.into_iter().map(attempt_to_pb).collect(),
            history: history.into_iter().map(history_to_pb).collect(),
        }))
    }

    async fn list_sagas(
        &self,
        req: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let req = req.into_inner();
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
        let limit = match req.page_size {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size {n} exceeds {MAX_PAGE}"
                )));
            }
        };
        let before = match req.page_token.trim() {
            "" => None,
            t => Some(parse_id("page_token", t)?),
        };
        let definition = Some(req.definition.trim().to_string()).filter(|d| !d.is_empty());
        let filter = ListFilter {
            statuses,
            definition,
            before,
            limit: limit + 1,
        };
        let mut sagas = self.store.list_sagas(&filter).await.map_err(status_of)?;
        // One extra row tells whether another page exists without a count query.
        let next_page_token = if sagas.len() > limit as usize {
            sagas.truncate(limit as usize);
            sagas.last().map(|s| s.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let sagas = sagas
            .iter()
            .map(|s| pb::SagaSummary {
                id: s.id.to_string(),
                definition: s.definition.clone(),
                definition_version: s.definition_version,
                status: status_to_pb(s.state.status) as i32,
                current_step: current_step(&self.registry, s),
                created_at: Some(timestamp(s.created_at)),
                updated_at: Some(timestamp(s.updated_at)),
                error: s.state.error.clone().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListSagasResponse {
            sagas,
            next_page_token,
        }))
    }

    async fn report_step_result(
        &self,
        req: Request<pb::ReportStepResultRequest>,
    ) -> Result<Response<pb::ReportStepResultResponse>, Status> {
        let req = req.into_inner();
        let command_id = parse_id("command_id", &req.command_id)?;
        let outcome = match pb::Outcome::try_from(req.outcome) {
            Ok(pb::Outcome::Success) => engine::Outcome::Success {
                output: if req.output_json.trim().is_empty() {
                    Value::Null
                } else {
                    parse_json("output_json", &req.output_json)?
                },
            },
            Ok(pb::Outcome::Failure) => {
                if req.reason.trim().is_empty() {
                    return Err(Status::invalid_argument("a failure needs a reason"));
                }
                engine::Outcome::Failure {
                    reason: req.reason,
                    retryable: req.retryable,
                }
            }
            _ => {
                return Err(Status::invalid_argument(
                    "outcome must be OUTCOME_SUCCESS or OUTCOME_FAILURE",
                ));
            }
        };
        let result = self
            .store
            .apply_reply(
                &self.registry,
                command_id,
                outcome,
                OffsetDateTime::now_utc(),
            )
            .await
            .map_err(status_of)?;
        match result {
            ReplyResult::Applied => Ok(Response::new(pb::ReportStepResultResponse {
                applied: true,
            })),
            ReplyResult::Duplicate => Ok(Response::new(pb::ReportStepResultResponse {
                applied: false,
            })),
            ReplyResult::UnknownCommand => Err(Status::not_found(format!(
                "no command with id {command_id} was sent"
            ))),
        }
    }
}

fn current_step(registry: &Registry, saga: &store::SagaRecord) -> String {
    if saga.state.status.is_terminal() {
        return String::new();
    }
    registry
        .get(&saga.definition, saga.definition_version)
        .and_then(|d| d.steps.get(saga.state.step).map(|s| s.name.clone()))
        .unwrap_or_default()
}

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

pub fn status_to_pb(s: engine::Status) -> pb::SagaStatus {
    match s {
        engine::Status::Running => pb::SagaStatus::Running,
        engine::Status::Compensating => pb::SagaStatus::Compensating,
        engine::Status::Completed => pb::SagaStatus::Completed,
        engine::Status::Compensated => pb::SagaStatus::Compensated,
        engine::Status::NeedsOperator => pb::SagaStatus::NeedsOperator,
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
    })
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
    }
}

fn history_to_pb(h: store::HistoryRecord) -> pb::HistoryEvent {
    pb::HistoryEvent {
        seq: h.seq,
        at: Some(timestamp(h.at)),
        kind: h.kind,
        step: h.step.unwrap_or_default(),
        command_id: h.command_id.map(|c| c.to_string()).unwrap_or_default(),
        detail_json: h.detail.to_string(),
    }
}
