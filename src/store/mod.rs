//! The PostgreSQL store: saga rows, attempts, history, the outbox and participants.
//!
//! Persistence only: narrow, typed reads and writes, and the transaction a transition runs in
//! ([`Tx`]: lock the sagas, write the staged rows, commit). What a transition does is the
//! driver's (`crate::driver`); commands are never published from here: the outbox relay does
//! that after the commit. Errors say what failed in storage terms; the API maps them.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::breaker::CircuitSettings;
use crate::definition::{Definition, Registry};
use crate::engine::{Kind, Status};
use crate::graph::{GraphState, StepState};

/// The columns [`saga_from_row`] reads; a macro so queries stay `&'static str` literals.
macro_rules! saga_columns {
    () => {
        "id, definition, definition_version, status, graph, error, input, outputs, idempotency_key, \
         created_at, updated_at, current_steps, traceparent, started_by"
    };
}

mod admin;
mod writes;
pub use admin::StepCount;
pub use writes::{Flushed, StepEnded, Writes};
pub mod outbox;
pub mod participants;

pub use outbox::{OutboxMessage, OutboxSession, OutboxTx};
pub use participants::ParticipantRecord;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable or refused the statement; worth retrying.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A definition file differs from the stored snapshot of the same name and version.
    #[error("{0}")]
    DefinitionConflict(String),
    /// A row that cannot be read back (or written from what the engine gave): a bug or a hand
    /// edit, never the caller's fault.
    #[error("corrupt saga state: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// The database refused a value it was given (SQLSTATE class 22, "data exception": say, a
    /// `\u0000` in a JSON string, which `jsonb` cannot hold): sending the same value again will
    /// never succeed, so it is the sender's error, not an outage. The message names the problem.
    pub fn refused_value(&self) -> Option<String> {
        let StoreError::Database(sqlx::Error::Database(e)) = self else {
            return None;
        };
        e.code()
            .is_some_and(|code| code.starts_with("22"))
            .then(|| e.message().to_string())
    }
}

/// A saga as stored, with what the API shows.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    pub id: Uuid,
    pub definition: String,
    pub definition_version: u32,
    pub state: GraphState,
    pub input: Value,
    pub outputs: Value,
    pub idempotency_key: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// The steps being executed, retried or compensated, or blocked on, in definition order;
    /// none once finished.
    pub current_steps: Vec<String>,
    /// W3C trace context of the call that started the saga.
    pub traceparent: Option<String>,
    /// Name of the API token that started it (none without authentication).
    pub started_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub command_id: Uuid,
    pub step: String,
    pub participant: String,
    pub kind: Kind,
    pub attempt: u32,
    pub sent_at: OffsetDateTime,
    pub replied_at: Option<OffsetDateTime>,
    pub outcome: Option<String>,
    pub output: Option<Value>,
    pub reason: Option<String>,
    pub timed_out: bool,
    pub superseded: bool,
}

