//! Operator queries: the sagas a bulk repair selects, and counts per status, step and
//! definition version.

use std::collections::BTreeMap;

use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{ACTIVE, ListFilter, Result, Store, StoreError, filtered, parse_status};
use crate::engine::Status;

/// How many unfinished sagas wait at one step.
#[derive(Debug, Clone)]
pub struct StepCount {
    pub definition: String,
    pub step: String,
    pub participant: String,
    pub status: Status,
    pub count: u64,
    pub oldest_updated_at: OffsetDateTime,
}

impl Store {
    /// Ids of the sagas a bulk repair would touch, oldest first.
    pub async fn matching_ids(&self, filter: &ListFilter, limit: Option<u32>) -> Result<Vec<Uuid>> {
        let mut q = filtered("SELECT id FROM sagas WHERE true", filter);
        q.push(ACTIVE).push(" ORDER BY id");
        if let Some(limit) = limit {
            q.push(" LIMIT ").push_bind(i64::from(limit));
        }
        let rows = q.build().fetch_all(self.pool()).await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    /// Sagas per status, and unfinished sagas per (definition, step, participant, status) with
    /// the oldest last progress.
    pub async fn counts(
        &self,
        definition: Option<&str>,
    ) -> Result<(Vec<(Status, u64)>, Vec<StepCount>)> {
        // The one place sagad reads a whole table on purpose: let PostgreSQL scan it, which
        // sagad's connections otherwise avoid (see `session_settings`).
        let mut tx = self.pool().begin().await?;
        sqlx::query("SET LOCAL enable_seqscan = on")
            .execute(&mut *tx)
            .await?;
        let by_status = sqlx::query(
            "SELECT status, count(*) AS n FROM sagas WHERE ($1::text IS NULL OR definition = $1) \
             GROUP BY status ORDER BY status",
        )
        .bind(definition)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((parse_status(r)?, r.try_get::<i64, _>("n")?.max(0) as u64)))
        .collect::<Result<Vec<_>>>()?;
        let by_step = sqlx::query(
            // A saga with several current steps counts at each of them.
            "SELECT definition, c.step AS current_step, c.participant AS current_participant, status, \
               count(*) AS n, min(updated_at) AS oldest \
             FROM sagas LEFT JOIN LATERAL unnest(current_steps, current_participants) AS c(step, participant) ON true \
             WHERE status IN ('running', 'compensating', 'needs_operator') \
               AND ($1::text IS NULL OR definition = $1) \
             GROUP BY definition, c.step, c.participant, status \
             ORDER BY definition, c.step, status",
        )
        .bind(definition)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(StepCount {
                definition: r.try_get("definition")?,
                step: r.try_get::<Option<String>, _>("current_step")?.unwrap_or_default(),
                participant: r.try_get::<Option<String>, _>("current_participant")?.unwrap_or_default(),
                status: parse_status(r)?,
                count: r.try_get::<i64, _>("n")?.max(0) as u64,
                oldest_updated_at: r.try_get("oldest")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok((by_status, by_step))
    }

    /// Unfinished sagas per (definition, version), of one definition or of all; versions
    /// without any are absent.
    pub async fn active_per_version(
        &self,
        definition: Option<&str>,
    ) -> Result<BTreeMap<(String, u32), u64>> {
        // Only unfinished rows, which the partial indexes on status keep cheap to find however
        // many sagas have finished.
        sqlx::query(
            "SELECT definition, definition_version, count(*) AS n FROM sagas \
             WHERE status IN ('running', 'compensating', 'needs_operator') \
               AND ($1::text IS NULL OR definition = $1) \
             GROUP BY definition, definition_version",
        )
        .bind(definition)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            let n = r.try_get::<i64, _>("n")?.max(0) as u64;
            Ok(((r.try_get("definition")?, version_of(r)?), n))
        })
        .collect()
    }
}

/// Unfinished sagas waiting at one step of one definition version (the console's inbox).
#[derive(Debug, Clone)]
pub struct Waiting {
    pub definition: String,
    pub version: u32,
    pub step: String,
    pub participant: String,
    pub status: Status,
    pub count: u64,
    pub oldest_updated_at: OffsetDateTime,
}

/// Unfinished sagas that share an error text.
#[derive(Debug, Clone)]
pub struct ErrorGroup {
    pub error: String,
    pub definition: String,
    pub count: u64,
    pub oldest_updated_at: OffsetDateTime,
}

impl Store {
    /// Unfinished sagas per (definition, version, current step, participant, status), with the
    /// oldest last progress. Reads only unfinished rows (the partial index on status), so its cost
    /// follows the sagas in flight, not the sagas stored.
    pub async fn waiting_by_step(&self) -> Result<Vec<Waiting>> {
        sqlx::query(
            "SELECT definition, definition_version, c.step, c.participant, status, \
               count(*) AS n, min(updated_at) AS oldest \
             FROM sagas LEFT JOIN LATERAL unnest(current_steps, current_participants) AS c(step, participant) ON true \
             WHERE status IN ('running', 'compensating', 'needs_operator') \
             GROUP BY definition, definition_version, c.step, c.participant, status \
             ORDER BY min(updated_at)",
        )
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(Waiting {
                definition: r.try_get("definition")?,
                version: version_of(r)?,
                step: r.try_get::<Option<String>, _>("step")?.unwrap_or_default(),
                participant: r.try_get::<Option<String>, _>("participant")?.unwrap_or_default(),
                status: parse_status(r)?,
                count: r.try_get::<i64, _>("n")?.max(0) as u64,
                oldest_updated_at: r.try_get("oldest")?,
            })
        })
        .collect()
    }

    /// Unfinished sagas with an error, grouped by its text, largest groups first.
    pub async fn failing_by_error(&self, groups: i64) -> Result<Vec<ErrorGroup>> {
        sqlx::query(
            "SELECT error, definition, count(*) AS n, min(updated_at) AS oldest FROM sagas \
             WHERE status IN ('running', 'compensating', 'needs_operator') AND error IS NOT NULL \
             GROUP BY error, definition ORDER BY count(*) DESC, min(updated_at) LIMIT $1",
        )
        .bind(groups)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(ErrorGroup {
                error: r.try_get("error")?,
                definition: r.try_get("definition")?,
                count: r.try_get::<i64, _>("n")?.max(0) as u64,
                oldest_updated_at: r.try_get("oldest")?,
            })
        })
        .collect()
    }

    /// The saga a command was sent for.
    pub async fn saga_of_command(&self, command_id: Uuid) -> Result<Option<Uuid>> {
        Ok(
            sqlx::query_scalar("SELECT saga_id FROM step_attempts WHERE command_id = $1")
                .bind(command_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// The saga started with an idempotency key.
    pub async fn saga_of_key(&self, key: &str) -> Result<Option<Uuid>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM sagas WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(self.pool())
                .await?,
        )
    }
}

fn version_of(r: &sqlx::postgres::PgRow) -> Result<u32> {
    let version: i32 = r.try_get("definition_version")?;
    u32::try_from(version).map_err(|_| StoreError::Corrupt(format!("definition version {version}")))
}
