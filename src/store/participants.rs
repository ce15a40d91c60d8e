//! Dispatch control per participant: operator pauses and the circuit breaker.
//!
//! Both work the same way: the relay leaves a held participant's commands in the outbox, and
//! the timer sweeper does not run the deadline of a command that is still in the outbox, so a
//! held participant's sagas wait instead of failing in a storm. When the commands go out, their
//! deadlines start again from the moment of publishing.

use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{CircuitSettings, OutboxTx, Result, Store, StoreError};
use crate::contract;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    fn parse(s: &str) -> Result<Circuit> {
        match s {
            "closed" => Ok(Circuit::Closed),
            "open" => Ok(Circuit::Open),
            "half_open" => Ok(Circuit::HalfOpen),
            other => Err(StoreError::Corrupt(format!(
                "unknown circuit state {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ParticipantRecord {
    pub name: String,
    pub paused: bool,
    pub paused_by: Option<String>,
    pub paused_reason: Option<String>,
    pub paused_at: Option<OffsetDateTime>,
    pub circuit: Circuit,
    pub consecutive_failures: u32,
    pub circuit_changed_at: Option<OffsetDateTime>,
    /// Commands waiting in the outbox for this participant.
    pub held_commands: u64,
}

/// A timeout or transient failure: counts towards opening the participant's circuit (or
/// re-opens it after a failed probe).
pub(super) async fn record_failure(
    tx: &mut Transaction<'_, Postgres>,
    participant: &str,
    now: OffsetDateTime,
    circuit: CircuitSettings,
) -> Result<()> {
    let row = sqlx::query(
        "UPDATE participants SET consecutive_failures = consecutive_failures + 1, \
           circuit = CASE WHEN circuit = 'half_open' OR consecutive_failures + 1 >= $2 THEN 'open' ELSE circuit END, \
           probe_at = CASE WHEN circuit = 'half_open' OR consecutive_failures + 1 >= $2 THEN $3 + $4 ELSE probe_at END, \
           circuit_changed_at = CASE WHEN circuit = 'closed' AND consecutive_failures + 1 >= $2 THEN $3 \
                                     ELSE circuit_changed_at END \
         WHERE name = $1 RETURNING circuit, consecutive_failures",
    )
    .bind(participant)
    .bind(circuit.failure_threshold as i32)
    .bind(now)
    .bind(circuit.cooldown)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(row) = row {
        let state: String = row.try_get("circuit")?;
        let failures: i32 = row.try_get("consecutive_failures")?;
        if state == "open" && failures as u32 >= circuit.failure_threshold {
            warn!(participant, failures, cooldown = ?circuit.cooldown, "circuit open: holding commands until a probe succeeds");
        }
    }
    Ok(())
}

impl Store {
    /// Makes sure every participant of the loaded definitions has a row.
    pub async fn register_participants(&self, names: &[String]) -> Result<()> {
        sqlx::query(
            "INSERT INTO participants (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(names)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Sets or clears an operator's pause; false if there is no such participant.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
        actor: &str,
        reason: &str,
    ) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE participants SET paused = $2, \
               paused_by = CASE WHEN $2 THEN $3 END, paused_reason = CASE WHEN $2 THEN $4 END, \
               paused_at = CASE WHEN $2 THEN now() END \
             WHERE name = $1",
        )
        .bind(name)
        .bind(paused)
        .bind(actor)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(updated.rows_affected() > 0)
    }

    pub async fn participant(&self, name: &str) -> Result<Option<ParticipantRecord>> {
        Ok(self
            .participants()
            .await?
            .into_iter()
            .find(|p| p.name == name))
    }

    pub async fn participants(&self) -> Result<Vec<ParticipantRecord>> {
        let rows = sqlx::query(
            "SELECT p.name, p.paused, p.paused_by, p.paused_reason, p.paused_at, p.circuit, p.consecutive_failures, \
               p.circuit_changed_at, \
               (SELECT count(*) FROM outbox o WHERE o.exchange = $1 AND o.routing_key = p.name) AS held \
             FROM participants p ORDER BY p.name",
        )
        .bind(contract::COMMANDS_EXCHANGE)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ParticipantRecord {
                    name: r.try_get("name")?,
                    paused: r.try_get("paused")?,
                    paused_by: r.try_get("paused_by")?,
                    paused_reason: r.try_get("paused_reason")?,
                    paused_at: r.try_get("paused_at")?,
                    circuit: Circuit::parse(r.try_get("circuit")?)?,
                    consecutive_failures: r.try_get::<i32, _>("consecutive_failures")?.max(0)
                        as u32,
                    circuit_changed_at: r.try_get("circuit_changed_at")?,
                    held_commands: r.try_get::<i64, _>("held")?.max(0) as u64,
                })
            })
            .collect()
    }
}

impl OutboxTx<'_> {
    /// Participants whose circuit is open and whose cool-down has passed: one command each may go
    /// out as a probe.
    pub async fn due_for_probe(&mut self, now: OffsetDateTime) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM participants WHERE NOT paused AND circuit = 'open' AND probe_at <= $1",
        )
        .bind(now)
        .fetch_all(self.conn())
        .await?)
    }

    /// The probe for `participant` went out: hold the rest until its outcome is known (or, if it is
    /// lost, until the cool-down passes again).
    pub async fn probe_sent(
        &mut self,
        participant: &str,
        now: OffsetDateTime,
        cooldown: std::time::Duration,
    ) -> Result<()> {
        sqlx::query("UPDATE participants SET circuit = 'half_open', probe_at = $2 + $3, circuit_changed_at = $2 WHERE name = $1")
            .bind(participant)
            .bind(now)
            .bind(cooldown)
            .execute(self.conn())
            .await?;
        info!(participant, "circuit half-open: probe command sent");
        Ok(())
    }
}
