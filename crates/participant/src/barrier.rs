//! The barrier: one PostgreSQL transaction per command that claims its id, runs the handler (in
//! a savepoint) unless the step's record says otherwise, and stores the reply. The same
//! algorithm and tables as the Python SDK (`sdk/python/src/saga_participant/_barrier.py`);
//! docs/participants.md says why each rule exists.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use saga_contract::{MAX_JSON_DEPTH, MAX_REPLY_BYTES, NO_REASON, ReplyBody, json_depth};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tracing::warn;

use crate::{Command, Handler, Kind, Outcome};

/// The barrier tables' DDL, idempotent (`CREATE … IF NOT EXISTS`): the same statements as the
/// Python SDK's `schema.sql`, so Rust and Python participants can share a database and take
/// over each other's commands. [`ensure_schema`] runs it (the participant does at start unless
/// `ensure_schema(false)`); or apply it with your own migrations.
pub const SCHEMA: &str = include_str!("schema.sql");

/// The advisory lock both SDKs take around [`SCHEMA`]: processes starting together would race
/// on `CREATE TABLE IF NOT EXISTS` in the catalog.
const SCHEMA_LOCK: i64 = 7_265_812_349;

/// Creates the barrier tables if missing. Safe to run from every process at start.
pub async fn ensure_schema(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    tx.commit().await
}

/// The result of a command's transaction.
#[derive(Debug)]
pub(crate) struct Processed {
    /// The reply body as stored (JSON text): what every delivery of the command is answered.
    pub reply: String,
    /// An earlier delivery of the same command id stored this reply.
    pub duplicate: bool,
    /// For the log: "applied", "failed", "already applied", "blocked", "tombstone", …
    pub how: &'static str,
}

/// Why a command's transaction did not complete: the command is requeued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BarrierError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Inconsistent(String),
}

/// A reply to store instead of the handler's work, which is rolled back.
struct Rollback {
    reply: ReplyBody,
    how: &'static str,
}

