//! A participant of the saga orchestrator in Rust: register a handler per command name, and the
//! SDK does everything the contract (`docs/participant-contract.md`) asks below it.
//!
//! ```no_run
//! use saga_participant::{Outcome, Participant};
//! use serde_json::json;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/payments").await?;
//! Participant::new("payment")
//!     .action("authorize_payment", |cmd, conn| Box::pin(async move {
//!         sqlx::query("INSERT INTO payments (saga_id, state) VALUES ($1, 'authorized')")
//!             .bind(cmd.saga_id)
//!             .execute(&mut *conn)
//!             .await?;
//!         Ok(Outcome::success(json!({"authorization": "auth-1"})))
//!     }))
//!     .compensation("refund_payment", |cmd, conn| Box::pin(async move {
//!         sqlx::query("UPDATE payments SET state = 'refunded' WHERE saga_id = $1")
//!             .bind(cmd.saga_id)
//!             .execute(&mut *conn)
//!             .await?;
//!         Ok(Outcome::done())
//!     }))
//!     .run(pool, CancellationToken::new())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Per command, in one transaction of the participant's PostgreSQL database, the **barrier**
//! claims the command id, consults the step's record (keyed by saga id and step, whatever the
//! attempt) and runs the handler in a savepoint only when the rules allow; it stores the reply
//! with the effect ([`SCHEMA`]: the same tables as the Python SDK's, so the two are
//! interchangeable on one database). After the commit the reply is published (persistent, to the
//! command's `reply_to`, correlation id = command id, with publisher confirms; or over gRPC,
//! [`GrpcReplies`]) and only then is the command acknowledged. A handler's error or panic is a
//! transient failure, rolled back and answered `retryable`; a malformed command is rejected to
//! `saga.dead-letter`. docs/participants.md explains each rule.
//!
//! [`testing`] plays the orchestrator against a participant for tests.

// A participant runs for months on whatever the broker delivers: nothing in it may panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod barrier;
mod command;
mod grpc;
mod participant;
pub mod testing;
mod trace;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

pub use barrier::{SCHEMA, ensure_schema};
pub use command::{Command, Kind};
pub use grpc::GrpcReplies;
pub use participant::{Error, Participant, Ready};

/// What a handler may fail with: any error (`?` on a `sqlx::Error`, an `anyhow::Error`, a
/// `String`). It is a transient failure: rolled back, answered `retryable: true`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler returns.
pub type HandlerResult = Result<Outcome, BoxError>;

/// The future a handler returns (`Box::pin(async move { … })`). It borrows the command and the
/// connection of the command's transaction.
pub type HandlerFuture<'a> = BoxFuture<'a, HandlerResult>;

/// A handler: does the command's local work on `conn`, a connection **inside the command's open
/// transaction** (in a savepoint). It must not commit, roll back or use another connection for
/// the effect, or the effect escapes the barrier.
pub type Handler =
    dyn for<'a> Fn(&'a Command, &'a mut PgConnection) -> HandlerFuture<'a> + Send + Sync;

/// How a command ended, as the handler decides.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The transaction commits; `output` (any JSON value) becomes the step's output, passed to
    /// later commands in [`Command::outputs`].
    Success { output: Value },
    /// Nothing happened: everything the handler did is rolled back. `retryable: false` is a
    /// final answer (a step at or before the pivot makes the saga compensate); `true` makes the
    /// orchestrator retry the step with back-off.
    Failure { reason: String, retryable: bool },
}

impl Outcome {
    /// A success with this output.
    pub fn success(output: impl Into<Value>) -> Outcome {
        Outcome::Success {
            output: output.into(),
        }
    }

    /// A success without output (`null`).
    pub fn done() -> Outcome {
        Outcome::success(Value::Null)
    }

    /// A final failure: the orchestrator does not retry the step.
    pub fn failure(reason: impl Into<String>) -> Outcome {
        Outcome::Failure {
            reason: reason.into(),
            retryable: false,
        }
    }

    /// A failure that may go away: the orchestrator retries the step (a new attempt, a new
    /// command id) within its retry policy.
    pub fn transient(reason: impl Into<String>) -> Outcome {
        Outcome::Failure {
            reason: reason.into(),
            retryable: true,
        }
    }
}
