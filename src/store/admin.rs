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
            let version: i32 = r.try_get("definition_version")?;
            let version = u32::try_from(version)
                .map_err(|_| StoreError::Corrupt(format!("definition version {version}")))?;
            let n = r.try_get::<i64, _>("n")?.max(0) as u64;
            Ok(((r.try_get("definition")?, version), n))
        })
        .collect()
    }
}
