//! The gRPC API (tonic): `saga.v1.SagaService` for clients and participants, `AdminService`
//! for operators ([`admin`]), bearer-token authentication ([`auth`]), and the proto ⇄ domain
//! conversions ([`convert`]).
//!
//! Requests are validated here and refused with `INVALID_ARGUMENT` / `NOT_FOUND` and a message
//! that says what is wrong; driver and store errors map to statuses in one place
//! ([`status_of`]) and never leak SQL to callers.

pub mod admin;
pub mod auth;
pub mod convert;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde_json::Value;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::driver::{Driver, DriverError, ReplyResult};
use crate::engine;
use crate::proto::v1 as pb;
use crate::store::StoreError;
use auth::{Caller, Scope, caller};
use convert::{filter_from_pb, history_to_pb, saga_to_pb, status_to_pb, summary_to_pb};

/// Largest saga input accepted, in bytes of JSON.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 256;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;
/// A watch re-reads its saga when a commit of this process changed it; this is for the commits
/// of other replicas sharing the database, which no signal of ours announces.
const WATCH_FALLBACK: Duration = Duration::from_secs(2);
/// `WatchSaga` streams open at once per token, unless configured otherwise.
pub const DEFAULT_MAX_WATCHES_PER_TOKEN: usize = 16;

pub struct SagaApi {
    driver: Driver,
    max_watches: usize,
    /// Open watch streams per token name.
    watches: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl SagaApi {
    pub fn new(driver: Driver) -> Self {
        SagaApi {
            driver,
            max_watches: DEFAULT_MAX_WATCHES_PER_TOKEN,
            watches: Default::default(),
        }
    }

    /// At most `max` open `WatchSaga` streams per token (RESOURCE_EXHAUSTED beyond).
    pub fn with_watch_limit(mut self, max: usize) -> Self {
        self.max_watches = max;
        self
    }

    fn open_watch(&self, token: &str) -> Result<WatchSlot, Status> {
        let mut open = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(token.to_string()).or_default();
        if *count >= self.max_watches {
            return Err(Status::resource_exhausted(format!(
                "token {token:?} already has {} open watch streams; close one first",
                self.max_watches
            )));
        }
        *count += 1;
        Ok(WatchSlot {
            watches: self.watches.clone(),
            token: token.to_string(),
        })
    }
}

/// One open watch stream, counted against its token until dropped (the stream ended or the
/// caller hung up).
struct WatchSlot {
    watches: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    token: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.token) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.token);
            }
        }
    }
}

/// The single mapping from driver and store errors to gRPC statuses.
pub fn status_of(e: impl Into<DriverError>) -> Status {
    let e = e.into();
    if let Some(refused) = e.refused_value() {
        return Status::invalid_argument(crate::contract::reason(&format!(
            "the database cannot store a value of this request: {refused}"
        )));
    }
    match e {
        e @ (DriverError::SagaNotFound(_) | DriverError::ParticipantNotFound(_)) => {
            Status::not_found(e.to_string())
        }
        e @ DriverError::KeyOfAnotherCaller => Status::invalid_argument(e.to_string()),
        DriverError::KeyTaken(m) => Status::already_exists(m),
        DriverError::Refused(m) | DriverError::Store(StoreError::DefinitionConflict(m)) => {
            Status::failed_precondition(m)
        }
        e @ (DriverError::Store(StoreError::Database(_)) | DriverError::Stopping) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        e @ (DriverError::Corrupt(_)
        | DriverError::Store(StoreError::Corrupt(_) | StoreError::Migrate(_))) => {
            tracing::error!(error = %e, "internal error");
            Status::internal("internal error; see the orchestrator's logs")
        }
    }
}

/// A saga that is not there, as the API reports it.
fn saga_not_found(id: Uuid) -> Status {
    status_of(DriverError::SagaNotFound(id))
}

fn parse_id(field: &str, s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        Status::invalid_argument(format!(
            "{field} {:?} is not a UUID",
            crate::contract::quote(s)
        ))
    })
}

fn parse_json(field: &str, s: &str) -> Result<Value, Status> {
    if s.len() > MAX_INPUT_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_INPUT_BYTES}",
            s.len()
        )));
    }
    // The parser's messages quote the offending value whole.
    let value = serde_json::from_str(s).map_err(|e| {
        Status::invalid_argument(crate::contract::reason(&format!(
            "{field} is not valid JSON: {e}"
        )))
    })?;
    if crate::contract::json_depth(&value) > crate::contract::MAX_JSON_DEPTH {
        return Err(Status::invalid_argument(format!(
            "{field} nests deeper than {} levels",
            crate::contract::MAX_JSON_DEPTH
        )));
    }
    Ok(value)
}

/// A participant token sees only the sagas it started; operators see all. (Without tokens every
/// caller is an anonymous operator.)
fn own_sagas_only(caller: &Caller) -> Option<String> {
    (caller.scope == Scope::Participant).then(|| caller.name.clone())
}

