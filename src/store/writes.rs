//! The write side of transitions, batched: the effects of any number of transitions (one saga's,
//! or a whole batch of replies or due timers) are staged in memory and written by one statement
//! (data-modifying CTEs, one per table), so a batch costs one round trip however large it is:
//! PostgreSQL's cost here is per statement far more than per row.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::{Map, Value};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Result, SagaRecord, StoreError, StoredGraph, participants};
use crate::breaker::{self, CircuitSettings};
use crate::contract::{self, CommandBody, render};
use crate::definition::Definition;
use crate::engine::{AttemptEnd, Kind, Outcome, Status};
use crate::graph::{self, Effect, GraphState};

/// The new state of one saga; several transitions of the same saga in a batch coalesce here.
struct SagaWrite {
    id: Uuid,
    status: &'static str,
    /// [`StoredGraph`] as JSON.
    graph: Value,
    wake_at: Option<OffsetDateTime>,
    error: Option<String>,
    /// Outputs added by this batch, merged into the stored ones.
    new_outputs: Map<String, Value>,
    current_steps: Vec<String>,
    current_participants: Vec<String>,
    command_ids: Vec<Uuid>,
}

/// One row of `new_attempts` (see [`shared_writes!`]).
struct NewAttempt {
    command_id: Uuid,
    saga_id: Uuid,
    step_index: i32,
    step: String,
    participant: String,
    kind: &'static str,
    attempt: i32,
    deadline: OffsetDateTime,
}

/// One row of `history`.
struct HistoryEntry {
    saga_id: Uuid,
    kind: &'static str,
    step: Option<String>,
    command_id: Option<Uuid>,
    detail: Value,
}

/// One row of `outgoing` (the outbox).
struct OutboxRow {
    saga_id: Uuid,
    exchange: &'static str,
    routing_key: String,
    message_id: Uuid,
    properties: Value,
    body: Vec<u8>,
}

/// One row of `ended` (the transition statement's attempts that ended).
struct Ended {
    command_id: Uuid,
    outcome: Option<&'static str>,
    output: Option<Value>,
    reason: Option<String>,
    timed_out: bool,
    superseded: bool,
    /// Whether this ending speaks for the participant's health (see the circuit breaker).
    healthy: Option<bool>,
}

/// The rows a batch of transitions writes, staged in memory until [`Tx::write`](super::Tx::write).
#[derive(Default)]
pub struct Writes {
    sagas: Vec<SagaWrite>,
    saga_index: HashMap<Uuid, usize>,
    attempts: Vec<NewAttempt>,
    ended: Vec<Ended>,
    outgoing: Vec<OutboxRow>,
    history: Vec<HistoryEntry>,
    /// (saga, definition, status) of lifecycle events, for metrics.
    lifecycle: Vec<(Uuid, String, Status)>,
}

