//! The Rust participant SDK against the real PostgreSQL and RabbitMQ: each test its own database
//! and vhost (saga-testkit). `kit` plays the orchestrator with the SDK's test kit; `sagad` runs
//! the real sagad binary (built by `cargo test` at the repository root, or
//! `cargo build --bin sagad`).

mod kit;
mod sagad;

/// The guide's example (docs/participants.md), run in-process: its `main` is not called.
#[path = "../../examples/payment.rs"]
#[allow(dead_code)]
mod example;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_participant::{Outcome, Participant};
use saga_testkit::TestEnv;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Logs of the participants under test, shown for failing tests (`RUST_LOG` to change).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,lapin=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Calls `check` until it returns `Some`; fails naming `what` after `timeout`.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A payment participant on the test's database: one row per saga in `payments`.
///
/// `authorize_payment` reads `amount` (kept exact: numeric) and fails as the input asks:
/// `explode` panics, `error` returns an error, an amount over 1000 is a final failure, `busy`
/// a transient one. Each inserts its row first, so a failure that was not rolled back shows.
pub struct Bank {
    pub pool: PgPool,
    /// When set, each `authorize_payment` takes a permit before it returns.
    pub gate: Option<Arc<Semaphore>>,
    /// Notified when an `authorize_payment` handler has done its insert.
    pub entered: Arc<Notify>,
}

impl Bank {
    pub async fn new(env: &TestEnv) -> Bank {
        let pool = env.pool().await;
        sqlx::query(
            "CREATE TABLE payments (saga_id uuid PRIMARY KEY, amount numeric, state text NOT NULL)",
        )
        .execute(&pool)
        .await
        .unwrap();
        Bank {
            pool,
            gate: None,
            entered: Arc::new(Notify::new()),
        }
    }

    pub fn participant(&self, env: &TestEnv) -> Participant {
        let gate = self.gate.clone();
        let entered = Arc::clone(&self.entered);
        Participant::new("payment")
            .amqp_url(env.amqp_url())
            .action("authorize_payment", move |cmd, conn| {
                let gate = gate.clone();
                let entered = Arc::clone(&entered);
                Box::pin(async move {
                    let amount = cmd.input["amount"].to_string();
                    sqlx::query(
                        "INSERT INTO payments (saga_id, amount, state) \
                         VALUES ($1, $2::numeric, 'authorized')",
                    )
                    .bind(cmd.saga_id)
                    .bind(&amount)
                    .execute(&mut *conn)
                    .await?;
                    entered.notify_one();
                    if let Some(gate) = gate {
                        gate.acquire().await?.forget();
                    }
                    if cmd.input.get("explode").is_some() {
                        panic!("the card network is down");
                    }
                    if cmd.input.get("error").is_some() {
                        return Err("the issuer timed out".into());
                    }
                    if cmd.input["amount"].as_f64().unwrap_or(0.0) > 1000.0 {
                        return Ok(Outcome::failure("amount over the limit"));
                    }
                    if cmd.input.get("busy").is_some() {
                        return Ok(Outcome::transient("try again later"));
                    }
                    let short = &cmd.saga_id.simple().to_string()[..8];
                    Ok(Outcome::success(json!({
                        "authorization": format!("auth-{short}"),
                        "amount": cmd.input["amount"],
                    })))
                })
            })
            .compensation("refund_payment", |cmd, conn| {
                Box::pin(async move {
                    sqlx::query("UPDATE payments SET state = 'refunded' WHERE saga_id = $1")
                        .bind(cmd.saga_id)
                        .execute(&mut *conn)
                        .await?;
                    Ok(Outcome::success(json!({"refunded": true})))
                })
            })
    }

    /// `(amount as text, state)` of the saga's payment rows.
    pub async fn payments(&self, saga_id: uuid::Uuid) -> Vec<(String, String)> {
        sqlx::query_as("SELECT amount::text, state FROM payments WHERE saga_id = $1")
            .bind(saga_id)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    pub async fn count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// A participant running in a task until stopped.
pub struct Running {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), saga_participant::Error>>,
}

impl Running {
    /// Runs `participant` on `pool` and waits until it consumes its queue.
    pub async fn start(participant: Participant, pool: PgPool) -> Running {
        let stop = CancellationToken::new();
        let mut ready = participant.ready();
        let task = tokio::spawn(participant.run(pool, stop.clone()));
        tokio::time::timeout(Duration::from_secs(30), ready.wait())
            .await
            .expect("the participant consumes its queue within 30 s");
        Running { stop, task }
    }

    /// Stops it and waits for `run` to return.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the participant stops within 30 s")
            .unwrap()
            .unwrap();
    }
}
