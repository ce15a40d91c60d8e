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

/// Locks up to `limit` rows for publishing, oldest first, skipping rows another relay holds and
/// commands for `held` participants. The caller publishes them and then calls [`delete`] in the
/// same transaction, so a crash before the broker confirmed leaves them to be published again.
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
    held: &[String],
) -> Result<Vec<OutboxMessage>> {
    let rows = sqlx::query(
        "SELECT id, exchange, routing_key, message_id, properties, body, created_at FROM outbox \
         WHERE NOT (exchange = $2 AND routing_key = ANY($3)) \
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(contract::COMMANDS_EXCHANGE)
    .bind(held)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter().map(from_row).collect()
}

/// The oldest waiting command for `participant`, to probe its open circuit with.
pub async fn claim_one(
    tx: &mut Transaction<'_, Postgres>,
    participant: &str,
) -> Result<Option<OutboxMessage>> {
    let row = sqlx::query(
        "SELECT id, exchange, routing_key, message_id, properties, body, created_at FROM outbox \
         WHERE exchange = $1 AND routing_key = $2 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .bind(contract::COMMANDS_EXCHANGE)
    .bind(participant)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn delete(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
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
           UPDATE step_attempts SET deadline = $2 + (deadline - sent_at), sent_at = $2 \
           WHERE command_id = ANY($1) AND replied_at IS NULL AND NOT timed_out AND NOT superseded \
           RETURNING command_id, deadline) \
         UPDATE sagas s SET wake_at = moved.deadline FROM moved WHERE s.command_id = moved.command_id",
    )
    .bind(command_ids)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
