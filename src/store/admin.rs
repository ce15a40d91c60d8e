//! Operator queries and repairs: each repair is one transaction through the engine, recorded in
//! the saga's history with the operator's name and reason.

use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ACTIVE, ListFilter, Result, Store, StoreError, Writes, ctx, definition_of, filtered, lock_saga,
    parse_status, saga_from_row,
};
use crate::definition::Registry;
use crate::engine::{self, Operator, Repair, Status};

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
    pub async fn repair(
        &self,
        registry: &Registry,
        id: Uuid,
        repair: Repair,
        by: &Operator,
        now: OffsetDateTime,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        let mut record = lock_saga(&mut tx, id).await?;
        let def = definition_of(registry, &record)?;
        let t = engine::repair(&def, &record.state, repair, by, ctx(now))
            .map_err(|refused| StoreError::FailedPrecondition(refused.0))?;
        let mut writes = Writes::default();
        writes.stage(&def, &mut record, t, now)?;
        let flushed = writes.flush(&mut tx, now, self.circuit()).await?;
        tx.commit().await?;
        self.committed(flushed);
        Ok(())
    }

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

    /// "Retry now" for each saga, in one transaction. Sagas whose state refuses it (finished or
    /// repaired meanwhile) are skipped, not failed. Returns (retried, skipped).
    pub async fn retry_batch(
        &self,
        registry: &Registry,
        ids: &[Uuid],
        by: &Operator,
        now: OffsetDateTime,
    ) -> Result<(Vec<Uuid>, Vec<Uuid>)> {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let (mut retried, mut skipped) = (Vec::new(), Vec::new());
        let mut writes = Writes::default();
        for row in rows {
            let mut record = saga_from_row(&row)?;
            let def = definition_of(registry, &record)?;
            match engine::repair(&def, &record.state, Repair::RetryNow, by, ctx(now)) {
                Ok(t) => {
                    retried.push(record.id);
                    writes.stage(&def, &mut record, t, now)?;
                }
                Err(_) => skipped.push(record.id),
            }
        }
        let flushed = writes.flush(&mut tx, now, self.circuit()).await?;
        tx.commit().await?;
        self.committed(flushed);
        // Sagas that vanished between the match and the lock count as skipped too.
        let vanished: Vec<Uuid> = ids
            .iter()
            .filter(|id| !retried.contains(id) && !skipped.contains(id))
            .copied()
            .collect();
        skipped.extend(vanished);
        Ok((retried, skipped))
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
            "SELECT definition, current_step, current_participant, status, count(*) AS n, min(updated_at) AS oldest \
             FROM sagas WHERE status IN ('running', 'compensating', 'needs_operator') \
               AND ($1::text IS NULL OR definition = $1) \
             GROUP BY definition, current_step, current_participant, status \
             ORDER BY definition, current_step, status",
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
}
