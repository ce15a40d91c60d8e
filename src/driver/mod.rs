//! The driver: the one place a saga moves. It owns what a transition needs from the outside
//! world (the definitions, the clock, fresh ids and jitter) and what a commit tells the rest of
//! the process (metrics, the relay's wake-up, the watchers' feed), and it is the only caller of
//! the engine ([`graph::Graph::apply`] and [`graph::Graph::repair`]), to which it answers what a
//! step's condition and mapped input say on the saga's data.
//!
//! Every transition follows one sequence, written once in [`Driver::transact`]: lock the sagas,
//! find each one's definition, run the engine, stage the rows, write them, commit, then signal.
//! New sagas ([`starts`]) are the one variation: nothing to lock, and the rows are inserted.

mod starts;

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::{Notify, broadcast};
use tracing::info;
use uuid::Uuid;

use crate::breaker::CircuitSettings;
use crate::clock::Clock;
use crate::definition::{Definition, Registry};
use crate::engine::{Ctx, Event, Operator, Outcome, Repair, Status};
use crate::expr::Data;
use crate::graph::{self, DataFacts, Graph, GraphState, NoData};
use crate::metrics::Metrics;
use crate::store::{
    Flushed, ParticipantRecord, ReplyTargets, SagaRecord, Store, StoreError, Writes,
};

/// Why the driver did not do what it was asked, in the caller's terms; the API maps these to
/// gRPC statuses ([`crate::api::status_of`]).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("saga {0} not found")]
    SagaNotFound(Uuid),
    #[error("no participant named {0:?}")]
    ParticipantNotFound(String),
    /// The engine refused an operator repair: it does not fit the saga's state.
    #[error("{0}")]
    Refused(String),
    /// An idempotency key another caller used: nothing is said about its saga.
    #[error("idempotency key already used by another caller")]
    KeyOfAnotherCaller,
    /// An idempotency key already names a saga started with a different request.
    #[error("{0}")]
    KeyTaken(String),
    /// The writer of new sagas is gone: the process is stopping.
    #[error("the orchestrator is stopping")]
    Stopping,
    /// A saga the engine cannot run: its definition is not loaded, or a stored row disagrees
    /// with it. A bug or a hand edit, never the caller's fault.
    #[error("corrupt saga state: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DriverError {
    /// See [`StoreError::refused_value`].
    pub fn refused_value(&self) -> Option<String> {
        match self {
            DriverError::Store(e) => e.refused_value(),
            _ => None,
        }
    }

    /// Whether retrying cannot help: the saga's stored state is unreadable.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            DriverError::Corrupt(_) | DriverError::Store(StoreError::Corrupt(_))
        )
    }
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyResult {
    /// The reply moved the saga on.
    Applied,
    /// A late reply (its attempt had ended, or the saga had): recorded on the attempt and in
    /// the history, but it changed nothing.
    Recorded,
    /// The command had already been answered: nothing changed.
    Duplicate,
    /// No command with this id was ever sent.
    UnknownCommand,
}

/// Saga ids the change feed holds for its slowest watcher.
const WATCH_FEED: usize = 4096;

#[derive(Clone)]
pub struct Driver {
    store: Store,
    registry: Arc<Registry>,
    clock: Clock,
    circuit: CircuitSettings,
    signals: Signals,
    /// New sagas go to the writer that inserts them in groups (see [`starts`]).
    starts: tokio::sync::mpsc::Sender<starts::NewSaga>,
    start_queue: starts::Queue,
}

/// What a committed transaction tells the rest of the process.
#[derive(Clone)]
struct Signals {
    metrics: Arc<Metrics>,
    /// Signalled after every commit that wrote outbox rows: the relays of this process wait on
    /// it (rows another replica wrote are found by their polling).
    outbox_ready: Arc<Notify>,
    /// Ids of the sagas each commit changed: the one feed every `WatchSaga` stream filters.
    changed: broadcast::Sender<Uuid>,
}

impl Signals {
    /// What a batch does once its transaction has committed (never before: a rolled-back batch
    /// must not count nor wake anyone).
    fn committed(&self, flushed: Flushed) {
        for (definition, status) in &flushed.lifecycle {
            self.metrics.saga_event(definition, *status);
        }
        for s in &flushed.steps {
            self.metrics
                .step_ended(&s.participant, &s.step, &s.kind, s.outcome, s.took);
        }
        for participant in &flushed.reclosed {
            tracing::info!(participant, "circuit closed: the participant answers again");
        }
        if flushed.outbox {
            self.outbox_ready.notify_one();
        }
        for id in flushed.changed {
            // No receiver (nobody watching) is not an error.
            let _ = self.changed.send(id);
        }
    }
}

