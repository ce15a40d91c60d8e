//! The transactional outbox, as the relay sees it: claim rows, delete them once the broker
//! confirmed them, and restart the deadlines of commands that waited.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::{Connection as _, PgConnection, Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Result, Store, StoreError, StoredGraph};
use crate::contract;
use crate::engine::Status;
use crate::graph::StepState;

/// A relay's own connection: its transactions need no fsync wait (losing one only publishes its
/// rows again, which the contract allows: same message_id, participants de-duplicate), and it
/// never waits for the pool behind the API and the reply consumer. It keeps the pool's planner
/// settings (see `session_settings`), which matter most here: the outbox only churns, growing
/// with dead rows until autovacuum comes by, so a sequential-scan claim would read every dead
/// page on every batch.
pub struct OutboxSession {
    conn: PgConnection,
}

impl Store {
    pub async fn outbox_session(&self) -> Result<OutboxSession> {
        let mut conn = self.dedicated_connection().await?;
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut conn)
            .await?;
        Ok(OutboxSession { conn })
    }
}

impl OutboxSession {
    /// Opens the transaction a batch is claimed and deleted in. It holds no snapshot nor lock
    /// until its first statement, so it can be opened before waiting for work.
    pub async fn begin(&mut self) -> Result<OutboxTx<'_>> {
        Ok(OutboxTx {
            tx: self.conn.begin().await?,
        })
    }
}

/// A relay batch's transaction: what it takes is deleted only if it commits.
pub struct OutboxTx<'c> {
    tx: Transaction<'c, Postgres>,
}

impl OutboxTx<'_> {
    pub(super) fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    pub async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }
}

/// A claimed outbox row, ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Uuid,
    pub properties: serde_json::Value,
    pub body: Vec<u8>,
    pub created_at: OffsetDateTime,
}

fn from_row(r: &sqlx::postgres::PgRow) -> Result<OutboxMessage> {
    Ok(OutboxMessage {
        id: r.try_get("id")?,
        exchange: r.try_get("exchange")?,
        routing_key: r.try_get("routing_key")?,
        message_id: r.try_get("message_id")?,
        properties: r.try_get("properties")?,
        body: r.try_get("body")?,
        created_at: r.try_get("created_at")?,
    })
}

impl OutboxTx<'_> {
    /// Takes up to `limit` rows for publishing, oldest first: deletes them in the caller's
    /// transaction, which commits only after the broker confirmed every message, so a failure or a
    /// crash before that leaves them in place to be published again. Rows another relay holds are
    /// skipped, and so are commands for participants that are paused or whose circuit is not closed.
    pub async fn take(&mut self, limit: i64) -> Result<Vec<OutboxMessage>> {
        let rows = sqlx::query(
            "DELETE FROM outbox WHERE id IN ( \
               SELECT id FROM outbox \
               WHERE NOT (exchange = $2 AND routing_key IN \
                          (SELECT name FROM participants WHERE paused OR circuit <> 'closed')) \
               ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, exchange, routing_key, message_id, properties, body, created_at",
        )
        .bind(limit)
        .bind(contract::COMMANDS_EXCHANGE)
        .fetch_all(self.conn())
        .await?;
        let mut taken = rows.iter().map(from_row).collect::<Result<Vec<_>>>()?;
        // RETURNING does not keep the sub-select's order.
        taken.sort_by_key(|m| m.id);
        Ok(taken)
    }

    /// Takes the oldest waiting command for `participant`, to probe its open circuit with.
    pub async fn take_one(&mut self, participant: &str) -> Result<Option<OutboxMessage>> {
        let row = sqlx::query(
            "DELETE FROM outbox WHERE id = ( \
               SELECT id FROM outbox WHERE exchange = $1 AND routing_key = $2 \
               ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, exchange, routing_key, message_id, properties, body, created_at",
        )
        .bind(contract::COMMANDS_EXCHANGE)
        .bind(participant)
        .fetch_optional(self.conn())
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Commands that waited in the outbox (a paused participant, an open circuit, a broker outage)
    /// get their full timeout from the moment they are actually published: on their attempt,
    /// on the step still awaiting them, and in the saga's wake-up time.
    pub async fn restart_deadlines(
        &mut self,
        command_ids: &[Uuid],
        now: OffsetDateTime,
    ) -> Result<()> {
        if command_ids.is_empty() {
            return Ok(());
        }
        // Sagas first, in id order, then their attempts: the order every transition locks in,
        // so this cannot deadlock with a timer or a repair on the same saga.
        let owners: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT saga_id FROM step_attempts WHERE command_id = ANY($1) ORDER BY saga_id",
        )
        .bind(command_ids)
        .fetch_all(self.conn())
        .await?;
        let rows: Vec<(Uuid, String, Option<Value>)> = sqlx::query_as(
            "SELECT id, status, graph FROM sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(&owners)
        .fetch_all(self.conn())
        .await?;
        let attempts: Vec<(Uuid, Uuid, OffsetDateTime)> = sqlx::query_as(
            "UPDATE step_attempts SET deadline = LEAST($2 + (deadline - sent_at), $3), sent_at = $2 \
             WHERE command_id = ANY($1) AND replied_at IS NULL AND NOT timed_out AND NOT superseded \
             RETURNING saga_id, command_id, deadline",
        )
        .bind(command_ids)
        .bind(now)
        // A deadline already at the engine's ceiling must not be pushed past what it reads back.
        .bind(crate::engine::NEVER)
        .fetch_all(self.conn())
        .await?;
        if attempts.is_empty() {
            return Ok(());
        }
        let moved: HashMap<Uuid, OffsetDateTime> =
            attempts.into_iter().map(|(_, c, d)| (c, d)).collect();
        let (mut id, mut graph, mut wake) = (Vec::new(), Vec::new(), Vec::new());
        for (saga, status, stored) in rows {
            let Some(stored) = stored else { continue };
            let mut g: StoredGraph = serde_json::from_value(stored)
                .map_err(|e| StoreError::Corrupt(format!("saga {saga}: step states: {e}")))?;
            let mut changed = false;
            for st in &mut g.steps {
                if let StepState::Running {
                    command_id,
                    deadline,
                    ..
                }
                | StepState::Compensating {
                    command_id,
                    deadline,
                    ..
                } = st
                    && let Some(d) = moved.get(command_id)
                {
                    *deadline = *d;
                    changed = true;
                }
            }
            if !changed {
                continue;
            }
            let ended = Status::parse(&status).is_none_or(Status::is_terminal);
            wake.push(if ended {
                None
            } else {
                g.steps.iter().filter_map(StepState::wake_at).min()
            });
            graph.push(
                serde_json::to_value(&g)
                    .map_err(|e| StoreError::Corrupt(format!("step states: {e}")))?,
            );
            id.push(saga);
        }
        sqlx::query(
            "UPDATE sagas s SET graph = u.graph, wake_at = u.wake_at \
             FROM UNNEST($1::uuid[], $2::jsonb[], $3::timestamptz[]) AS u(id, graph, wake_at) \
             WHERE s.id = u.id",
        )
        .bind(id)
        .bind(graph)
        .bind(wake)
        .execute(self.conn())
        .await?;
        Ok(())
    }
}
