//! The PostgreSQL store: saga rows, attempts, history and the outbox.
//!
//! Every transition runs in one transaction: lock the saga row, run the engine, write the new
//! state, the attempts, the history and the outbox rows, commit, then wake the relay. Commands
//! are never published from here: the outbox relay does that after the commit.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::definition::{Definition, Registry};
use crate::engine::{self, Ctx, Event, Kind, Outcome, SagaState, Status, Waiting};
use crate::metrics::Metrics;
use std::collections::{HashMap, HashSet};
use tokio::sync::Notify;

/// The columns [`saga_from_row`] reads; a macro so queries stay `&'static str` literals.
macro_rules! saga_columns {
    () => {
        "id, definition, definition_version, status, step, kind, attempt, command_id, wake_at, \
         input, outputs, error, idempotency_key, created_at, updated_at, current_step, traceparent, started_by"
    };
}

mod admin;
mod starts;
mod writes;
pub use admin::StepCount;
use writes::{Flushed, Writes};
pub mod outbox;
pub mod participants;

pub use outbox::OutboxMessage;
pub use participants::{Circuit, ParticipantRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable or refused the statement; worth retrying.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    DefinitionConflict(String),
    /// The request does not fit the saga's state (an operator repair refused by the engine).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An idempotency key already names a saga started with a different request.
    #[error("{0}")]
    AlreadyExists(String),
    /// A row the engine cannot read: a bug or a hand edit, never the caller's fault.
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
    pub state: SagaState,
    pub input: Value,
    pub outputs: Value,
    pub idempotency_key: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// The step being executed or compensated; `None` once finished.
    pub current_step: Option<String>,
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
    /// Only unfinished sagas whose current step runs on this participant.
    pub participant: Option<String>,
    /// Only unfinished sagas whose current step is this one.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyResult {
    /// The reply moved the saga on.
    Applied,
    /// A late reply (its attempt had ended, or the saga had): recorded on the attempt and in
    /// the history, but it changed nothing.
    Recorded,
    /// The command had already been answered: nothing changed.
    Duplicate,
    /// No command with this id was ever sent.
    UnknownCommand,
}

/// When a participant's circuit opens, and how long it stays open before a probe.
#[derive(Debug, Clone, Copy)]
pub struct CircuitSettings {
    /// Consecutive timeouts or transient failures that open the circuit.
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    circuit: CircuitSettings,
    signals: Signals,
    /// New sagas go to the writer that inserts them in groups (see [`starts`]).
    starts: tokio::sync::mpsc::Sender<starts::NewSaga>,
    start_queue: starts::Queue,
}

/// Saga ids the change feed holds for its slowest watcher.
const WATCH_FEED: usize = 4096;

/// What a committed transaction tells the rest of the process.
#[derive(Clone)]
struct Signals {
    metrics: Arc<Metrics>,
    /// Signalled after every commit that wrote outbox rows: the relays of this process wait on
    /// it (rows another replica wrote are found by their polling).
    outbox_ready: Arc<Notify>,
    /// Ids of the sagas each commit changed: the one feed every `WatchSaga` stream filters.
    changed: tokio::sync::broadcast::Sender<Uuid>,
}

