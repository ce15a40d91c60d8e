//! The write side of transitions, batched: the effects of any number of transitions (one saga's,
//! or a whole batch of replies or due timers) are staged in memory and written with one
//! statement per table, so a batch costs a handful of round trips however large it is.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value, json};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Env, OUTBOX_CHANNEL, Result, SagaRecord, StoreError, participants};
use crate::contract::{self, CommandBody};
use crate::definition::Definition;
use crate::engine::{self, AttemptEnd, Effect, Kind, Outcome, Status, Waiting};

/// The new state of one saga; several transitions of the same saga in a batch coalesce here.
struct SagaWrite {
    id: Uuid,
    status: &'static str,
    step: i32,
    kind: &'static str,
    attempt: i32,
    command_id: Option<Uuid>,
    wake_at: Option<OffsetDateTime>,
    error: Option<String>,
    /// Outputs added by this batch, merged into the stored ones.
    new_outputs: Map<String, Value>,
    current_step: Option<String>,
    current_participant: Option<String>,
}

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

#[derive(Default)]
pub(super) struct Writes {
    sagas: Vec<SagaWrite>,
    saga_index: HashMap<Uuid, usize>,
    // New attempts, column by column.
    a_command: Vec<Uuid>,
    a_saga: Vec<Uuid>,
    a_step_index: Vec<i32>,
    a_step: Vec<String>,
    a_participant: Vec<String>,
    a_kind: Vec<&'static str>,
    a_attempt: Vec<i32>,
    a_deadline: Vec<OffsetDateTime>,
    ended: Vec<Ended>,
    // Outbox rows.
    o_exchange: Vec<&'static str>,
    o_routing_key: Vec<String>,
    o_message_id: Vec<Uuid>,
    o_properties: Vec<Value>,
    o_body: Vec<Vec<u8>>,
    // History entries.
    h_saga: Vec<Uuid>,
    h_kind: Vec<&'static str>,
    h_step: Vec<Option<String>>,
    h_command: Vec<Option<Uuid>>,
    h_detail: Vec<Value>,
    /// (definition, status) of lifecycle events, for metrics.
    lifecycle: Vec<(String, Status)>,
}

