//! The transactional outbox, as the relay sees it: claim rows, delete them once the broker
//! confirmed them, and restart the deadlines of commands that waited.

use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::Result;
use crate::contract;

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

/// Takes up to `limit` rows for publishing, oldest first: deletes them in the caller's
/// transaction, which commits only after the broker confirmed every message, so a failure or a
/// crash before that leaves them in place to be published again. Rows another relay holds are
/// skipped, and so are commands for participants that are paused or whose circuit is not closed.
pub async fn take(tx: &mut Transaction<'_, Postgres>, limit: i64) -> Result<Vec<OutboxMessage>> {
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
    .fetch_all(&mut **tx)
    .await?;
    let mut taken = rows.iter().map(from_row).collect::<Result<Vec<_>>>()?;
    // RETURNING does not keep the sub-select's order.
    taken.sort_by_key(|m| m.id);
    Ok(taken)
}

/// Takes the oldest waiting command for `participant`, to probe its open circuit with.
pub async fn take_one(
    tx: &mut Transaction<'_, Postgres>,
    participant: &str,
) -> Result<Option<OutboxMessage>> {
    let row = sqlx::query(
        "DELETE FROM outbox WHERE id = ( \
           SELECT id FROM outbox WHERE exchange = $1 AND routing_key = $2 \
           ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING id, exchange, routing_key, message_id, properties, body, created_at",
    )
    .bind(contract::COMMANDS_EXCHANGE)
    .bind(participant)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Commands that waited in the outbox (a paused participant, an open circuit, a broker outage)
/// get their full timeout from the moment they are actually published.
pub async fn restart_deadlines(
    tx: &mut Transaction<'_, Postgres>,
    command_ids: &[Uuid],
    now: OffsetDateTime,
) -> Result<()> {
    if command_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH moved AS ( \
           UPDATE step_attempts SET deadline = LEAST($2 + (deadline - sent_at), $3), sent_at = $2 \
           WHERE command_id = ANY($1) AND replied_at IS NULL AND NOT timed_out AND NOT superseded \
           RETURNING saga_id, command_id, deadline) \
         UPDATE sagas s SET wake_at = moved.deadline FROM moved \
         WHERE s.id = moved.saga_id AND s.command_id = moved.command_id",
    )
    .bind(command_ids)
    .bind(now)
    // A deadline already at the engine's ceiling must not be pushed past what it reads back.
    .bind(crate::engine::NEVER)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
