//! `saga.v1.AdminService`: repairs, bulk redrive, participant dispatch control, counts and the
//! loaded definitions.
//!
//! Every repair names its operator (the caller's token) and needs a reason; both land in the
//! saga's history. The engine decides whether a repair fits the saga's state; when it does not,
//! the call fails with `FAILED_PRECONDITION` and the engine's explanation.

use std::collections::BTreeMap;

use serde_json::Value;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::auth::caller;
use super::convert::{
    DefinitionState, definition_to_pb, filter_from_pb, participant_to_pb, saga_to_pb, status_to_pb,
    timestamp,
};
use super::{parse_id, parse_json, status_of};
use crate::definition::{Definition, Registry};
use crate::driver::{Driver, DriverError};
use crate::engine::{Operator, Repair};
use crate::proto::v1 as pb;

const MAX_REASON: usize = 2000;
const DEFAULT_REDRIVE_BATCH: u32 = 100;
const MAX_REDRIVE_BATCH: u32 = 1000;

pub struct AdminApi {
    driver: Driver,
}

impl AdminApi {
    pub fn new(driver: Driver) -> Self {
        AdminApi { driver }
    }

    async fn repair<T>(
        &self,
        req: &Request<T>,
        saga_id: &str,
        reason: &str,
        step: &str,
        repair: Repair,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let id = parse_id("saga_id", saga_id)?;
        let by = operator(req, reason)?;
        let step = step.trim();
        let step = (!step.is_empty()).then_some(step);
        tracing::info!(saga_id = %id, action = repair.name(), step, actor = %by.actor, reason = %by.reason, "operator repair");
        self.driver
            .repair(id, repair, step, &by)
            .await
            .map_err(status_of)?;
        let (saga, attempts, history) = self
            .driver
            .store()
            .get_saga(id)
            .await
            .map_err(status_of)?
            .ok_or_else(|| status_of(DriverError::SagaNotFound(id)))?;
        Ok(Response::new(pb::RepairResponse {
            saga: Some(saga_to_pb(self.driver.registry(), saga, attempts, history)),
        }))
    }
}

fn operator<T>(req: &Request<T>, reason: &str) -> Result<Operator, Status> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(Status::invalid_argument(
            "a reason is required: it is recorded in the saga's history",
        ));
    }
    if reason.len() > MAX_REASON {
        return Err(Status::invalid_argument(format!(
            "reason is longer than {MAX_REASON} bytes"
        )));
    }
    Ok(Operator {
        actor: caller(req).name,
        reason: reason.to_string(),
    })
}

/// A definition version with what the registry knows of it and its unfinished sagas.
fn definition_view(
    registry: &Registry,
    def: &Definition,
    active: &BTreeMap<(String, u32), u64>,
) -> pb::Definition {
    let state = DefinitionState {
        retired: registry.is_retired_version(&def.name, def.version),
        current: registry
            .latest(&def.name)
            .is_some_and(|d| d.version == def.version),
        active_sagas: active
            .get(&(def.name.clone(), def.version))
            .copied()
            .unwrap_or(0),
    };
    definition_to_pb(def, state)
}

type ProgressStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RedriveProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    type RedriveStream = ProgressStream;

    async fn retry_step(
        &self,
        req: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let r = req.get_ref();
        let (id, reason, step) = (r.saga_id.clone(), r.reason.clone(), r.step.clone());
        self.repair(&req, &id, &reason, &step, Repair::RetryNow)
            .await
    }

    async fn skip_step(
        &self,
        req: Request<pb::SkipStepRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let r = req.get_ref();
        let output = if r.output_json.trim().is_empty() {
            Value::Null
        } else {
            parse_json("output_json", &r.output_json)?
        };
        let (id, reason, step) = (r.saga_id.clone(), r.reason.clone(), r.step.clone());
        self.repair(&req, &id, &reason, &step, Repair::Skip { output })
            .await
    }

    async fn compensate_saga(
        &self,
        req: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let (id, reason) = (req.get_ref().saga_id.clone(), req.get_ref().reason.clone());
        self.repair(&req, &id, &reason, "", Repair::Compensate)
            .await
    }

    async fn resolve_saga(
        &self,
        req: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let r = req.get_ref();
        let (id, reason, step) = (r.saga_id.clone(), r.reason.clone(), r.step.clone());
        self.repair(&req, &id, &reason, &step, Repair::Resolve)
            .await
    }

    async fn redrive(
        &self,
        req: Request<pb::RedriveRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let by = operator(&req, &req.get_ref().reason)?;
        let r = req.into_inner();
        let f = r.filter.unwrap_or_default();
        let filter = filter_from_pb(&f, self.driver.clock().now())?;
        let narrowed = !filter.statuses.is_empty()
            || filter.definition.is_some()
            || filter.stuck_since.is_some()
            || filter.participant.is_some()
            || filter.step.is_some()
            || filter.created_after.is_some()
            || filter.created_before.is_some()
            || filter.updated_after.is_some()
            || filter.updated_before.is_some()
            || filter.error_contains.is_some();
        if !narrowed {
            return Err(Status::invalid_argument(
                "the filter selects every saga: narrow it (status, definition, stuck_for, participant, step, time range or error)",
            ));
        }
        let batch = match r.batch_size {
            0 => DEFAULT_REDRIVE_BATCH,
            n if n <= MAX_REDRIVE_BATCH => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "batch_size {n} exceeds {MAX_REDRIVE_BATCH}"
                )));
            }
        } as usize;
        let ids = self
            .driver
            .store()
            .matching_ids(&filter, (r.limit > 0).then_some(r.limit))
            .await
            .map_err(status_of)?;
        let matched = ids.len() as u64;
        tracing::info!(matched, dry_run = r.dry_run, actor = %by.actor, reason = %by.reason, "redrive");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let driver = self.driver.clone();
        let dry_run = r.dry_run;
        tokio::spawn(async move {
            let as_strings = |ids: &[Uuid]| ids.iter().map(Uuid::to_string).collect::<Vec<_>>();
            if dry_run || ids.is_empty() {
                let progress = pb::RedriveProgress {
                    matched,
                    retried: if dry_run { matched } else { 0 },
                    skipped: 0,
                    saga_ids: as_strings(&ids),
                    done: true,
                    skipped_ids: Vec::new(),
                };
                let _ = tx.send(Ok(progress)).await;
                return;
            }
            let (mut retried, mut skipped) = (0u64, 0u64);
            let chunks: Vec<&[Uuid]> = ids.chunks(batch).collect();
            let last = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                // Keeps going when the caller hangs up: a half-done redrive is worse than a
                // finished one nobody watched.
                match driver.retry_batch(chunk, &by).await {
                    Ok((ok, refused)) => {
                        retried += ok.len() as u64;
                        skipped += refused.len() as u64;
                        let progress = pb::RedriveProgress {
                            matched,
                            retried,
                            skipped,
                            saga_ids: as_strings(&ok),
                            done: i == last,
                            skipped_ids: as_strings(&refused),
                        };
                        let _ = tx.send(Ok(progress)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status_of(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pause_participant(
        &self,
        req: Request<pb::ParticipantRequest>,
    ) -> Result<Response<pb::Participant>, Status> {
        let by = operator(&req, &req.get_ref().reason)?;
        let name = req.get_ref().participant.trim();
        let p = self
            .driver
            .set_paused(name, true, &by.actor, &by.reason)
            .await
            .map_err(status_of)?;
        Ok(Response::new(participant_to_pb(p)))
    }

    async fn resume_participant(
        &self,
        req: Request<pb::ParticipantRequest>,
    ) -> Result<Response<pb::Participant>, Status> {
        let reason = Some(req.get_ref().reason.trim())
            .filter(|r| !r.is_empty())
            .unwrap_or("resumed");
        let by = operator(&req, reason)?;
        let name = req.get_ref().participant.trim();
        let p = self
            .driver
            .set_paused(name, false, &by.actor, &by.reason)
            .await
            .map_err(status_of)?;
        Ok(Response::new(participant_to_pb(p)))
    }

    async fn list_participants(
        &self,
        _req: Request<pb::ListParticipantsRequest>,
    ) -> Result<Response<pb::ListParticipantsResponse>, Status> {
        let participants = self
            .driver
            .store()
            .participants()
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::ListParticipantsResponse {
            participants: participants.into_iter().map(participant_to_pb).collect(),
        }))
    }

    async fn count_sagas(
        &self,
        req: Request<pb::CountSagasRequest>,
    ) -> Result<Response<pb::CountSagasResponse>, Status> {
        let definition = Some(req.get_ref().definition.trim()).filter(|d| !d.is_empty());
        let (by_status, by_step) = self
            .driver
            .store()
            .counts(definition)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::CountSagasResponse {
            by_status: by_status
                .into_iter()
                .map(|(s, count)| pb::StatusCount {
                    status: status_to_pb(s) as i32,
                    count,
                })
                .collect(),
            by_step: by_step
                .into_iter()
                .map(|c| pb::StepCount {
                    definition: c.definition,
                    step: c.step,
                    participant: c.participant,
                    status: status_to_pb(c.status) as i32,
                    count: c.count,
                    oldest_updated_at: Some(timestamp(c.oldest_updated_at)),
                })
                .collect(),
        }))
    }

    async fn list_definitions(
        &self,
        req: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let name = Some(req.get_ref().name.trim()).filter(|n| !n.is_empty());
        let registry = self.driver.registry();
        let active = self
            .driver
            .store()
            .active_per_version(name)
            .await
            .map_err(status_of)?;
        let mut defs: Vec<_> = match name {
            Some(name) => registry.versions(name).collect(),
            None => registry.all().collect(),
        };
        // By name, then newest first: the version a reader looks for first is on top.
        defs.sort_by(|a, b| a.name.cmp(&b.name).then(b.version.cmp(&a.version)));
        Ok(Response::new(pb::ListDefinitionsResponse {
            definitions: defs
                .into_iter()
                .map(|d| definition_view(registry, d, &active))
                .collect(),
        }))
    }

    async fn get_definition(
        &self,
        req: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::Definition>, Status> {
        let name = req.get_ref().name.trim();
        let version = req.get_ref().version;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        let registry = self.driver.registry();
        let def = match version {
            0 => registry.latest(name).or_else(|| registry.newest(name)),
            v => registry.get(name, v),
        };
        let Some(def) = def else {
            let quoted = crate::contract::quote(name);
            let known: Vec<String> = registry
                .versions(name)
                .rev()
                .map(|d| d.version.to_string())
                .collect();
            return Err(Status::not_found(if known.is_empty() {
                let mut names: Vec<&str> = registry.all().map(|d| d.name.as_str()).collect();
                names.dedup();
                format!(
                    "saga definition {quoted:?} does not exist; known: {}",
                    names.join(", ")
                )
            } else {
                format!(
                    "saga definition {quoted:?} has no version {version}; known versions: {}",
                    known.join(", ")
                )
            }));
        };
        let active = self
            .driver
            .store()
            .active_per_version(Some(name))
            .await
            .map_err(status_of)?;
        Ok(Response::new(definition_view(registry, &def, &active)))
    }
}