impl Writes {
    /// Stages a transition of `record` and moves the record to its new state, so that a later
    /// transition of the same saga in this batch starts from it. Returns the new status.
    pub(super) fn stage(
        &mut self,
        def: &Definition,
        record: &mut SagaRecord,
        t: engine::Transition,
        now: OffsetDateTime,
    ) -> Result<Status> {
        if t.is_noop() {
            return Ok(record.state.status);
        }
        let mut new_outputs = Map::new();
        for effect in t.effects {
            match effect {
                Effect::SaveOutput { step, output } => {
                    let name = def.steps[step].name.clone();
                    if let Value::Object(outputs) = &mut record.outputs {
                        outputs.insert(name.clone(), output.clone());
                    }
                    new_outputs.insert(name, output);
                }
                Effect::Send(cmd) => self.command(def, record, &cmd)?,
                Effect::AttemptEnded { command_id, end } => self.end_attempt(command_id, end),
                Effect::History {
                    kind,
                    step,
                    command_id,
                    detail,
                } => {
                    self.h_saga.push(record.id);
                    self.h_kind.push(kind.as_str());
                    self.h_step.push(step.map(|i| def.steps[i].name.clone()));
                    self.h_command.push(command_id);
                    self.h_detail.push(detail);
                }
                Effect::Lifecycle(status) => {
                    tracing::info!(saga_id = %record.id, definition = %def.name, status = status.as_str(), "saga lifecycle");
                    self.lifecycle_event(def, record, status, now)?;
                }
            }
        }

        let state = t.state;
        let (command_id, wake_at) = match state.waiting {
            Waiting::Nothing => (None, None),
            Waiting::Reply {
                command_id,
                deadline,
            } => (Some(command_id), Some(deadline)),
            Waiting::Retry { at } => (None, Some(at)),
        };
        let current = (!state.status.is_terminal()).then(|| &def.steps[state.step]);
        record.current_step = current.map(|s| s.name.clone());
        let write = SagaWrite {
            id: record.id,
            status: state.status.as_str(),
            step: state.step as i32,
            kind: state.kind.as_str(),
            attempt: state.attempt as i32,
            command_id,
            wake_at,
            error: state.error.clone(),
            new_outputs,
            current_step: current.map(|s| s.name.clone()),
            current_participant: current.map(|s| s.participant.clone()),
        };
        match self.saga_index.get(&record.id) {
            Some(&i) => {
                let mut merged = std::mem::take(&mut self.sagas[i].new_outputs);
                merged.extend(write.new_outputs.clone());
                self.sagas[i] = SagaWrite {
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
        cmd: &engine::Command,
    ) -> Result<()> {
        let step = &def.steps[cmd.step];
        let command = match cmd.kind {
            Kind::Action => step.action.clone(),
            Kind::Compensation => step.compensation.clone().ok_or_else(|| {
                StoreError::Corrupt(format!("step {} has no compensation to send", step.name))
            })?,
        };
        self.a_command.push(cmd.command_id);
        self.a_saga.push(record.id);
        self.a_step_index.push(cmd.step as i32);
        self.a_step.push(step.name.clone());
        self.a_participant.push(step.participant.clone());
        self.a_kind.push(cmd.kind.as_str());
        self.a_attempt.push(cmd.attempt as i32);
        self.a_deadline.push(cmd.deadline);

        let body = CommandBody {
            command_id: cmd.command_id,
            saga_id: record.id,
            definition: def.name.clone(),
            definition_version: def.version,
            step: step.name.clone(),
            kind: cmd.kind.as_str().to_string(),
            command: command.clone(),
            attempt: cmd.attempt,
            input: record.input.clone(),
            outputs: record.outputs.clone(),
        };
        let properties = json!({
            "type": command,
            "correlation_id": record.id.to_string(),
            "reply_to": contract::REPLIES_QUEUE,
            "parent": record.traceparent,
            "headers": {
                contract::H_SAGA_ID: record.id.to_string(),
                contract::H_DEFINITION: def.name,
                contract::H_STEP: step.name,
                contract::H_KIND: cmd.kind.as_str(),
                contract::H_ATTEMPT: cmd.attempt,
            },
        });
        self.outbox(
            contract::COMMANDS_EXCHANGE,
            step.participant.clone(),
            cmd.command_id,
            properties,
            &body,
        )
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
        let properties = json!({
            "type": format!("saga.{event}"),
            "correlation_id": record.id.to_string(),
            "parent": record.traceparent,
            "headers": { contract::H_SAGA_ID: record.id.to_string(), contract::H_DEFINITION: def.name },
        });
        self.lifecycle.push((def.name.clone(), status));
        self.outbox(
            contract::EVENTS_EXCHANGE,
            format!("{}.{event}", def.name),
            body.event_id,
            properties,
            &body,
        )
    }

    fn outbox(
        &mut self,
        exchange: &'static str,
        routing_key: String,
        message_id: Uuid,
        properties: Value,
        body: &impl serde::Serialize,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.o_exchange.push(exchange);
        self.o_routing_key.push(routing_key);
        self.o_message_id.push(message_id);
        self.o_properties.push(properties);
        self.o_body.push(bytes);
        Ok(())
    }

    fn end_attempt(&mut self, command_id: Uuid, end: AttemptEnd) {
        // Business refusals say nothing about the participant's health; only silence and
        // transient errors count against its circuit.
        let ended = match end {
            AttemptEnd::Replied(Outcome::Success { output }) => Ended {
                command_id,
                outcome: Some("success"),
                output: Some(output),
                reason: None,
                timed_out: false,
                superseded: false,
                healthy: Some(true),
            },
            AttemptEnd::Replied(Outcome::Failure { reason, retryable }) => Ended {
                command_id,
                outcome: Some("failure"),
                output: None,
                reason: Some(reason),
                timed_out: false,
                superseded: false,
                healthy: Some(!retryable),
            },
            AttemptEnd::TimedOut => Ended {
                command_id,
                outcome: None,
                output: None,
                reason: None,
                timed_out: true,
                superseded: false,
                healthy: Some(false),
            },
            AttemptEnd::Superseded => Ended {
                command_id,
                outcome: None,
                output: None,
                reason: None,
                timed_out: false,
                superseded: true,
                healthy: None,
            },
        };
        self.ended.push(ended);
    }

    /// Writes everything staged, one statement per table, in the caller's transaction.
    pub(super) async fn flush(
        self,
        tx: &mut Transaction<'_, Postgres>,
        now: OffsetDateTime,
        env: &Env<'_>,
    ) -> Result<()> {
        if self.sagas.is_empty() {
            return Ok(());
        }
        if !self.a_command.is_empty() {
            sqlx::query(
                "INSERT INTO step_attempts (command_id, saga_id, step_index, step, participant, kind, attempt, sent_at, deadline) \
                 SELECT c, s, i, st, p, k, a, $9, d \
                 FROM UNNEST($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[], $7::int[], $8::timestamptz[]) \
                   AS u(c, s, i, st, p, k, a, d)",
            )
            .bind(&self.a_command)
            .bind(&self.a_saga)
            .bind(&self.a_step_index)
            .bind(&self.a_step)
            .bind(&self.a_participant)
            .bind(&self.a_kind)
            .bind(&self.a_attempt)
            .bind(&self.a_deadline)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        if !self.ended.is_empty() {
            self.flush_ended(tx, now, env).await?;
        }

        let s = &self.sagas;
        // Outputs are merged, never rewritten whole.
        sqlx::query(
            "UPDATE sagas s SET status = u.status, step = u.step, kind = u.kind, attempt = u.attempt, \
               command_id = u.command_id, wake_at = u.wake_at, error = u.error, outputs = s.outputs || u.outputs, \
               updated_at = $12, current_step = u.current_step, current_participant = u.current_participant \
             FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::text[], $5::int[], $6::uuid[], $7::timestamptz[], \
                         $8::text[], $9::jsonb[], $10::text[], $11::text[]) \
               AS u(id, status, step, kind, attempt, command_id, wake_at, error, outputs, current_step, current_participant) \
             WHERE s.id = u.id",
        )
        .bind(s.iter().map(|w| w.id).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.status).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.step).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.kind).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.attempt).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.command_id).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.wake_at).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.error.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|w| Value::Object(w.new_outputs.clone())).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.current_step.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|w| w.current_participant.clone()).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut **tx)
        .await?;

        if !self.h_saga.is_empty() {
            // WITH ORDINALITY keeps the entries' order in `seq`.
            sqlx::query(
                "INSERT INTO saga_history (saga_id, at, kind, step, command_id, detail) \
                 SELECT s, $1, k, st, c, d FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::jsonb[]) \
                 WITH ORDINALITY AS h(s, k, st, c, d, n) ORDER BY n",
            )
            .bind(now)
            .bind(&self.h_saga)
            .bind(&self.h_kind)
            .bind(&self.h_step)
            .bind(&self.h_command)
            .bind(&self.h_detail)
            .execute(&mut **tx)
            .await?;
        }
        if !self.o_message_id.is_empty() {
            sqlx::query(
                "INSERT INTO outbox (exchange, routing_key, message_id, properties, body) \
                 SELECT e, r, m, p, b FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::jsonb[], $5::bytea[]) \
                 WITH ORDINALITY AS o(e, r, m, p, b, n) ORDER BY n",
            )
            .bind(&self.o_exchange)
            .bind(&self.o_routing_key)
            .bind(&self.o_message_id)
            .bind(&self.o_properties)
            .bind(&self.o_body)
            .execute(&mut **tx)
            .await?;
            // Delivered at commit: the relay wakes only once the rows are visible.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut **tx)
                .await?;
        }
        for (definition, status) in &self.lifecycle {
            env.metrics.saga_event(definition, *status);
        }
        Ok(())
    }

    async fn flush_ended(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        now: OffsetDateTime,
        env: &Env<'_>,
    ) -> Result<()> {
        let e = &self.ended;
        let rows = sqlx::query(
            // A late reply fills in its attempt without clearing `timed_out`.
            "UPDATE step_attempts a SET \
               replied_at = CASE WHEN u.outcome IS NULL THEN a.replied_at ELSE $7 END, \
               outcome = COALESCE(u.outcome, a.outcome), output = COALESCE(u.output, a.output), \
               reason = COALESCE(u.reason, a.reason), \
               timed_out = a.timed_out OR u.timed_out, superseded = a.superseded OR u.superseded \
             FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::bool[], $6::bool[]) \
               AS u(command_id, outcome, output, reason, timed_out, superseded) \
             WHERE a.command_id = u.command_id AND a.replied_at IS NULL \
             RETURNING a.command_id, a.participant, a.step, a.kind, a.sent_at",
        )
        .bind(e.iter().map(|x| x.command_id).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.outcome).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.output.clone()).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.reason.clone()).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.timed_out).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.superseded).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        let by_id: HashMap<Uuid, &Ended> = e.iter().map(|x| (x.command_id, x)).collect();
        let mut recovered = BTreeSet::new();
        for row in rows {
            let command_id: Uuid = row.try_get("command_id")?;
            let Some(ended) = by_id.get(&command_id) else {
                continue;
            };
            let Some(healthy) = ended.healthy else {
                continue;
            };
            let participant: String = row.try_get("participant")?;
            let sent_at: OffsetDateTime = row.try_get("sent_at")?;
            let label = if ended.timed_out {
                "timeout"
            } else {
                ended.outcome.unwrap_or("none")
            };
            let took = (now - sent_at).try_into().unwrap_or_default();
            env.metrics.step_ended(
                &participant,
                row.try_get("step")?,
                row.try_get("kind")?,
                label,
                took,
            );
            if healthy {
                recovered.insert(participant);
            } else {
                participants::record_failure(tx, &participant, now, env.circuit).await?;
            }
        }
        if !recovered.is_empty() {
            let names: Vec<String> = recovered.into_iter().collect();
            participants::record_success(tx, &names, now).await?;
        }
        Ok(())
    }
}