impl Writes {
    /// Stages a transition of `record` and moves the record to its new state, so that a later
    /// transition of the same saga in this batch starts from it. Returns the new status.
    pub fn stage(
        &mut self,
        def: &Definition,
        record: &mut SagaRecord,
        t: graph::Transition,
        now: OffsetDateTime,
    ) -> Result<Status> {
        if t.is_noop() {
            return Ok(record.state.status);
        }
        let mut new_outputs = Map::new();
        for effect in t.effects {
            match effect {
                Effect::SaveOutput { step, output } => {
                    let name = step_of(def, step)?.name.clone();
                    if let Value::Object(outputs) = &mut record.outputs {
                        outputs.insert(name.clone(), output.clone());
                    }
                    new_outputs.insert(name, output);
                }
                Effect::Send(cmd) => self.command(def, record, &cmd)?,
                Effect::AttemptEnded { command_id, end } => self.end_attempt(command_id, end),
                Effect::History {
                    event,
                    step,
                    command_id,
                } => {
                    let step = step.map(|i| step_of(def, i)).transpose()?;
                    self.history.push(HistoryEntry {
                        saga_id: record.id,
                        kind: event.kind().as_str(),
                        step: step.map(|s| s.name.clone()),
                        command_id,
                        detail: event.into_detail(),
                    });
                }
                Effect::Lifecycle(status) => {
                    tracing::info!(saga_id = %record.id, definition = %def.name, status = status.as_str(), "saga lifecycle");
                    self.lifecycle_event(def, record, status, now)?;
                }
            }
        }

        let state = t.state;
        let current = state
            .current()
            .map(|i| step_of(def, i))
            .collect::<Result<Vec<_>>>()?;
        record.current_steps = current.iter().map(|s| s.name.clone()).collect();
        let write = SagaWrite {
            id: record.id,
            status: state.status.as_str(),
            graph: stored_graph(&state)?,
            wake_at: state.wake_at(),
            error: state.error.clone(),
            new_outputs,
            current_steps: record.current_steps.clone(),
            current_participants: current.iter().map(|s| s.participant.clone()).collect(),
            command_ids: state
                .steps
                .iter()
                .filter_map(graph::StepState::command_id)
                .collect(),
        };
        match self
            .saga_index
            .get(&record.id)
            .and_then(|&i| self.sagas.get_mut(i))
        {
            // An earlier transition of the same saga in this batch: the row is written once, in
            // its latest state, with the outputs of both.
            Some(earlier) => {
                let mut merged = std::mem::take(&mut earlier.new_outputs);
                merged.extend(write.new_outputs.clone());
                *earlier = SagaWrite {
                    new_outputs: merged,
                    ..write
                };
            }
            None => {
                self.saga_index.insert(record.id, self.sagas.len());
                self.sagas.push(write);
            }
        }
        let status = state.status;
        record.state = state;
        Ok(status)
    }

    fn command(
        &mut self,
        def: &Definition,
        record: &SagaRecord,
        cmd: &graph::Command,
    ) -> Result<()> {
        let step = step_of(def, cmd.step)?;
        let command = match cmd.kind {
            Kind::Action => step.action.clone(),
            Kind::Compensation => step.compensation.clone().ok_or_else(|| {
                StoreError::Corrupt(format!("step {} has no compensation to send", step.name))
            })?,
        };
        self.attempts.push(NewAttempt {
            command_id: cmd.command_id,
            saga_id: record.id,
            step_index: cmd.step as i32,
            step: step.name.clone(),
            participant: step.participant.clone(),
            kind: cmd.kind.as_str(),
            attempt: cmd.attempt as i32,
            deadline: cmd.deadline,
        });

        // A step that maps its input is sent exactly that; the others, the saga's input and
        // every output so far (the contract's body before graphs).
        let (input, outputs) = match &cmd.input {
            Some(mapped) => (mapped.clone(), Value::Object(Map::new())),
            None => (record.input.clone(), record.outputs.clone()),
        };
        let body = CommandBody {
            command_id: cmd.command_id,
            saga_id: record.id,
            definition: def.name.clone(),
            definition_version: def.version,
            step: step.name.clone(),
            kind: cmd.kind.as_str().to_string(),
            command,
            attempt: cmd.attempt,
            input,
            outputs,
        };
        let out = render::command(&step.participant, &body, record.traceparent.as_deref())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.outbox(record.id, out);
        Ok(())
    }

    /// A lifecycle event goes through the outbox too, so it is published exactly when the
    /// transition commits.
    fn lifecycle_event(
        &mut self,
        def: &Definition,
        record: &SagaRecord,
        status: Status,
        now: OffsetDateTime,
    ) -> Result<()> {
        let event = match status {
            Status::Running => "started",
            other => other.as_str(),
        };
        let body = contract::LifecycleEvent {
            event_id: Uuid::now_v7(),
            saga_id: record.id,
            definition: def.name.clone(),
            definition_version: def.version,
            event: event.to_string(),
            at: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        };
        self.lifecycle.push((record.id, def.name.clone(), status));
        let out = render::lifecycle(&body, record.traceparent.as_deref())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.outbox(record.id, out);
        Ok(())
    }

