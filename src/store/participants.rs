//! Participants' rows: operator pauses and circuit state, as the breaker
//! ([`crate::breaker`]) decides them.

use sqlx::Row;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{OutboxTx, Result, Store, StoreError};
use crate::breaker::{self, Circuit, CircuitSettings};
use crate::contract;

fn parse_circuit(s: &str) -> Result<Circuit> {
    Circuit::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown circuit state {s:?}")))
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
/// re-opens it after a failed probe), as [`breaker::after_failure`] decides.
pub(super) async fn record_failure(
    conn: &mut sqlx::PgConnection,
    participant: &str,
    now: OffsetDateTime,
    settings: CircuitSettings,
) -> Result<()> {
    let row = sqlx::query(
        "SELECT circuit, consecutive_failures FROM participants WHERE name = $1 FOR UPDATE",
    )
    .bind(participant)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(());
    };
    let circuit = parse_circuit(row.try_get("circuit")?)?;
    let failures = row.try_get::<i32, _>("consecutive_failures")?.max(0) as u32;
    let next = breaker::after_failure(circuit, failures, settings);
    sqlx::query(
        "UPDATE participants SET consecutive_failures = $2, circuit = $3, \
           probe_at = CASE WHEN $4 THEN $6 + $7 ELSE probe_at END, \
           circuit_changed_at = CASE WHEN $5 THEN $6 ELSE circuit_changed_at END \
         WHERE name = $1",
    )
    .bind(participant)
    .bind(i32::try_from(next.consecutive_failures).unwrap_or(i32::MAX))
    .bind(next.circuit.as_str())
    .bind(next.probe_after_cooldown)
    .bind(next.changed)
    .bind(now)
    .bind(settings.cooldown)
    .execute(&mut *conn)
    .await?;
    if next.holds_commands(settings) {
        let failures = next.consecutive_failures;
        warn!(participant, failures, cooldown = ?settings.cooldown, "circuit open: holding commands until a probe succeeds");
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
                    circuit: parse_circuit(r.try_get("circuit")?)?,
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
        sqlx::query("UPDATE participants SET circuit = $4, probe_at = $2 + $3, circuit_changed_at = $2 WHERE name = $1")
            .bind(participant)
            .bind(now)
            .bind(cooldown)
            .bind(breaker::AFTER_PROBE_SENT.as_str())
            .execute(self.conn())
            .await?;
        info!(participant, "circuit half-open: probe command sent");
        Ok(())
    }
}