fn failure(command: &Command, reason: &str, retryable: bool) -> ReplyBody {
    // PostgreSQL's jsonb refuses \u0000: a reason holding one would fail the transaction that
    // stores it, and the command would come back for ever.
    let reason = reason.trim().replace('\0', "");
    let reason = if reason.is_empty() {
        NO_REASON.to_string()
    } else {
        saga_contract::reason(&reason)
    };
    ReplyBody::failure(command.command_id, reason, retryable)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs the handler; the output as JSON text on success, the reply to store otherwise. A
/// handler's error or panic is a transient failure, never the consumer's end.
async fn call(
    handler: &Handler,
    command: &Command,
    conn: &mut PgConnection,
) -> Result<(Value, String), Rollback> {
    let outcome = AssertUnwindSafe(handler(command, conn))
        .catch_unwind()
        .await;
    let outcome = match outcome {
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            warn!(
                panic = message,
                "the handler panicked; answering a transient failure"
            );
            return Err(Rollback {
                reply: failure(command, &format!("the handler panicked: {message}"), true),
                how: "panicked",
            });
        }
        Ok(Err(e)) => {
            warn!(error = %e, "the handler failed; answering a transient failure");
            return Err(Rollback {
                reply: failure(command, &e.to_string(), true),
                how: "raised",
            });
        }
        Ok(Ok(outcome)) => outcome,
    };
    let output = match outcome {
        Outcome::Failure { reason, retryable } => {
            return Err(Rollback {
                reply: failure(command, &reason, retryable),
                how: if retryable {
                    "transient failure"
                } else {
                    "failed"
                },
            });
        }
        Outcome::Success { output } => output,
    };
    // The orchestrator dead-letters a reply it cannot take; asking again gets the same output,
    // so this is a final answer rather than a reply lost in the dead-letter queue.
    let refuse = |why: String| Rollback {
        reply: failure(command, &why, false),
        how: "output refused",
    };
    if json_depth(&output) > MAX_JSON_DEPTH {
        return Err(refuse(format!(
            "the handler's output nests deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    match serde_json::to_string(&output) {
        Ok(text) if text.len() < MAX_REPLY_BYTES - 200 => Ok((output, text)),
        Ok(text) => Err(refuse(format!(
            "the handler's output of {} bytes exceeds the reply limit of {MAX_REPLY_BYTES}",
            text.len()
        ))),
        Err(e) => Err(refuse(format!("the handler's output is not JSON: {e}"))),
    }
}

/// The savepoint the handler runs in. It is never released: the commit keeps it, and a release
/// would cost a round trip.
const SAVEPOINT: &str = "SAVEPOINT saga_barrier_handler";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT saga_barrier_handler";

/// Claims the command id and, in the same statement, inserts the step row the command's kind
/// asks for (an action's `applied` row, a compensation's tombstone) when the claim succeeded:
/// (claimed, step row inserted), one round trip. A concurrent delivery of the command waits on
/// the claim, a concurrent attempt or compensation of the step on the step row, as with two
/// statements; the step insert runs only if this delivery claimed the command.
async fn claim(
    conn: &mut PgConnection,
    participant: &str,
    command: &Command,
) -> Result<(bool, bool), BarrierError> {
    let step_insert = match command.kind {
        Kind::Action => {
            "INSERT INTO saga_barrier_steps (saga_id, step, state, action_command_id) \
             SELECT $2, $4, 'applied', $1 FROM claim \
             ON CONFLICT (saga_id, step) DO NOTHING RETURNING 1"
        }
        Kind::Compensation => {
            "INSERT INTO saga_barrier_steps \
             (saga_id, step, state, compensation_command_id, compensation_output, tombstone) \
             SELECT $2, $4, 'compensated', $1, 'null'::jsonb, true FROM claim \
             ON CONFLICT (saga_id, step) DO NOTHING RETURNING 1"
        }
    };
    let sql = format!(
        "WITH claim AS (INSERT INTO saga_barrier_commands \
         (command_id, saga_id, participant, step, kind, command, attempt) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (command_id) DO NOTHING \
         RETURNING command_id), \
         step AS ({step_insert}) \
         SELECT EXISTS (SELECT FROM claim), EXISTS (SELECT FROM step)"
    );
    let claimed: (bool, bool) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(command.command_id)
        .bind(command.saga_id)
        .bind(participant)
        .bind(&command.step)
        .bind(command.kind.as_str())
        .bind(&command.command)
        .bind(i64::from(command.attempt))
        .fetch_one(&mut *conn)
        .await?;
    Ok(claimed)
}

/// Stores the reply on the command's row and returns it as stored: the stored text is sent, so
/// the first delivery's answer and every redelivery's are the same bytes. `step_update`, a
/// data-modifying statement on the step row (`$2` the command id, `$3` the saga id, `$4` the
/// step, `$5` the output when given), runs in the same statement: one round trip.
async fn store(
    conn: &mut PgConnection,
    command: &Command,
    reply: &ReplyBody,
    step_update: Option<(&str, Option<&str>)>,
) -> Result<String, BarrierError> {
    let reply = serde_json::to_string(reply)
        .map_err(|e| BarrierError::Inconsistent(format!("a reply does not serialize: {e}")))?;
    const UPDATE: &str = "UPDATE saga_barrier_commands SET reply = $1::jsonb \
                          WHERE command_id = $2 RETURNING reply::text";
    let Some((step_update, output)) = step_update else {
        return Ok(sqlx::query_scalar(UPDATE)
            .bind(reply)
            .bind(command.command_id)
            .fetch_one(&mut *conn)
            .await?);
    };
    let sql = format!("WITH step AS ({step_update}) {UPDATE}");
    let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(reply)
        .bind(command.command_id)
        .bind(command.saga_id)
        .bind(&command.step);
    if let Some(output) = output {
        query = query.bind(output);
    }
    Ok(query.fetch_one(&mut *conn).await?)
}

/// Runs one command's transaction on `conn` and returns the reply to send.
///
/// Round trips for a new action: BEGIN, the claim with the step row, SAVEPOINT, the handler's
/// own statements, the step's output with the reply, COMMIT.
pub(crate) async fn process(
    conn: &mut PgConnection,
    participant: &str,
    command: &Command,
    handler: &Handler,
) -> Result<Processed, BarrierError> {
    let mut tx = conn.begin().await?;
    let (claimed, inserted) = claim(&mut tx, participant, command).await?;
    if !claimed {
        // Claimed by an earlier delivery: the insert waited for its transaction, so its row
        // (and reply) is committed. Answer with the same reply.
        let stored: Option<Option<String>> = sqlx::query_scalar(
            "UPDATE saga_barrier_commands SET deliveries = deliveries + 1 \
             WHERE command_id = $1 RETURNING reply::text",
        )
        .bind(command.command_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(Some(reply)) = stored else {
            return Err(BarrierError::Inconsistent(format!(
                "command {} was claimed without a reply",
                command.command_id
            )));
        };
        tx.commit().await?;
        return Ok(Processed {
            reply,
            duplicate: true,
            how: "duplicate",
        });
    }
    let (reply, how) = match (command.kind, inserted) {
        (Kind::Action, true) => apply(&mut tx, command, handler).await?,
        (Kind::Action, false) => applied_or_blocked(&mut tx, command).await?,
        (Kind::Compensation, true) => {
            // Nothing to undo (the action never applied here, or has not arrived yet): the row
            // is a tombstone that blocks a late action.
            let reply = ReplyBody::success(command.command_id, Value::Null);
            (store(&mut tx, command, &reply, None).await?, "tombstone")
        }
        (Kind::Compensation, false) => compensate(&mut tx, command, handler).await?,
    };
    tx.commit().await?;
    Ok(Processed {
        reply,
        duplicate: false,
        how,
    })
}

/// The step's state and the stored output of its action or compensation (`of`), locked.
async fn step_row(
    conn: &mut PgConnection,
    command: &Command,
    of: Kind,
) -> Result<(String, Value), BarrierError> {
    let sql = match of {
        Kind::Action => {
            "SELECT state, coalesce(action_output, 'null'::jsonb)::text FROM saga_barrier_steps \
             WHERE saga_id = $1 AND step = $2 FOR UPDATE"
        }
        Kind::Compensation => {
            "SELECT state, coalesce(compensation_output, 'null'::jsonb)::text \
             FROM saga_barrier_steps WHERE saga_id = $1 AND step = $2 FOR UPDATE"
        }
    };
    let row: Option<(String, String)> = sqlx::query_as(sql)
        .bind(command.saga_id)
        .bind(&command.step)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((state, output)) = row else {
        return Err(BarrierError::Inconsistent(
            "the step's barrier row vanished".into(),
        ));
    };
    let output = serde_json::from_str(&output)
        .map_err(|e| BarrierError::Inconsistent(format!("a stored output does not parse: {e}")))?;
    Ok((state, output))
}

/// Runs the handler in the savepoint; on success stores `step_update` (with the output as `$5`)
/// and the success reply in one statement. On any failure the savepoint is rolled back and
/// `undo` (a statement on the step row, or nothing) runs with the failure reply instead.
async fn run_handler(
    tx: &mut PgConnection,
    command: &Command,
    handler: &Handler,
    step_update: &str,
    undo: Option<&str>,
    how: &'static str,
) -> Result<(String, &'static str), BarrierError> {
    sqlx::raw_sql(SAVEPOINT).execute(&mut *tx).await?;
    let rollback = match call(handler, command, tx).await {
        Ok((output, text)) => {
            let reply = ReplyBody::success(command.command_id, output);
            match store(tx, command, &reply, Some((step_update, Some(&text)))).await {
                Ok(stored) => return Ok((stored, how)),
                // The handler left the transaction failed (it caught an error and returned
                // success anyway) or its output cannot be stored: a transient failure, rolled
                // back, rather than a redelivery loop.
                Err(BarrierError::Database(e)) if e.as_database_error().is_some() => Rollback {
                    reply: failure(
                        command,
                        &format!(
                            "the handler left its transaction failed, or its output cannot be \
                             stored: {e}"
                        ),
                        true,
                    ),
                    how: "transaction failed",
                },
                Err(e) => return Err(e),
            }
        }
        Err(rollback) => rollback,
    };
    sqlx::raw_sql(ROLLBACK_TO_SAVEPOINT)
        .execute(&mut *tx)
        .await?;
    let stored = store(tx, command, &rollback.reply, undo.map(|undo| (undo, None))).await?;
    Ok((stored, rollback.how))
}

/// A new action: its step row is inserted; the handler applies the step.
async fn apply(
    tx: &mut PgConnection,
    command: &Command,
    handler: &Handler,
) -> Result<(String, &'static str), BarrierError> {
    run_handler(
        tx,
        command,
        handler,
        "UPDATE saga_barrier_steps SET action_output = $5::jsonb \
         WHERE saga_id = $3 AND step = $4",
        // The step did not happen: its row goes with the handler's work, so a later attempt
        // may apply it and a compensation finds nothing to undo.
        Some("DELETE FROM saga_barrier_steps WHERE saga_id = $3 AND step = $4"),
        "applied",
    )
    .await
}

/// An action whose step row exists: an earlier attempt applied it, or it was compensated.
async fn applied_or_blocked(
    tx: &mut PgConnection,
    command: &Command,
) -> Result<(String, &'static str), BarrierError> {
    let (state, output) = step_row(tx, command, Kind::Action).await?;
    let (reply, how) = if state == "applied" {
        // An earlier attempt applied: the orchestrator never got (or gave up on) its answer.
        (
            ReplyBody::success(command.command_id, output),
            "already applied",
        )
    } else {
        (
            failure(
                command,
                &format!(
                    "step {:?} was already compensated for this saga",
                    command.step
                ),
                false,
            ),
            "blocked",
        )
    };
    Ok((store(tx, command, &reply, None).await?, how))
}

/// A compensation whose step row exists: undo the action unless an earlier attempt did.
async fn compensate(
    tx: &mut PgConnection,
    command: &Command,
    handler: &Handler,
) -> Result<(String, &'static str), BarrierError> {
    let (state, output) = step_row(tx, command, Kind::Compensation).await?;
    if state == "compensated" {
        let reply = ReplyBody::success(command.command_id, output);
        return Ok((
            store(tx, command, &reply, None).await?,
            "already compensated",
        ));
    }
    run_handler(
        tx,
        command,
        handler,
        "UPDATE saga_barrier_steps SET state = 'compensated', \
         compensation_command_id = $2, compensation_output = $5::jsonb, \
         updated_at = now() WHERE saga_id = $3 AND step = $4",
        None,
        "compensated",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statements without their comments and blank lines.
    fn statements(sql: &str) -> Vec<&str> {
        sql.lines()
            .map(|l| l.split("--").next().unwrap_or("").trim_end())
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    #[test]
    fn the_schema_is_the_python_sdks() {
        let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../sdk/python/src/saga_participant/schema.sql");
        let python = std::fs::read_to_string(python).unwrap();
        assert_eq!(statements(SCHEMA), statements(&python));
        assert!(statements(SCHEMA).len() > 20);
    }
}