    fn outbox(&mut self, saga_id: Uuid, out: render::Outgoing) {
        self.outgoing.push(OutboxRow {
            saga_id,
            exchange: out.exchange,
            routing_key: out.routing_key,
            message_id: out.message_id,
            properties: out.properties,
            body: out.body,
        });
    }

    fn end_attempt(&mut self, command_id: Uuid, end: AttemptEnd) {
        let healthy = breaker::health(&end);
        let ended = match end {
            AttemptEnd::Replied(Outcome::Success { output }) => Ended {
                command_id,
                outcome: Some("success"),
                output: Some(output),
                reason: None,
                timed_out: false,
                superseded: false,
                healthy,
            },
            AttemptEnd::Replied(Outcome::Failure { reason, .. }) => Ended {
                command_id,
                outcome: Some("failure"),
                output: None,
                reason: Some(reason),
                timed_out: false,
                superseded: false,
                healthy,
            },
            AttemptEnd::TimedOut => Ended {
                command_id,
                outcome: None,
                output: None,
                reason: None,
                timed_out: true,
                superseded: false,
                healthy,
            },
            AttemptEnd::Superseded => Ended {
                command_id,
                outcome: None,
                output: None,
                reason: None,
                timed_out: false,
                superseded: true,
                healthy,
            },
        };
        // Two endings of one attempt in one batch (a late success supersedes the newer attempt,
        // whose own reply is in the same batch) must both be kept: PostgreSQL updates a row
        // joined twice only once, with either of the two.
        match self.ended.iter_mut().find(|e| e.command_id == command_id) {
            Some(earlier) => {
                earlier.outcome = earlier.outcome.or(ended.outcome);
                earlier.output = earlier.output.take().or(ended.output);
                earlier.reason = earlier.reason.take().or(ended.reason);
                earlier.timed_out |= ended.timed_out;
                earlier.superseded |= ended.superseded;
                earlier.healthy = earlier.healthy.or(ended.healthy);
            }
            None => self.ended.push(ended),
        }
    }