/// Someone else's saga is reported as missing, so ids do not leak across participants.
fn readable(caller: &Caller, id: Uuid, started_by: Option<&str>) -> Result<(), Status> {
    match own_sagas_only(caller) {
        Some(name) if started_by != Some(name.as_str()) => {
            Err(Status::not_found(format!("saga {id} not found")))
        }
        _ => Ok(()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::HistoryEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::saga_service_server::SagaService for SagaApi {
    type WatchSagaStream = EventStream;

    async fn watch_saga(
        &self,
        req: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let id = parse_id("saga_id", &req.get_ref().saga_id)?;
        let mut after = req.get_ref().after_seq;
        // Fails now, as a status, if the saga does not exist (for this caller).
        let owner = self
            .driver
            .store()
            .saga_owner(id)
            .await
            .map_err(status_of)?
            .ok_or_else(|| saga_not_found(id))?;
        let who = caller(&req);
        readable(&who, id, owner.as_deref())?;
        let slot = self.open_watch(&who.name)?;
        let store = self.driver.store().clone();
        // Subscribed before the first read, so no commit falls between the read and the wait.
        let mut changes = self.driver.saga_changes();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                // Read the status before the events: events written after a terminal status
                // was seen are still sent on this round, so none is lost at the end.
                let status = store.saga_status(id).await;
                let events = store.history_after(id, after).await;
                let (status, events) = match (status, events) {
                    (Ok(Some(s)), Ok(e)) => (s, e),
                    (Ok(None), _) => {
                        let _ = tx.send(Err(saga_not_found(id))).await;
                        return;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = tx.send(Err(status_of(e))).await;
                        return;
                    }
                };
                for event in events {
                    after = event.seq;
                    if tx.send(Ok(history_to_pb(event))).await.is_err() {
                        return; // The caller hung up.
                    }
                }
                if status.is_terminal() {
                    return;
                }
                let fallback = tokio::time::sleep(WATCH_FALLBACK);
                tokio::pin!(fallback);
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = &mut fallback => break,
                        changed = changes.recv() => match changed {
                            Ok(changed) if changed == id => break,
                            Ok(_) => {}
                            // Missed ids may include ours: read again.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                            // Only when the store is gone; the fallback still ends the wait.
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                (&mut fallback).await;
                                break;
                            }
                        },
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn start_saga(
        &self,
        req: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        let who = caller(&req);
        let started_by = (who.name != "anonymous").then_some(who.name);
        let req = req.into_inner();
        let name = req.definition.trim();
        if name.is_empty() {
            return Err(Status::invalid_argument("definition is required"));
        }
        let registry = self.driver.registry();
        let def = registry.latest(name).ok_or_else(|| {
            let known: Vec<_> = registry.startable_names().collect();
            let why = if registry.is_retired(name) {
                "is retired (no file of it was loaded at start-up; its running sagas still finish)"
            } else {
                "does not exist"
            };
            Status::not_found(format!(
                "saga definition {:?} {why}; known: {}",
                crate::contract::quote(name),
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
            .driver
            .start_saga(
                &def,
                input,
                key,
                crate::telemetry::traceparent(&tracing::Span::current()),
                started_by.as_deref(),
            )
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
        let (saga, attempts, history) = self
            .driver
            .store()
            .get_saga(id)
            .await
            .map_err(status_of)?
            .ok_or_else(|| saga_not_found(id))?;
        readable(&caller(&req), id, saga.started_by.as_deref())?;
        Ok(Response::new(saga_to_pb(
            self.driver.registry(),
            saga,
            attempts,
            history,
        )))
    }

    async fn list_sagas(
        &self,
        req: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let only_own = own_sagas_only(&caller(&req));
        let req = req.into_inner();
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
        let mut filter = filter_from_pb(&req, self.driver.clock().now())?;
        filter.started_by = only_own;
        filter.before = before;
        filter.limit = limit + 1;
        let mut sagas = self
            .driver
            .store()
            .list_sagas(&filter)
            .await
            .map_err(status_of)?;
        // One extra row tells whether another page exists without a count query.
        let next_page_token = if sagas.len() > limit as usize {
            sagas.truncate(limit as usize);
            sagas.last().map(|s| s.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let sagas = sagas.into_iter().map(summary_to_pb).collect();
        Ok(Response::new(pb::ListSagasResponse {
            sagas,
            next_page_token,
        }))
    }

    async fn report_step_result(
        &self,
        req: Request<pb::ReportStepResultRequest>,
    ) -> Result<Response<pb::ReportStepResultResponse>, Status> {
        let bound = req.extensions().get::<auth::BoundParticipants>().cloned();
        let req = req.into_inner();
        let command_id = parse_id("command_id", &req.command_id)?;
        if let Some(auth::BoundParticipants(allowed)) = bound {
            // Checked against the command as sent, so a token cannot answer for another service.
            match self
                .driver
                .store()
                .command_participant(command_id)
                .await
                .map_err(status_of)?
            {
                Some(p) if allowed.contains(&p) => {}
                Some(p) => {
                    return Err(Status::permission_denied(format!(
                        "this token may not report results of commands sent to {p:?}"
                    )));
                }
                None => {
                    return Err(Status::not_found(format!(
                        "no command with id {command_id} was sent"
                    )));
                }
            }
        }
        let outcome = match pb::Outcome::try_from(req.outcome) {
            Ok(pb::Outcome::Success) => engine::Outcome::Success {
                output: if req.output_json.trim().is_empty() {
                    Value::Null
                } else {
                    parse_json("output_json", &req.output_json)?
                },
            },
            Ok(pb::Outcome::Failure) => engine::Outcome::Failure {
                reason: if req.reason.trim().is_empty() {
                    crate::contract::NO_REASON.into()
                } else {
                    req.reason
                },
                retryable: req.retryable,
            },
            _ => {
                return Err(Status::invalid_argument(
                    "outcome must be OUTCOME_SUCCESS or OUTCOME_FAILURE",
                ));
            }
        };
        let result = self
            .driver
            .apply_reply(command_id, outcome)
            .await
            .map_err(status_of)?;
        match result {
            ReplyResult::Applied => Ok(Response::new(pb::ReportStepResultResponse {
                applied: true,
            })),
            ReplyResult::Duplicate | ReplyResult::Recorded => {
                Ok(Response::new(pb::ReportStepResultResponse {
                    applied: false,
                }))
            }
            ReplyResult::UnknownCommand => Err(Status::not_found(format!(
                "no command with id {command_id} was sent"
            ))),
        }
    }
}