#[derive(Debug, Clone)]
pub struct HistoryRecord {
    pub seq: i64,
    pub at: OffsetDateTime,
    pub kind: String,
    pub step: Option<String>,
    pub command_id: Option<Uuid>,
    pub detail: Value,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub statuses: Vec<Status>,
    pub definition: Option<String>,
    pub definition_version: Option<u32>,
    /// Only unfinished sagas not updated since this time.
    pub stuck_since: Option<OffsetDateTime>,
    /// Only unfinished sagas with a current step on this participant.
    pub participant: Option<String>,
    /// Only unfinished sagas with this step among their current ones.
    pub step: Option<String>,
    pub created_after: Option<OffsetDateTime>,
    pub created_before: Option<OffsetDateTime>,
    pub updated_after: Option<OffsetDateTime>,
    pub updated_before: Option<OffsetDateTime>,
    /// Case-insensitive substring of the error.
    pub error_contains: Option<String>,
    /// Only sagas started with this token (participants see their own sagas only).
    pub started_by: Option<String>,
    /// Only sagas with an id below this one (the previous page's last id).
    pub before: Option<Uuid>,
    pub limit: u32,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// Applied to every connection sagad opens. Every statement sagad runs on a busy table is
/// written for an index, and PostgreSQL would not always agree: a connection caches a generic
/// plan after a statement's fifth run, and on a database younger than autovacuum's first
/// `ANALYZE` that plan is a sequential scan, kept for the connection's life while the tables
/// grow (measured in the bench: 5M rows of `sagas` read by 3,000 such scans in one 15 s run).
/// Disabling sequential scans makes the index plan win whatever the statistics; a statement
/// with no index path still scans, at a penalised cost, which would in turn make plans look
/// expensive enough to JIT-compile (≈100 ms each), hence `jit`. Set by statements rather than
/// as startup options, which connection poolers such as PgBouncer refuse by default.
async fn session_settings(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::raw_sql("SET enable_seqscan = off; SET jit = off")
        .execute(conn)
        .await
        .map(drop)
}

/// Whether `url` is a connection URL the store can use; the error says what is wrong with it.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    PgConnectOptions::from_str(url)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Store {
    /// Connects, creating the database first if the server does not have it yet, so a fresh
    /// machine needs no set-up step.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let options = PgConnectOptions::from_str(url)?;
        if let Some(db) = options.get_database().map(str::to_owned) {
            let admin = options.clone().database("postgres");
            let mut conn = PgConnection::connect_with(&admin).await?;
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&db)
                    .fetch_one(&mut conn)
                    .await?;
            if !exists {
                // Identifiers cannot be bound; quote it instead.
                let stmt = format!("CREATE DATABASE \"{}\"", db.replace('"', "\"\""));
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(stmt))
                    .execute(&mut conn)
                    .await
                {
                    // Another replica may have created it a moment ago.
                    let raced = e
                        .as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == "42P04");
                    if !raced {
                        return Err(e.into());
                    }
                }
            }
            conn.close().await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _| Box::pin(session_settings(conn)))
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// A connection outside the pool, with the pool's session settings.
    pub async fn dedicated_connection(&self) -> Result<PgConnection> {
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        session_settings(&mut conn).await?;
        Ok(conn)
    }

    /// Whether the database answers within `within`.
    pub async fn ping(&self, within: Duration) -> bool {
        tokio::time::timeout(within, sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Waits for the pool's connections to be returned, then closes them.
    pub async fn close(&self) {
        self.pool.close().await
    }

    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// Messages waiting in the outbox, and how long the oldest has waited.
    pub async fn outbox_backlog(&self) -> Result<(i64, Duration)> {
        let row = sqlx::query("SELECT count(*) AS n, EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS age FROM outbox")
            .fetch_one(&self.pool)
            .await?;
        let age: Option<f64> = row.try_get("age")?;
        Ok((
            row.try_get("n")?,
            Duration::from_secs_f64(age.unwrap_or(0.0).max(0.0)),
        ))
    }

    /// Records the definitions from files and returns every version known, including older
    /// ones that sagas still run on. A file whose content differs from the stored snapshot of
    /// the same name and version is refused: sagas started on that version must not change.
    pub async fn sync_definitions(&self, defs: &[Definition]) -> Result<Registry> {
        for def in defs {
            let body = serde_json::to_value(def).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "INSERT INTO saga_definitions (name, version, body) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(&def.name)
            .bind(def.version as i32)
            .bind(&body)
            .execute(&self.pool)
            .await?;
            let stored: Value = sqlx::query_scalar(
                "SELECT body FROM saga_definitions WHERE name = $1 AND version = $2",
            )
            .bind(&def.name)
            .bind(def.version as i32)
            .fetch_one(&self.pool)
            .await?;
            if stored != body {
                return Err(StoreError::DefinitionConflict(format!(
                    "definition {} version {} differs from the one sagas already started on; \
                     give the changed definition a new version",
                    def.name, def.version
                )));
            }
        }
        // Every stored version stays usable for the sagas running on it, but only the files of
        // this start say what new sagas start on: a version no longer shipped is retired.
        let mut registry = Registry::default();
        for def in defs {
            registry.insert(def.clone());
        }
        for row in sqlx::query("SELECT body FROM saga_definitions")
            .fetch_all(&self.pool)
            .await?
        {
            let body: Value = row.try_get("body")?;
            let def: Definition = serde_json::from_value(body)
                .map_err(|e| StoreError::Corrupt(format!("stored definition: {e}")))?;
            registry.insert_retired(def);
        }
        Ok(registry)
    }

    /// Opens the transaction a batch of transitions runs in.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(Tx {
            tx: self.pool.begin().await?,
        })
    }

    /// Inserts new sagas (`records`, each staged in `writes` with its first transition, in the
    /// same order) with everything those transitions wrote, in one autocommitted statement.
    /// Returns the ids inserted: a saga whose idempotency key was taken (by an earlier saga, or
    /// by one before it in `records`) is not, and nothing of it is written.
    pub async fn insert_new(
        &self,
        writes: Writes,
        records: &[SagaRecord],
        now: OffsetDateTime,
    ) -> Result<(HashSet<Uuid>, Flushed)> {
        writes.insert_new(&self.pool, records, now).await
    }

    /// The saga an idempotency key names, compared with `input` as jsonb (so a retry that
    /// spells a number or orders keys differently is still the same input).
    pub async fn saga_by_key(&self, key: &str, input: &Value) -> Result<Option<KeyedSaga>> {
        let row = sqlx::query(
            "SELECT id, definition, status, started_by, input = $2 AS same_input \
             FROM sagas WHERE idempotency_key = $1",
        )
        .bind(key)
        .bind(sqlx::types::Json(input))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(KeyedSaga {
                id: row.try_get("id")?,
                definition: row.try_get("definition")?,
                status: parse_status(&row)?,
                started_by: row.try_get("started_by")?,
                same_input: row.try_get::<Option<bool>, _>("same_input")? == Some(true),
            })
        })
        .transpose()
    }

    /// The participant a command was sent to, `None` if no such command exists.
    pub async fn command_participant(&self, command_id: Uuid) -> Result<Option<String>> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT participant FROM step_attempts WHERE command_id = $1")
                .bind(command_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(p,)| p))
    }

    /// A saga with its attempts and history; `None` if there is no such saga.
    pub async fn get_saga(&self, id: Uuid) -> Result<Option<SagaDetail>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let saga = saga_from_row(&row)?;
        let attempts = sqlx::query(
            "SELECT command_id, step, participant, kind, attempt, sent_at, replied_at, outcome, output, reason, \
             timed_out, superseded FROM step_attempts WHERE saga_id = $1 ORDER BY sent_at, attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(AttemptRecord {
                command_id: r.try_get("command_id")?,
                step: r.try_get("step")?,
                participant: r.try_get("participant")?,
                kind: parse_kind(r.try_get("kind")?)?,
                attempt: r.try_get::<i32, _>("attempt")? as u32,
                sent_at: r.try_get("sent_at")?,
                replied_at: r.try_get("replied_at")?,
                outcome: r.try_get("outcome")?,
                output: r.try_get("output")?,
                reason: r.try_get("reason")?,
                timed_out: r.try_get("timed_out")?,
                superseded: r.try_get("superseded")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let history = self.history_after(id, 0).await?;
        Ok(Some((saga, attempts, history)))
    }

    /// The name of the token that started the saga (`Some(None)`: no token); `None` if there
    /// is no such saga.
    pub async fn saga_owner(&self, id: Uuid) -> Result<Option<Option<String>>> {
        Ok(
            sqlx::query_scalar("SELECT started_by FROM sagas WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// `None` if there is no such saga.
    pub async fn saga_status(&self, id: Uuid) -> Result<Option<Status>> {
        let row = sqlx::query("SELECT status FROM sagas WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(parse_status).transpose()
    }

    pub async fn history_after(&self, id: Uuid, after_seq: i64) -> Result<Vec<HistoryRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, step, command_id, detail FROM saga_history WHERE saga_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id)
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(history_from_row).collect()
    }

    /// Newest first. Pages by id (UUIDv7 ids sort by creation), so pages stay stable while new
    /// sagas arrive.
    pub async fn list_sagas(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>> {
        let mut q = filtered(
            concat!("SELECT ", saga_columns!(), " FROM sagas WHERE true"),
            filter,
        );
        if let Some(before) = filter.before {
            q.push(" AND id < ").push_bind(before);
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(filter.limit));
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(saga_from_row).collect()
    }

    /// The newest `limit` sagas whose input contains `value` (`@>`). Finished sagas are found
    /// on the GIN index, which holds finished sagas only: an unfinished row is rewritten by
    /// each of its transitions, and an index over it would take an entry per transition, where
    /// this one takes one per saga, when it ends. Unfinished ones are few and read through the
    /// partial index on their status.
    pub async fn sagas_with_input(&self, value: &Value, limit: i64) -> Result<Vec<SagaRecord>> {
        let rows = sqlx::query(concat!(
            "(SELECT ",
            saga_columns!(),
            " FROM sagas \
               WHERE status IN ('completed', 'compensated', 'resolved') AND input @> $1 \
               ORDER BY id DESC LIMIT $2) \
             UNION ALL \
             (SELECT ",
            saga_columns!(),
            " FROM sagas \
               WHERE status IN ('running', 'compensating', 'needs_operator') AND input @> $1 \
               ORDER BY id DESC LIMIT $2) \
             ORDER BY id DESC LIMIT $2",
        ))
        .bind(value)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(saga_from_row).collect()
    }
}

/// A saga as `GetSaga` shows it: the row, its attempts, its history.
pub type SagaDetail = (SagaRecord, Vec<AttemptRecord>, Vec<HistoryRecord>);

/// The saga an idempotency key already names.
#[derive(Debug, Clone)]
pub struct KeyedSaga {
    pub id: Uuid,
    pub definition: String,
    pub status: Status,
    pub started_by: Option<String>,
    /// Whether it was started with the same input (compared as jsonb).
    pub same_input: bool,
}

/// A command as sent: which saga, step and kind it belongs to. These never change once the
/// attempt is written, so reading them along with the saga's lock is exact.
#[derive(Debug, Clone, Copy)]
pub struct SentCommand {
    pub saga_id: Uuid,
    pub step: usize,
    pub kind: Kind,
}

/// What a reply batch locked: the sagas, the commands the replies answer (unknown ids are
/// missing), and those among them already answered.
#[derive(Debug, Default)]
pub struct ReplyTargets {
    pub sagas: HashMap<Uuid, SagaRecord>,
    pub commands: HashMap<Uuid, SentCommand>,
    pub answered: HashSet<Uuid>,
}

/// The transaction a batch of transitions runs in: the sagas it locks stay locked until
/// [`Tx::commit`]; dropped without a commit, it rolls back.
pub struct Tx {
    tx: Transaction<'static, Postgres>,
}

impl Tx {
    /// Locks one saga; `None` if there is no such saga.
    pub async fn lock_saga(&mut self, id: Uuid) -> Result<Option<SagaRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.as_ref().map(saga_from_row).transpose()
    }

    /// Locks the sagas of `ids` that exist, in id order (so concurrent batches cannot deadlock).
    pub async fn lock_sagas(&mut self, ids: &[Uuid]) -> Result<Vec<SagaRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(saga_from_row).collect()
    }

    /// Locks up to `limit` sagas whose wake-up time has passed at `now`, skipping rows another
    /// replica holds, and those with a command still waiting in the outbox (a held
    /// participant's deadline only runs once its command is out; the saga's other timers wait
    /// with it, which only delays them).
    pub async fn lock_due(&mut self, now: OffsetDateTime, limit: i64) -> Result<Vec<SagaRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE wake_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = ANY(sagas.command_ids)) \
             ORDER BY wake_at LIMIT $2 FOR UPDATE OF sagas SKIP LOCKED"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(saga_from_row).collect()
    }

    /// Locks the sagas the commands `command_ids` belong to, in id order.
    pub async fn lock_reply_targets(&mut self, command_ids: &[Uuid]) -> Result<ReplyTargets> {
        let rows = sqlx::query(
            "SELECT s.*, a.command_id AS reply_to, a.step_index AS reply_step, a.kind AS reply_kind \
             FROM step_attempts a JOIN sagas s ON s.id = a.saga_id WHERE a.command_id = ANY($1) \
             ORDER BY s.id FOR UPDATE OF s",
        )
        .bind(command_ids)
        .fetch_all(&mut *self.tx)
        .await?;
        let mut targets = ReplyTargets::default();
        for row in &rows {
            let record = saga_from_row(row)?;
            let step: i32 = row.try_get("reply_step")?;
            targets.commands.insert(
                row.try_get("reply_to")?,
                SentCommand {
                    saga_id: record.id,
                    step: step as usize,
                    kind: parse_kind(row.try_get("reply_kind")?)?,
                },
            );
            targets.sagas.insert(record.id, record);
        }
        // The locked rows are the latest versions: a saga still waiting for a command has not
        // had it answered. Only replies to other commands (late or duplicate) need the attempt
        // itself, read now that the locks are held.
        let awaited = |command_id: &Uuid, sent: &SentCommand| {
            targets.sagas.get(&sent.saga_id).is_some_and(|s| {
                s.state
                    .steps
                    .iter()
                    .any(|st| st.command_id() == Some(*command_id))
            })
        };
        let others: Vec<Uuid> = targets
            .commands
            .iter()
            .filter(|(c, sent)| !awaited(c, sent))
            .map(|(c, _)| *c)
            .collect();
        if !others.is_empty() {
            targets.answered = sqlx::query_scalar(
                "SELECT command_id FROM step_attempts WHERE command_id = ANY($1) AND replied_at IS NOT NULL",
            )
            .bind(&others)
            .fetch_all(&mut *self.tx)
            .await?
            .into_iter()
            .collect();
        }
        Ok(targets)
    }

    /// Writes what the batch staged (see [`Writes::flush`]).
    pub async fn write(
        &mut self,
        writes: Writes,
        now: OffsetDateTime,
        circuit: CircuitSettings,
    ) -> Result<Flushed> {
        writes.flush(&mut self.tx, now, circuit).await
    }

    pub async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }
}