    /// Writes a transition batch in the caller's transaction: one statement for every table
    /// (a round trip each would cost more than the writes themselves), then one `UPDATE` per
    /// participant that failed, which is rare. The result is for after the commit.
    pub(super) async fn flush(
        self,
        tx: &mut Transaction<'_, Postgres>,
        now: OffsetDateTime,
        circuit: CircuitSettings,
    ) -> Result<Flushed> {
        let mut flushed = Flushed {
            lifecycle: Vec::new(),
            steps: Vec::new(),
            reclosed: BTreeSet::new(),
            outbox: !self.outgoing.is_empty(),
            changed: self
                .saga_index
                .keys()
                .chain(self.history.iter().map(|h| &h.saga_id))
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        if self.sagas.is_empty() {
            return Ok(flushed);
        }
        let Writes {
            sagas,
            attempts,
            ended,
            outgoing,
            history,
            lifecycle,
            ..
        } = self;
        let shared = bind_shared(sqlx::query(TRANSITION), now, attempts, history, outgoing);
        let rows = bind_transition(shared, &ended, sagas)
            .fetch_all(&mut **tx)
            .await?;
        let by_id: HashMap<Uuid, &Ended> = ended.iter().map(|x| (x.command_id, x)).collect();
        for row in rows {
            let command_id: Uuid = row.try_get("command_id")?;
            let participant: String = row.try_get("participant")?;
            if row.try_get("reclosed")? {
                flushed.reclosed.insert(participant.clone());
            }
            let Some(ended) = by_id.get(&command_id) else {
                continue;
            };
            let Some(healthy) = ended.healthy else {
                continue;
            };
            if !healthy {
                participants::record_failure(&mut *tx, &participant, now, circuit).await?;
            }
            let sent_at: OffsetDateTime = row.try_get("sent_at")?;
            flushed.steps.push(StepEnded {
                participant,
                step: row.try_get("step")?,
                kind: row.try_get("kind")?,
                outcome: if ended.timed_out {
                    "timeout"
                } else {
                    ended.outcome.unwrap_or("none")
                },
                took: (now - sent_at).try_into().unwrap_or_default(),
            });
        }
        flushed.lifecycle = lifecycle.into_iter().map(|(_, d, s)| (d, s)).collect();
        Ok(flushed)
    }

    /// Inserts new sagas (`records`, each staged here with its first transition, in the same
    /// order) with everything those transitions wrote, in one autocommitted statement. Returns
    /// the ids inserted: a saga whose idempotency key was taken (by an earlier saga, or by one
    /// before it in `records`) is not, and nothing of it is written.
    pub(super) async fn insert_new(
        self,
        pool: &sqlx::PgPool,
        records: &[SagaRecord],
        now: OffsetDateTime,
    ) -> Result<(HashSet<Uuid>, Flushed)> {
        if records.len() != self.sagas.len()
            || records.iter().zip(&self.sagas).any(|(r, w)| r.id != w.id)
        {
            return Err(StoreError::Corrupt("new sagas staged out of order".into()));
        }
        let Writes {
            sagas,
            attempts,
            outgoing,
            history,
            lifecycle,
            ..
        } = self;
        let outbox_of: Vec<Uuid> = outgoing.iter().map(|o| o.saga_id).collect();
        let shared = bind_shared(sqlx::query(START), now, attempts, history, outgoing);
        let rows = bind_start(shared, sagas, records).fetch_all(pool).await?;
        let inserted = rows
            .iter()
            .map(|row| row.try_get::<Uuid, _>("id"))
            .collect::<Result<HashSet<_>, _>>()?;
        let flushed = Flushed {
            outbox: outbox_of.iter().any(|id| inserted.contains(id)),
            lifecycle: lifecycle
                .into_iter()
                .filter(|(id, _, _)| inserted.contains(id))
                .map(|(_, d, s)| (d, s))
                .collect(),
            steps: Vec::new(),
            reclosed: BTreeSet::new(),
            // Nobody can watch a saga before its start returned its id.
            changed: Vec::new(),
        };
        Ok((inserted, flushed))
    }
}

fn stored_graph(state: &GraphState) -> Result<Value> {
    serde_json::to_value(StoredGraph {
        started: state.started,
        turned: state.turned,
        steps: state.steps.clone(),
    })
    .map_err(|e| StoreError::Corrupt(format!("step states: {e}")))
}

/// A step of the definition by the index the engine gave; out of range only if the stored saga
/// and its definition disagree.
fn step_of(def: &Definition, step: usize) -> Result<&crate::definition::Step> {
    def.steps.get(step).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "definition {} v{} has no step {step}",
            def.name, def.version
        ))
    })
}

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// Binds $1 (now) to $20 of [`shared_writes!`]: the new attempts, history entries and outbox
/// rows, each row type's columns in the order of its UNNEST.
fn bind_shared<'q>(
    q: PgQuery<'q>,
    now: OffsetDateTime,
    attempts: Vec<NewAttempt>,
    history: Vec<HistoryEntry>,
    outgoing: Vec<OutboxRow>,
) -> PgQuery<'q> {
    let n = attempts.len();
    let (mut command, mut saga, mut step_index, mut step) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut participant, mut kind, mut attempt, mut deadline) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for a in attempts {
        command.push(a.command_id);
        saga.push(a.saga_id);
        step_index.push(a.step_index);
        step.push(a.step);
        participant.push(a.participant);
        kind.push(a.kind);
        attempt.push(a.attempt);
        deadline.push(a.deadline);
    }
    let q = q
        .bind(now)
        .bind(command)
        .bind(saga)
        .bind(step_index)
        .bind(step)
        .bind(participant)
        .bind(kind)
        .bind(attempt)
        .bind(deadline);
    let n = history.len();
    let (mut saga, mut kind, mut step, mut command, mut detail) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for h in history {
        saga.push(h.saga_id);
        kind.push(h.kind);
        step.push(h.step);
        command.push(h.command_id);
        detail.push(h.detail);
    }
    let q = q
        .bind(saga)
        .bind(kind)
        .bind(step)
        .bind(command)
        .bind(detail);
    let n = outgoing.len();
    let (mut saga, mut exchange, mut routing_key) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut message_id, mut properties, mut body) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for o in outgoing {
        saga.push(o.saga_id);
        exchange.push(o.exchange);
        routing_key.push(o.routing_key);
        message_id.push(o.message_id);
        properties.push(o.properties);
        body.push(o.body);
    }
    q.bind(saga)
        .bind(exchange)
        .bind(routing_key)
        .bind(message_id)
        .bind(properties)
        .bind(body)
}