/// What a batch locks before the engine runs.
enum Lock<'a> {
    Saga(Uuid),
    Sagas(&'a [Uuid]),
    /// Up to this many sagas whose wake-up time has passed.
    Due(i64),
    /// The sagas these commands were sent for.
    Replies(&'a [Uuid]),
}

enum Locked {
    Sagas(Vec<SagaRecord>),
    Replies(ReplyTargets),
}

impl Locked {
    fn sagas(self) -> Vec<SagaRecord> {
        match self {
            Locked::Sagas(sagas) => sagas,
            Locked::Replies(targets) => targets.sagas.into_values().collect(),
        }
    }
}

/// The transitions of one transaction, staged as they are decided.
struct Batch<'d> {
    driver: &'d Driver,
    now: OffsetDateTime,
    writes: Writes,
}

impl Batch<'_> {
    fn definition(&self, record: &SagaRecord) -> Result<Arc<Definition>> {
        self.driver
            .registry
            .get(&record.definition, record.definition_version)
            .ok_or_else(|| {
                DriverError::Corrupt(format!(
                    "saga {} runs on {} version {}, which is not loaded",
                    record.id, record.definition, record.definition_version
                ))
            })
    }

    /// Runs `event` on `record`, stages what the transition wrote and moves the record to its
    /// new state (a later event for the same saga in this batch starts from it). Returns
    /// whether the state changed, and the new status.
    fn apply(
        &mut self,
        def: &Definition,
        record: &mut SagaRecord,
        event: Event,
    ) -> Result<(bool, Status)> {
        let ctx = self.driver.ctx(self.now);
        let t = with_facts(def, record, |facts| {
            Graph::new(def).apply(&record.state, event, ctx, facts)
        });
        let changed = t.state != record.state;
        let status = self.writes.stage(def, record, t, self.now)?;
        Ok((changed, status))
    }

    /// Runs an operator's repair on `record` (on `step`, by name, when the repair acts on one);
    /// `Ok(Err(why))` if the engine refused it.
    fn repair(
        &mut self,
        def: &Definition,
        record: &mut SagaRecord,
        repair: Repair,
        step: Option<&str>,
        by: &Operator,
    ) -> Result<Result<(), String>> {
        let ctx = self.driver.ctx(self.now);
        let t = with_facts(def, record, |facts| {
            Graph::new(def).repair(&record.state, repair, step, by, ctx, facts)
        });
        match t {
            Ok(t) => {
                self.writes.stage(def, record, t, self.now)?;
                Ok(Ok(()))
            }
            Err(refused) => Ok(Err(refused.0)),
        }
    }
}

/// Calls `f` with what the saga's data says about its definition's conditions and mappings:
/// nothing to read for a definition without any (no outputs are gathered for it).
fn with_facts<R>(
    def: &Definition,
    record: &SagaRecord,
    f: impl FnOnce(&dyn graph::Facts) -> R,
) -> R {
    if !def.needs_data() {
        return f(&NoData);
    }
    let outputs: Vec<Option<Value>> = def
        .steps
        .iter()
        .map(|s| record.outputs.get(&s.name).cloned())
        .collect();
    let data = Data {
        input: &record.input,
        saga_id: record.id,
        outputs: &outputs,
    };
    f(&DataFacts { def, data })
}