/// Sagas still in progress; spelled exactly like the partial indexes' predicate so the planner
/// can use them.
const ACTIVE: &str = " AND status IN ('running', 'compensating', 'needs_operator')";

/// `select` followed by the filter's conditions, every value bound, only the conditions given
/// (so each combination gets a plan fitted to it).
fn filtered(select: &'static str, f: &ListFilter) -> sqlx::QueryBuilder<Postgres> {
    let mut q = sqlx::QueryBuilder::new(select);
    if !f.statuses.is_empty() {
        let statuses: Vec<&'static str> = f.statuses.iter().map(|s| s.as_str()).collect();
        q.push(" AND status = ANY(").push_bind(statuses).push(")");
    }
    if let Some(d) = &f.definition {
        q.push(" AND definition = ").push_bind(d);
    }
    if let Some(v) = f.definition_version {
        q.push(" AND definition_version = ").push_bind(v as i32);
    }
    if f.stuck_since.is_some() || f.participant.is_some() || f.step.is_some() {
        q.push(ACTIVE);
    }
    if let Some(t) = f.stuck_since {
        q.push(" AND updated_at < ").push_bind(t);
    }
    if let Some(p) = &f.participant {
        q.push(" AND current_participants @> ")
            .push_bind(vec![p.clone()]);
    }
    if let Some(s) = &f.step {
        q.push(" AND current_steps @> ").push_bind(vec![s.clone()]);
    }
    for (t, cond) in [
        (f.created_after, " AND created_at >= "),
        (f.created_before, " AND created_at < "),
        (f.updated_after, " AND updated_at >= "),
        (f.updated_before, " AND updated_at < "),
    ] {
        if let Some(t) = t {
            q.push(cond).push_bind(t);
        }
    }
    if let Some(by) = &f.started_by {
        q.push(" AND started_by = ").push_bind(by);
    }
    if let Some(e) = &f.error_contains {
        // Escape LIKE's wildcards: the operator searches for text, not a pattern.
        let escaped = e
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        q.push(" AND error ILIKE ")
            .push_bind(format!("%{escaped}%"));
    }
    q
}