/// Binds $21 to $36 of [`TRANSITION`]: the attempts that ended, then the sagas' new states
/// with the outputs they added.
fn bind_transition<'q>(q: PgQuery<'q>, ended: &[Ended], sagas: Vec<SagaWrite>) -> PgQuery<'q> {
    let e = ended;
    let q = q
        .bind(e.iter().map(|x| x.command_id).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.outcome).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.output.clone()).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.reason.clone()).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.timed_out).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.superseded).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.healthy).collect::<Vec<_>>());
    let (states, outputs) = SagaStates::of(sagas);
    states.bind(q).bind(outputs)
}

/// Binds $21 to $35 of [`START`]: the new sagas' states, then what only a new row has.
fn bind_start<'q>(q: PgQuery<'q>, sagas: Vec<SagaWrite>, records: &'q [SagaRecord]) -> PgQuery<'q> {
    let (states, _) = SagaStates::of(sagas);
    let r = records;
    states
        .bind(q)
        .bind(r.iter().map(|r| r.definition.as_str()).collect::<Vec<_>>())
        .bind(
            r.iter()
                .map(|r| r.definition_version as i32)
                .collect::<Vec<_>>(),
        )
        .bind(r.iter().map(|r| &r.input).collect::<Vec<_>>())
        .bind(r.iter().map(|r| &r.outputs).collect::<Vec<_>>())
        .bind(
            r.iter()
                .map(|r| r.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            r.iter()
                .map(|r| r.traceparent.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            r.iter()
                .map(|r| r.started_by.as_deref())
                .collect::<Vec<_>>(),
        )
}

/// The sagas' new states column by column (id, status, graph, wake_at, error, current_steps,
/// current_participants, command_ids), which both the transition (`moved`) and the start
/// statement (`go`) write. PostgreSQL arrays cannot be ragged, so each array column travels as
/// one jsonb array per saga.
#[derive(Default)]
struct SagaStates {
    id: Vec<Uuid>,
    status: Vec<&'static str>,
    graph: Vec<Value>,
    wake_at: Vec<Option<OffsetDateTime>>,
    error: Vec<Option<String>>,
    current_steps: Vec<Value>,
    current_participants: Vec<Value>,
    command_ids: Vec<Value>,
}

impl SagaStates {
    /// The states, and apart the outputs each saga added (only the transition writes those).
    fn of(sagas: Vec<SagaWrite>) -> (SagaStates, Vec<Value>) {
        let mut s = SagaStates::default();
        let mut outputs = Vec::with_capacity(sagas.len());
        for w in sagas {
            s.id.push(w.id);
            s.status.push(w.status);
            s.graph.push(w.graph);
            s.wake_at.push(w.wake_at);
            s.error.push(w.error);
            s.current_steps.push(Value::from(w.current_steps));
            s.current_participants
                .push(Value::from(w.current_participants));
            s.command_ids.push(Value::from(
                w.command_ids
                    .iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>(),
            ));
            outputs.push(Value::Object(w.new_outputs));
        }
        (s, outputs)
    }

    fn bind(self, q: PgQuery<'_>) -> PgQuery<'_> {
        q.bind(self.id)
            .bind(self.status)
            .bind(self.graph)
            .bind(self.wake_at)
            .bind(self.error)
            .bind(self.current_steps)
            .bind(self.current_participants)
            .bind(self.command_ids)
    }
}

/// What a written batch still has to do outside the database once committed: metrics, logs,
/// waking the relay and watchers.
pub struct Flushed {
    pub lifecycle: Vec<(String, Status)>,
    pub steps: Vec<StepEnded>,
    /// Participants whose open circuit this batch closed.
    pub reclosed: BTreeSet<String>,
    /// Whether outbox rows were written.
    pub outbox: bool,
    /// Sagas whose state or history the batch changed, for watchers.
    pub changed: Vec<Uuid>,
}

pub struct StepEnded {
    pub participant: String,
    pub step: String,
    pub kind: String,
    pub outcome: &'static str,
    pub took: std::time::Duration,
}

/// The writes every statement shares: new attempts, history entries and outbox rows, each
/// filtered by `$only` (a condition on their saga `s`: for new sagas, that it was really
/// inserted). Parameters $1 (now) to $20, see [`Writes::bind_shared`]; each statement adds its
/// own from $21.
macro_rules! shared_writes {
    ($only:literal) => {
        concat!(
            "new_attempts AS ( \
               INSERT INTO step_attempts (command_id, saga_id, step_index, step, participant, kind, attempt, sent_at, deadline) \
               SELECT c, s, i, st, p, k, a, $1, d FROM \
                 UNNEST($2::uuid[], $3::uuid[], $4::int[], $5::text[], $6::text[], $7::text[], $8::int[], $9::timestamptz[]) \
                 AS u(c, s, i, st, p, k, a, d) ", $only, "), \
             history AS ( \
               INSERT INTO saga_history (saga_id, at, kind, step, command_id, detail) \
               SELECT s, $1, k, st, c, d FROM \
                 UNNEST($10::uuid[], $11::text[], $12::text[], $13::uuid[], $14::jsonb[]) \
                 WITH ORDINALITY AS h(s, k, st, c, d, n) ", $only, " ORDER BY n), \
             outgoing AS ( \
               INSERT INTO outbox (exchange, routing_key, message_id, properties, body) \
               SELECT e, r, m, p, b FROM \
                 UNNEST($15::uuid[], $16::text[], $17::text[], $18::uuid[], $19::jsonb[], $20::bytea[]) \
                 WITH ORDINALITY AS o(s, e, r, m, p, b, n) ", $only, " ORDER BY n) "
        )
    };
}

/// A batch of transitions of existing sagas. Ended attempts return their participant (for
/// metrics and the circuit breaker); a healthy answer closes the participant's circuit, touching
/// its row only when there is something to reset, so the hot path takes no participant lock.
/// A late reply fills in its attempt without clearing `timed_out`; outputs are merged into the
/// stored ones, never rewritten whole.
const TRANSITION: &str = concat!(
    "WITH ",
    shared_writes!(""),
    ", ended AS ( \
       UPDATE step_attempts a SET \
         replied_at = CASE WHEN u.outcome IS NULL THEN a.replied_at ELSE $1 END, \
         outcome = COALESCE(u.outcome, a.outcome), output = COALESCE(u.output, a.output), \
         reason = COALESCE(u.reason, a.reason), \
         timed_out = a.timed_out OR u.timed_out, superseded = a.superseded OR u.superseded \
       FROM UNNEST($21::uuid[], $22::text[], $23::jsonb[], $24::text[], $25::bool[], $26::bool[], $27::bool[]) \
         AS u(command_id, outcome, output, reason, timed_out, superseded, healthy) \
       WHERE a.command_id = u.command_id AND a.replied_at IS NULL \
       RETURNING a.command_id, a.participant, a.step, a.kind, a.sent_at, u.healthy), \
     recovered AS ( \
       UPDATE participants p SET consecutive_failures = 0, circuit = 'closed', probe_at = NULL, \
         circuit_changed_at = CASE WHEN p.circuit <> 'closed' THEN $1 ELSE p.circuit_changed_at END \
       FROM participants old \
       WHERE p.name IN (SELECT participant FROM ended WHERE healthy) AND old.name = p.name \
         AND (p.consecutive_failures > 0 OR p.circuit <> 'closed') \
       RETURNING p.name, old.circuit <> 'closed' AS reclosed), \
     moved AS ( \
       UPDATE sagas s SET status = u.status, graph = u.graph, wake_at = u.wake_at, error = u.error, \
         outputs = s.outputs || u.outputs, updated_at = $1, \
         current_steps = ARRAY(SELECT jsonb_array_elements_text(u.cs)), \
         current_participants = ARRAY(SELECT jsonb_array_elements_text(u.cp)), \
         command_ids = ARRAY(SELECT jsonb_array_elements_text(u.ci)::uuid) \
       FROM UNNEST($28::uuid[], $29::text[], $30::jsonb[], $31::timestamptz[], $32::text[], $33::jsonb[], \
                   $34::jsonb[], $35::jsonb[], $36::jsonb[]) \
         AS u(id, status, graph, wake_at, error, cs, cp, ci, outputs) \
       WHERE s.id = u.id) \
     SELECT e.command_id, e.participant, e.step, e.kind, e.sent_at, COALESCE(r.reclosed, false) AS reclosed \
     FROM ended e LEFT JOIN recovered r ON r.name = e.participant"
);

/// New saga rows, already in the state of their first transition. `ON CONFLICT DO NOTHING` also
/// skips a row whose key an earlier row of the same statement took.
const START: &str = concat!(
    "WITH go AS ( \
       INSERT INTO sagas (id, definition, definition_version, status, graph, wake_at, input, outputs, error, \
         idempotency_key, created_at, updated_at, current_steps, current_participants, command_ids, \
         traceparent, started_by) \
       SELECT id, def, ver, st, g, wake, inp, outp, err, ikey, $1, $1, \
         ARRAY(SELECT jsonb_array_elements_text(cs)), ARRAY(SELECT jsonb_array_elements_text(cp)), \
         ARRAY(SELECT jsonb_array_elements_text(ci)::uuid), tp, sby \
       FROM UNNEST($21::uuid[], $22::text[], $23::jsonb[], $24::timestamptz[], $25::text[], $26::jsonb[], \
                   $27::jsonb[], $28::jsonb[], $29::text[], $30::int[], $31::jsonb[], $32::jsonb[], \
                   $33::text[], $34::text[], $35::text[]) \
         AS u(id, st, g, wake, err, cs, cp, ci, def, ver, inp, outp, ikey, tp, sby) \
       ON CONFLICT (idempotency_key) DO NOTHING RETURNING id), ",
    shared_writes!("WHERE s IN (SELECT id FROM go)"),
    "SELECT id FROM go"
);

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Arguments as _;
    use sqlx::Execute as _;

    /// The distinct `$n` of a statement, in order.
    fn placeholders(sql: &str) -> Vec<usize> {
        let mut found = BTreeSet::new();
        let mut rest = sql;
        while let Some(at) = rest.find('$') {
            rest = &rest[at + 1..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                found.insert(n);
            }
        }
        found.into_iter().collect()
    }

    fn bound(mut q: PgQuery<'_>) -> usize {
        q.take_arguments().unwrap().map_or(0, |a| a.len())
    }

    #[test]
    fn the_transition_statement_binds_each_of_its_placeholders_once() {
        let q = bind_shared(
            sqlx::query(TRANSITION),
            OffsetDateTime::UNIX_EPOCH,
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let n = bound(bind_transition(q, &[], Vec::new()));
        assert_eq!(placeholders(TRANSITION), (1..=n).collect::<Vec<_>>());
    }

    #[test]
    fn the_start_statement_binds_each_of_its_placeholders_once() {
        let q = bind_shared(
            sqlx::query(START),
            OffsetDateTime::UNIX_EPOCH,
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let n = bound(bind_start(q, Vec::new(), &[]));
        assert_eq!(placeholders(START), (1..=n).collect::<Vec<_>>());
    }
}