impl Driver {
    /// A driver on the system clock with the default circuit settings; the writer of new sagas
    /// ([`Driver::start_writer`]) must run for [`Driver::start_saga`] to return.
    pub fn new(store: Store, registry: Arc<Registry>) -> Driver {
        let (starts, start_queue) = starts::queue();
        Driver {
            store,
            registry,
            clock: Clock::System,
            circuit: CircuitSettings::default(),
            signals: Signals {
                metrics: Arc::new(Metrics::new()),
                outbox_ready: Arc::new(Notify::new()),
                changed: broadcast::channel(WATCH_FEED).0,
            },
            starts,
            start_queue,
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> Driver {
        self.clock = clock;
        self
    }

    pub fn with_circuit(mut self, circuit: CircuitSettings) -> Driver {
        self.circuit = circuit;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn circuit(&self) -> CircuitSettings {
        self.circuit
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.signals.metrics
    }

    /// Resolves when outbox rows may be waiting: a permit is kept if no relay is waiting, so a
    /// commit that lands while every relay is busy is not missed.
    pub async fn outbox_ready(&self) {
        self.signals.outbox_ready.notified().await
    }

    /// Wakes a relay, e.g. when held commands may go out again.
    pub fn wake_relay(&self) {
        self.signals.outbox_ready.notify_one();
    }

    /// Ids of the sagas this process's commits change, as they commit. A receiver that falls
    /// more than the feed's capacity behind gets `Lagged` and must re-read what it watches.
    pub fn saga_changes(&self) -> broadcast::Receiver<Uuid> {
        self.signals.changed.subscribe()
    }

    /// The outside world's inputs to one transition: now, a fresh command id, random jitter.
    fn ctx(&self, now: OffsetDateTime) -> Ctx {
        Ctx {
            now,
            next_command_id: Uuid::now_v7(),
            jitter: rand::random::<f64>(),
        }
    }

    /// The one sequence of every transition of existing sagas: lock, decide (the engine runs in
    /// `decide`, through the [`Batch`]), write, commit, then tell the rest of the process.
    async fn transact<R>(
        &self,
        lock: Lock<'_>,
        decide: impl FnOnce(&mut Batch<'_>, Locked) -> Result<R>,
    ) -> Result<R> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let locked = match lock {
            Lock::Saga(id) => Locked::Sagas(
                tx.lock_saga(id)
                    .await?
                    .into_iter()
                    .collect::<Vec<SagaRecord>>(),
            ),
            Lock::Sagas(ids) => Locked::Sagas(tx.lock_sagas(ids).await?),
            Lock::Due(limit) => Locked::Sagas(tx.lock_due(now, limit).await?),
            Lock::Replies(command_ids) => {
                Locked::Replies(tx.lock_reply_targets(command_ids).await?)
            }
        };
        let mut batch = Batch {
            driver: self,
            now,
            writes: Writes::default(),
        };
        let result = decide(&mut batch, locked)?;
        let flushed = tx.write(batch.writes, now, self.circuit).await?;
        tx.commit().await?;
        self.signals.committed(flushed);
        Ok(result)
    }

    /// The task that writes new sagas (see [`starts`]); `start_saga` waits until it runs.
    pub fn start_writer(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + use<> {
        starts::run_writer(self.clone(), self.start_queue.clone(), shutdown)
    }

    /// Starts a saga, or returns the one an earlier call with the same idempotency key started.
    /// Returns once the saga is committed; concurrent calls share one statement and one commit,
    /// written by the [`start_writer`](Driver::start_writer) task, which must be running.
    pub async fn start_saga(
        &self,
        def: &Arc<Definition>,
        input: Value,
        idempotency_key: Option<&str>,
        traceparent: Option<String>,
        started_by: Option<&str>,
    ) -> Result<(Uuid, bool, Status)> {
        let id = Uuid::now_v7();
        // Kept to tell a retry (same input) from a different request reusing the key.
        let keyed_input = idempotency_key.map(|_| input.clone());
        // Its times are those of the group it is written with.
        let now = self.clock.now();
        let record = SagaRecord {
            id,
            definition: def.name.clone(),
            definition_version: def.version,
            state: GraphState::new(def),
            input,
            outputs: json!({}),
            idempotency_key: idempotency_key.map(str::to_owned),
            created_at: now,
            updated_at: now,
            current_steps: Vec::new(),
            traceparent,
            started_by: started_by.map(str::to_owned),
        };
        let (done, written) = tokio::sync::oneshot::channel();
        let new = starts::NewSaga {
            def: def.clone(),
            record,
            done,
        };
        // Either side gone means the process is stopping.
        self.starts
            .send(new)
            .await
            .map_err(|_| DriverError::Stopping)?;
        let (inserted, status) = written.await.map_err(|_| DriverError::Stopping)??;
        if inserted {
            return Ok((id, true, status));
        }
        let (Some(key), Some(input)) = (idempotency_key, keyed_input) else {
            return Err(DriverError::Corrupt(
                "a saga without an idempotency key was not inserted".into(),
            ));
        };
        let existing = self.store.saga_by_key(key, &input).await?.ok_or_else(|| {
            DriverError::Corrupt("the saga holding an idempotency key vanished".into())
        })?;
        if existing.started_by.as_deref() != started_by {
            return Err(DriverError::KeyOfAnotherCaller);
        }
        if existing.definition != def.name {
            return Err(DriverError::KeyTaken(format!(
                "idempotency key already used by saga {} of definition {}",
                existing.id, existing.definition
            )));
        }
        if !existing.same_input {
            return Err(DriverError::KeyTaken(format!(
                "idempotency key already used by saga {} with a different input",
                existing.id
            )));
        }
        Ok((existing.id, false, existing.status))
    }

    /// Applies a participant's reply. Safe to call any number of times for the same reply.
    pub async fn apply_reply(&self, command_id: Uuid, outcome: Outcome) -> Result<ReplyResult> {
        let results = self.apply_replies(vec![(command_id, outcome)]).await?;
        results
            .into_iter()
            .next()
            .ok_or_else(|| DriverError::Corrupt("a reply was applied without a result".into()))
    }

    /// Applies a batch of replies in one transaction (one result per reply, in order). The
    /// sagas are locked in id order, so concurrent batches cannot deadlock; two replies for the
    /// same saga apply one after the other; the same reply twice applies once.
    pub async fn apply_replies(&self, replies: Vec<(Uuid, Outcome)>) -> Result<Vec<ReplyResult>> {
        let ids: Vec<Uuid> = replies.iter().map(|(id, _)| *id).collect();
        self.transact(Lock::Replies(&ids), |batch, locked| {
            let Locked::Replies(mut targets) = locked else {
                return Err(DriverError::Corrupt("reply targets not locked".into()));
            };
            let mut seen = HashSet::new();
            let mut results = Vec::with_capacity(replies.len());
            for (command_id, outcome) in replies {
                let Some(sent) = targets.commands.get(&command_id).copied() else {
                    results.push(ReplyResult::UnknownCommand);
                    continue;
                };
                if targets.answered.contains(&command_id) || !seen.insert(command_id) {
                    results.push(ReplyResult::Duplicate);
                    continue;
                }
                let record = targets
                    .sagas
                    .get_mut(&sent.saga_id)
                    .ok_or_else(|| DriverError::Corrupt("locked saga vanished".into()))?;
                let def = batch.definition(record)?;
                let event = Event::Reply {
                    command_id,
                    outcome,
                    answers: Some((sent.step, sent.kind)),
                };
                let (changed, _) = batch.apply(&def, record, event)?;
                results.push(if changed {
                    ReplyResult::Applied
                } else {
                    ReplyResult::Recorded
                });
            }
            Ok(results)
        })
        .await
    }

    /// Delivers the timer event to up to `limit` sagas whose wake-up time has passed by the
    /// driver's clock. Rows locked by another replica are skipped, not waited for. Returns how
    /// many fired.
    pub async fn fire_due_timers(&self, limit: i64) -> Result<usize> {
        self.transact(Lock::Due(limit), |batch, locked| {
            let sagas = locked.sagas();
            let fired = sagas.len();
            for mut record in sagas {
                let def = batch.definition(&record)?;
                batch.apply(&def, &mut record, Event::Timer)?;
            }
            Ok(fired)
        })
        .await
    }

    /// An operator's repair of one saga, recorded in its history with `by`. `step` names the
    /// step a retry or skip acts on; it may be left out when only one step is current.
    pub async fn repair(
        &self,
        id: Uuid,
        repair: Repair,
        step: Option<&str>,
        by: &Operator,
    ) -> Result<()> {
        self.transact(Lock::Saga(id), |batch, locked| {
            let mut record = locked
                .sagas()
                .into_iter()
                .next()
                .ok_or(DriverError::SagaNotFound(id))?;
            let def = batch.definition(&record)?;
            batch
                .repair(&def, &mut record, repair, step, by)?
                .map_err(DriverError::Refused)
        })
        .await
    }

    /// "Retry now" for each saga, in one transaction. Sagas whose state refuses it (finished or
    /// repaired meanwhile) are skipped, not failed. Returns (retried, skipped).
    pub async fn retry_batch(&self, ids: &[Uuid], by: &Operator) -> Result<(Vec<Uuid>, Vec<Uuid>)> {
        let (retried, mut skipped) = self
            .transact(Lock::Sagas(ids), |batch, locked| {
                let (mut retried, mut skipped) = (Vec::new(), Vec::new());
                for mut record in locked.sagas() {
                    let def = batch.definition(&record)?;
                    // Each current step of a saga with parallel branches is retried in turn
                    // (each transition starts from the one before); those whose state refuses
                    // a retry (an action only awaited while compensating) are left as they are.
                    let mut any = false;
                    for step in record.current_steps.clone() {
                        let repair = Repair::RetryNow;
                        any |= batch
                            .repair(&def, &mut record, repair, Some(&step), by)?
                            .is_ok();
                    }
                    match any {
                        true => retried.push(record.id),
                        false => skipped.push(record.id),
                    }
                }
                Ok((retried, skipped))
            })
            .await?;
        // Sagas that vanished between the match and the lock count as skipped too.
        let vanished: Vec<Uuid> = ids
            .iter()
            .filter(|id| !retried.contains(id) && !skipped.contains(id))
            .copied()
            .collect();
        skipped.extend(vanished);
        Ok((retried, skipped))
    }

    /// An operator holds or releases dispatch to a participant.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
        actor: &str,
        reason: &str,
    ) -> Result<ParticipantRecord> {
        let not_found = || DriverError::ParticipantNotFound(name.to_string());
        if !self.store.set_paused(name, paused, actor, reason).await? {
            return Err(not_found());
        }
        info!(
            participant = name,
            paused, actor, reason, "participant dispatch changed by an operator"
        );
        if !paused {
            // The held commands can go now (other replicas' relays find them on their next poll).
            self.wake_relay();
        }
        self.store.participant(name).await?.ok_or_else(not_found)
    }
}