fn history_from_row(r: &PgRow) -> Result<HistoryRecord> {
    Ok(HistoryRecord {
        seq: r.try_get("seq")?,
        at: r.try_get("at")?,
        kind: r.try_get("kind")?,
        step: r.try_get("step")?,
        command_id: r.try_get("command_id")?,
        detail: r.try_get("detail")?,
    })
}

fn parse_status(row: &PgRow) -> Result<Status> {
    let s: String = row.try_get("status")?;
    Status::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("unknown status {s:?}")))
}

fn parse_kind(s: String) -> Result<Kind> {
    Kind::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("unknown kind {s:?}")))
}

/// The part of a saga's [`GraphState`] kept in the `graph` column (status and error have
/// columns of their own).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredGraph {
    pub started: bool,
    pub turned: bool,
    pub steps: Vec<StepState>,
}

fn saga_from_row(row: &PgRow) -> Result<SagaRecord> {
    let id: Uuid = row.try_get("id")?;
    let status = parse_status(row)?;
    let graph: Option<Value> = row.try_get("graph")?;
    let stored = match graph {
        Some(g) => serde_json::from_value::<StoredGraph>(g)
            .map_err(|e| StoreError::Corrupt(format!("saga {id}: step states: {e}")))?,
        // Ended before sagas had step states (see the migration that added them).
        None if status.is_terminal() => StoredGraph {
            started: true,
            turned: status == Status::Compensated,
            steps: Vec::new(),
        },
        None => {
            return Err(StoreError::Corrupt(format!(
                "saga {id} is {} but has no step states",
                status.as_str()
            )));
        }
    };
    Ok(SagaRecord {
        id,
        definition: row.try_get("definition")?,
        definition_version: row.try_get::<i32, _>("definition_version")? as u32,
        state: GraphState {
            status,
            started: stored.started,
            turned: stored.turned,
            steps: stored.steps,
            error: row.try_get("error")?,
        },
        input: row.try_get("input")?,
        outputs: row.try_get("outputs")?,
        idempotency_key: row.try_get("idempotency_key")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        current_steps: row.try_get("current_steps")?,
        traceparent: row.try_get("traceparent")?,
        started_by: row.try_get("started_by")?,
    })
}