impl Signals {
    /// What a batch does once its transaction has committed (never before: a rolled-back batch
    /// must not count nor wake anyone).
    fn committed(&self, flushed: Flushed) {
        for (definition, status) in &flushed.lifecycle {
            self.metrics.saga_event(definition, *status);
        }
        for s in &flushed.steps {
            self.metrics
                .step_ended(&s.participant, &s.step, &s.kind, s.outcome, s.took);
        }
        for participant in &flushed.reclosed {
            tracing::info!(participant, "circuit closed: the participant answers again");
        }
        if flushed.outbox {
            self.outbox_ready.notify_one();
        }
        for id in flushed.changed {
            // No receiver (nobody watching) is not an error.
            let _ = self.changed.send(id);
        }
    }
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
        let signals = Signals {
            metrics: Arc::new(Metrics::new()),
            outbox_ready: Arc::new(Notify::new()),
            changed: tokio::sync::broadcast::channel(WATCH_FEED).0,
        };
        let (starts, start_queue) = starts::queue();
        Ok(Store {
            starts,
            start_queue,
            pool,
            circuit: CircuitSettings::default(),
            signals,
        })
    }

    /// A connection outside the pool, with the pool's session settings.
    pub async fn dedicated_connection(&self) -> Result<PgConnection> {
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        session_settings(&mut conn).await?;
        Ok(conn)
    }

    pub fn with_circuit(mut self, circuit: CircuitSettings) -> Store {
        self.circuit = circuit;
        self
    }

    /// Whether the database answers within `within`.
    pub async fn ping(&self, within: Duration) -> bool {
        tokio::time::timeout(within, sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The task that writes new sagas (see [`starts`]); `start_saga` waits until it runs.
    pub fn start_writer(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + use<> {
        starts::run_writer(
            self.pool.clone(),
            self.signals.clone(),
            self.start_queue.clone(),
            shutdown,
        )
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.signals.metrics
    }

    /// Resolves when outbox rows may be waiting: a permit is kept if no relay is waiting, so a
    /// commit that lands while every relay is busy is not missed.
    pub async fn outbox_ready(&self) {
        self.signals.outbox_ready.notified().await
    }

    /// Wakes a relay, e.g. when held commands may go out again.
    /// Ids of the sagas this process's commits change, as they commit. A receiver that falls
    /// more than the feed's capacity behind gets `Lagged` and must re-read what it watches.
    pub fn saga_changes(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.signals.changed.subscribe()
    }

    pub fn wake_relay(&self) {
        self.signals.outbox_ready.notify_one();
    }

    fn committed(&self, flushed: Flushed) {
        self.signals.committed(flushed)
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

    pub fn circuit(&self) -> CircuitSettings {
        self.circuit
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
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

    /// Starts a saga, or returns the one an earlier call with the same idempotency key started.
    /// Returns once the saga is committed; concurrent calls share one statement and one commit,
    /// written by the [`start_writer`](Store::start_writer) task, which must be running.
    pub async fn start_saga(
        &self,
        def: &Arc<Definition>,
        input: Value,
        idempotency_key: Option<&str>,
        traceparent: Option<String>,
        started_by: Option<&str>,
    ) -> Result<(Uuid, bool, Status)> {
        let id = Uuid::now_v7();
        // Kept to tell a retry (same input) from a different request reusing the key.
        let keyed_input = idempotency_key.map(|_| input.clone());
        // Its times are those of the group it is written with.
        let now = OffsetDateTime::now_utc();
        let record = SagaRecord {
            id,
            definition: def.name.clone(),
            definition_version: def.version,
            state: SagaState::new(),
            input,
            outputs: json!({}),
            idempotency_key: idempotency_key.map(str::to_owned),
            created_at: now,
            updated_at: now,
            current_step: None,
            traceparent,
            started_by: started_by.map(str::to_owned),
        };
        let (done, written) = tokio::sync::oneshot::channel();
        let new = starts::NewSaga {
            def: def.clone(),
            record,
            done,
        };
        // Either side gone means the process is stopping.
        self.starts
            .send(new)
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let (inserted, status) = written.await.map_err(|_| sqlx::Error::PoolClosed)??;
        if inserted {
            return Ok((id, true, status));
        }
        // Compared as jsonb, so a retry that spells a number or orders keys differently is
        // still the same input.
        let row = sqlx::query(
            "SELECT id, definition, status, started_by, input = $2 AS same_input \
             FROM sagas WHERE idempotency_key = $1",
        )
        .bind(idempotency_key)
        .bind(sqlx::types::Json(keyed_input.unwrap_or_default()))
        .fetch_one(&self.pool)
        .await?;
        let existing: Uuid = row.try_get("id")?;
        let existing_def: String = row.try_get("definition")?;
        let owner: Option<String> = row.try_get("started_by")?;
        if owner.as_deref() != started_by {
            // Another caller's key: say nothing about its saga.
            return Err(StoreError::InvalidArgument(
                "idempotency key already used by another caller".into(),
            ));
        }
        if existing_def != def.name {
            return Err(StoreError::AlreadyExists(format!(
                "idempotency key already used by saga {existing} of definition {existing_def}"
            )));
        }
        let same_input: Option<bool> = row.try_get("same_input")?;
        if same_input != Some(true) {
            return Err(StoreError::AlreadyExists(format!(
                "idempotency key already used by saga {existing} with a different input"
            )));
        }
        Ok((existing, false, parse_status(&row)?))
    }

    /// Applies a participant's reply. Safe to call any number of times for the same reply.
    pub async fn apply_reply(
        &self,
        registry: &Registry,
        command_id: Uuid,
        outcome: Outcome,
        now: OffsetDateTime,
    ) -> Result<ReplyResult> {
        let results = self
            .apply_replies(registry, vec![(command_id, outcome)], now)
            .await?;
        results
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt("a reply was applied without a result".into()))
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

    /// Applies a batch of replies in one transaction (one result per reply, in order). The
    /// sagas are locked in id order, so concurrent batches cannot deadlock; two replies for the
    /// same saga apply one after the other; the same reply twice applies once.
    pub async fn apply_replies(
        &self,
        registry: &Registry,
        replies: Vec<(Uuid, Outcome)>,
        now: OffsetDateTime,
    ) -> Result<Vec<ReplyResult>> {
        let ids: Vec<Uuid> = replies.iter().map(|(id, _)| *id).collect();
        let mut tx = self.pool.begin().await?;
        // An attempt's saga, step and kind never change, so reading them along with the lock
        // is exact; whether it was answered can change while we wait for the lock, see below.
        let rows = sqlx::query(
            "SELECT s.*, a.command_id AS reply_to, a.step_index AS reply_step, a.kind AS reply_kind \
             FROM step_attempts a JOIN sagas s ON s.id = a.saga_id WHERE a.command_id = ANY($1) \
             ORDER BY s.id FOR UPDATE OF s",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut sagas: HashMap<Uuid, SagaRecord> = HashMap::new();
        let mut saga_of: HashMap<Uuid, (Uuid, usize, Kind)> = HashMap::new();
        for row in &rows {
            let record = saga_from_row(row)?;
            let step: i32 = row.try_get("reply_step")?;
            saga_of.insert(
                row.try_get("reply_to")?,
                (
                    record.id,
                    step as usize,
                    parse_kind(row.try_get("reply_kind")?)?,
                ),
            );
            sagas.insert(record.id, record);
        }
        // The locked rows are the latest versions: a saga still waiting for a command has not
        // had it answered. Only replies to other commands (late or duplicate) need the attempt
        // itself, read now that the locks are held.
        let awaited = |command_id: &Uuid| {
            saga_of.get(command_id).is_some_and(|(saga, _, _)| {
                sagas.get(saga).is_some_and(|s| matches!(s.state.waiting, Waiting::Reply { command_id: c, .. } if c == *command_id))
            })
        };
        let others: Vec<Uuid> = saga_of.keys().filter(|c| !awaited(c)).copied().collect();
        let mut answered: HashSet<Uuid> = HashSet::new();
        if !others.is_empty() {
            answered = sqlx::query_scalar(
                "SELECT command_id FROM step_attempts WHERE command_id = ANY($1) AND replied_at IS NOT NULL",
            )
            .bind(&others)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        }
        let mut writes = Writes::default();
        let mut seen = HashSet::new();
        let mut results = Vec::with_capacity(replies.len());
        for (command_id, outcome) in replies {
            let Some(&(saga_id, step, kind)) = saga_of.get(&command_id) else {
                results.push(ReplyResult::UnknownCommand);
                continue;
            };
            if answered.contains(&command_id) || !seen.insert(command_id) {
                results.push(ReplyResult::Duplicate);
                continue;
            }
            let record = sagas
                .get_mut(&saga_id)
                .ok_or_else(|| StoreError::Corrupt("locked saga vanished".into()))?;
            let def = definition_of(registry, record)?;
            let t = engine::apply(
                &def,
                &record.state,
                Event::Reply {
                    command_id,
                    outcome,
                    answers: Some((step, kind)),
                },
                ctx(now),
            );
            let changed = t.state != record.state;
            writes.stage(&def, record, t, now)?;
            results.push(if changed {
                ReplyResult::Applied
            } else {
                ReplyResult::Recorded
            });
        }
        let flushed = writes.flush(&mut tx, now, self.circuit).await?;
        tx.commit().await?;
        self.committed(flushed);
        Ok(results)
    }

    /// Delivers the timer event to up to `limit` sagas whose wake-up time has passed. Rows locked
    /// by another replica are skipped, not waited for. Returns how many fired.
    pub async fn fire_due_timers(
        &self,
        registry: &Registry,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE wake_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = sagas.command_id) \
             ORDER BY wake_at LIMIT $2 FOR UPDATE OF sagas SKIP LOCKED"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let n = rows.len();
        let mut writes = Writes::default();
        for row in rows {
            let mut record = saga_from_row(&row)?;
            let def = definition_of(registry, &record)?;
            let t = engine::apply(&def, &record.state, Event::Timer, ctx(now));
            writes.stage(&def, &mut record, t, now)?;
        }
        let flushed = writes.flush(&mut tx, now, self.circuit).await?;
        tx.commit().await?;
        self.committed(flushed);
        Ok(n)
    }

    pub async fn get_saga(
        &self,
        id: Uuid,
    ) -> Result<(SagaRecord, Vec<AttemptRecord>, Vec<HistoryRecord>)> {
        let row = sqlx::query(concat!(
            "SELECT ",
            saga_columns!(),
            " FROM sagas WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("saga {id} not found")))?;
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
        Ok((saga, attempts, history))
    }

    /// The name of the token that started the saga; `NotFound` if there is no such saga.
    pub async fn saga_owner(&self, id: Uuid) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT started_by FROM sagas WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("saga {id} not found")))
    }

    pub async fn saga_status(&self, id: Uuid) -> Result<Status> {
        let row = sqlx::query("SELECT status FROM sagas WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("saga {id} not found")))?;
        parse_status(&row)
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
        q.push(" AND current_participant = ").push_bind(p);
    }
    if let Some(s) = &f.step {
        q.push(" AND current_step = ").push_bind(s);
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

async fn lock_saga(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<SagaRecord> {
    let row = sqlx::query(concat!(
        "SELECT ",
        saga_columns!(),
        " FROM sagas WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("saga {id} not found")))?;
    saga_from_row(&row)
}

fn definition_of(registry: &Registry, record: &SagaRecord) -> Result<std::sync::Arc<Definition>> {
    registry
        .get(&record.definition, record.definition_version)
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "saga {} runs on {} version {}, which is not loaded",
                record.id, record.definition, record.definition_version
            ))
        })
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

fn saga_from_row(row: &PgRow) -> Result<SagaRecord> {
    let command_id: Option<Uuid> = row.try_get("command_id")?;
    let wake_at: Option<OffsetDateTime> = row.try_get("wake_at")?;
    let waiting = match (command_id, wake_at) {
        (Some(command_id), Some(deadline)) => Waiting::Reply {
            command_id,
            deadline,
        },
        (None, Some(at)) => Waiting::Retry { at },
        (None, None) => Waiting::Nothing,
        (Some(_), None) => return Err(StoreError::Corrupt("command without a deadline".into())),
    };
    let step: i32 = row.try_get("step")?;
    let attempt: i32 = row.try_get("attempt")?;
    Ok(SagaRecord {
        id: row.try_get("id")?,
        definition: row.try_get("definition")?,
        definition_version: row.try_get::<i32, _>("definition_version")? as u32,
        state: SagaState {
            status: parse_status(row)?,
            step: step as usize,
            kind: parse_kind(row.try_get("kind")?)?,
            attempt: attempt as u32,
            waiting,
            error: row.try_get("error")?,
        },
        input: row.try_get("input")?,
        outputs: row.try_get("outputs")?,
        idempotency_key: row.try_get("idempotency_key")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        current_step: row.try_get("current_step")?,
        traceparent: row.try_get("traceparent")?,
        started_by: row.try_get("started_by")?,
    })
}

/// The outside world's inputs to one transition: now, a fresh command id, random jitter.
fn ctx(now: OffsetDateTime) -> Ctx {
    Ctx {
        now,
        next_command_id: Uuid::now_v7(),
        jitter: rand::random::<f64>(),
    }
}
