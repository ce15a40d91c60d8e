//! The barrier's rules, one scenario each, with the test kit playing the orchestrator against a
//! participant on a real vhost and database (no sagad).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use saga_participant::testing::{CommandKit, CrashSwitch, TestCommand};
use saga_participant::{Outcome, Participant};
use saga_testkit::TestEnv;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::{Bank, Running, init_tracing, poll};

const AMOUNT: &str = "12.345678901234567890123";

fn pay(amount: Value) -> TestCommand {
    TestCommand::action("authorize_payment").input(json!({ "amount": amount }))
}

fn exact(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

async fn deliveries(bank: &Bank, command: &TestCommand) -> i32 {
    sqlx::query_scalar("SELECT deliveries FROM saga_barrier_commands WHERE command_id = $1")
        .bind(command.command_id())
        .fetch_one(&bank.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_same_command_twice_is_applied_once_and_answered_the_same() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let cmd = pay(exact(AMOUNT));
    let (first, again) = kit.deliver_twice(&cmd).await.unwrap();
    assert!(first.is_success(), "{first:?}");
    assert_eq!(first.raw, again.raw, "the stored reply, byte for byte");
    let short = &cmd.saga_id().simple().to_string()[..8];
    assert_eq!(
        first.body.output,
        json!({"authorization": format!("auth-{short}"), "amount": exact(AMOUNT)})
    );
    // The number went through the handler, the database and the reply without rounding.
    assert!(
        String::from_utf8_lossy(&first.raw).contains(AMOUNT),
        "{:?}",
        String::from_utf8_lossy(&first.raw)
    );
    let id = cmd.command_id().to_string();
    assert_eq!(first.correlation_id.as_deref(), Some(id.as_str()));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.delivery_mode, Some(2));
    assert_eq!(
        bank.payments(cmd.saga_id()).await,
        [(AMOUNT.to_string(), "authorized".to_string())]
    );
    assert_eq!(deliveries(&bank, &cmd).await, 2);
    running.stop().await;
}

#[tokio::test]
async fn a_retry_of_an_applied_step_gets_the_first_output_and_applies_nothing() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let cmd = pay(json!(7));
    let (first, retried) = kit.retry_applied(&cmd).await.unwrap();
    assert!(first.is_success() && retried.is_success(), "{retried:?}");
    assert_eq!(retried.body.output, first.body.output);
    assert_ne!(retried.body.command_id, cmd.command_id());
    assert_eq!(bank.count().await, 1);

    // Compensated, then yet another attempt of the action arrives: blocked.
    let undo = cmd.compensation("refund_payment");
    kit.send(&undo).await.unwrap();
    assert_eq!(
        kit.reply(&undo).await.unwrap().body.output,
        json!({"refunded": true})
    );
    let late = cmd.retry().retry();
    kit.send(&late).await.unwrap();
    let blocked = kit.reply(&late).await.unwrap();
    assert!(
        blocked.is_failure() && !blocked.body.retryable,
        "{blocked:?}"
    );
    assert!(
        blocked.reason().contains("already compensated"),
        "{blocked:?}"
    );
    // The compensation delivered again: the same answer, nothing undone twice.
    let (again, _) = kit.deliver_twice(&undo).await.unwrap();
    assert_eq!(again.body.output, json!({"refunded": true}));
    assert_eq!(
        bank.payments(cmd.saga_id()).await,
        [("7".to_string(), "refunded".to_string())]
    );
    running.stop().await;
}

#[tokio::test]
async fn a_compensation_before_its_action_leaves_a_tombstone_that_blocks_the_action() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let action = pay(json!(5));
    let (undone, late) = kit
        .compensate_before_action(&action, "refund_payment")
        .await
        .unwrap();
    assert!(undone.is_success(), "{undone:?}");
    assert_eq!(undone.body.output, Value::Null, "nothing was undone");
    assert!(late.is_failure() && !late.body.retryable, "{late:?}");
    assert!(late.reason().contains("already compensated"), "{late:?}");
    assert!(bank.payments(action.saga_id()).await.is_empty());
    let row: (String, bool) = sqlx::query_as(
        "SELECT state, tombstone FROM saga_barrier_steps WHERE saga_id = $1 AND step = $2",
    )
    .bind(action.saga_id())
    .bind("authorize_payment")
    .fetch_one(&bank.pool)
    .await
    .unwrap();
    assert_eq!(row, ("compensated".to_string(), true));
    running.stop().await;
}

#[tokio::test]
async fn failures_roll_the_handlers_work_back_and_a_panic_does_not_stop_the_consumer() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    // One command at a time, so the panic happens on the task the next command needs too.
    let participant = bank.participant(&env).prefetch(1);
    let running = Running::start(participant, bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let boom = pay(json!(5)).input(json!({"amount": 5, "explode": true}));
    let error = pay(json!(5)).input(json!({"amount": 5, "error": true}));
    let busy = pay(json!(5)).input(json!({"amount": 5, "busy": true}));
    let over = pay(json!(5000));
    for cmd in [&boom, &error, &busy, &over] {
        kit.send(cmd).await.unwrap();
    }
    let exploded = kit.reply(&boom).await.unwrap();
    assert!(
        exploded.is_failure() && exploded.body.retryable,
        "{exploded:?}"
    );
    assert!(
        exploded
            .reason()
            .contains("panicked: the card network is down"),
        "{exploded:?}"
    );
    let errored = kit.reply(&error).await.unwrap();
    assert!(
        errored.body.retryable && errored.reason() == "the issuer timed out",
        "{errored:?}"
    );
    let transient = kit.reply(&busy).await.unwrap();
    assert!(transient.body.retryable && transient.reason() == "try again later");
    let refused = kit.reply(&over).await.unwrap();
    assert!(!refused.body.retryable && refused.reason() == "amount over the limit");
    // Each handler inserted its row before failing: all rolled back, with the step rows, so…
    assert_eq!(bank.count().await, 0);
    // …the retry of the step that panicked applies it, on the same consumer.
    let retry = boom.retry().input(json!({"amount": 5}));
    kit.send(&retry).await.unwrap();
    assert!(kit.reply(&retry).await.unwrap().is_success());
    assert_eq!(
        bank.payments(boom.saga_id()).await,
        [("5".to_string(), "authorized".to_string())]
    );
    // Every delivery of a failed command gets the same stored failure.
    let (first, again) = kit.deliver_twice(&over.new_saga()).await.unwrap();
    assert_eq!(first.raw, again.raw);
    running.stop().await;
}

#[tokio::test]
async fn malformed_commands_are_dead_lettered_and_the_rest_served() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let dead = kit.malformed(b"{not json").await.unwrap();
    assert_eq!(dead.body, b"{not json");
    let missing = serde_json::to_vec(&json!({"command_id": uuid::Uuid::now_v7()})).unwrap();
    assert_eq!(kit.malformed(&missing).await.unwrap().body, missing);

    // A message whose message_id is not its command id cannot be de-duplicated.
    let cmd = pay(json!(1));
    let body = serde_json::to_vec(&cmd.body).unwrap();
    let other = uuid::Uuid::now_v7().to_string();
    kit.send_raw(&body, Some(&other)).await.unwrap();
    let dead = kit.dead_letter().await.unwrap();
    assert_eq!(dead.message_id.as_deref(), Some(other.as_str()));
    // A command this participant has no handler for, or of the wrong kind.
    let unknown = TestCommand::action("capture_payment");
    kit.send(&unknown).await.unwrap();
    let dead = kit.dead_letter().await.unwrap();
    assert_eq!(dead.message_id, Some(unknown.command_id().to_string()));
    let wrong_kind = TestCommand::action("authorize_payment").compensation("authorize_payment");
    kit.send(&wrong_kind).await.unwrap();
    let dead = kit.dead_letter().await.unwrap();
    assert_eq!(dead.message_id, Some(wrong_kind.command_id().to_string()));

    // Nothing of them reached the barrier, and the consumer still serves.
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_barrier_commands")
        .fetch_one(&bank.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    kit.send(&cmd).await.unwrap();
    assert!(kit.reply(&cmd).await.unwrap().is_success());
    running.stop().await;
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_answered_from_the_stored_reply() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    let crash = CrashSwitch::new();
    let participant = bank.participant(&env).crash_switch(crash.clone());
    let running = Running::start(participant, bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let cmd = pay(json!(3));
    let reply = kit.crash_after_commit(&crash, &cmd).await.unwrap();
    assert!(reply.is_success(), "{reply:?}");
    // The effect once; the command delivered twice (before and after the "crash").
    assert_eq!(
        bank.payments(cmd.saga_id()).await,
        [("3".to_string(), "authorized".to_string())]
    );
    assert_eq!(deliveries(&bank, &cmd).await, 2);
    // Only one reply: the first delivery never got to publish.
    kit.timeout = Duration::from_millis(500);
    assert!(kit.reply(&cmd).await.is_err());
    running.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_the_command_in_flight_then_stops_consuming() {
    init_tracing();
    let env = TestEnv::new();
    let mut bank = Bank::new(&env).await;
    let gate = Arc::new(Semaphore::new(0));
    bank.gate = Some(Arc::clone(&gate));
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    let busy = pay(json!(1));
    kit.send(&busy).await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), bank.entered.notified())
        .await
        .expect("the handler started");
    running.stop.cancel();

    let connection = saga_contract::amqp::connect(&env.amqp_url(), None)
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = || {
        channel.queue_declare(
            "saga.participant.payment".into(),
            passive,
            FieldTable::default(),
        )
    };
    poll(
        "the participant to stop consuming",
        Duration::from_secs(15),
        || async { (queue().await.unwrap().consumer_count() == 0).then_some(()) },
    )
    .await;
    let after = pay(json!(2));
    kit.send(&after).await.unwrap();
    assert!(
        !running.task.is_finished(),
        "run() waits for the command in flight"
    );
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(30), running.task)
        .await
        .expect("run() returns once the command in flight is done")
        .unwrap()
        .unwrap();
    // The command in flight was finished and answered; the later one waits in the queue.
    assert!(kit.reply(&busy).await.unwrap().is_success());
    assert_eq!(bank.payments(busy.saga_id()).await.len(), 1);
    assert_eq!(queue().await.unwrap().message_count(), 1);
    assert!(bank.payments(after.saga_id()).await.is_empty());
}

#[tokio::test]
async fn a_handler_that_swallows_a_database_error_is_a_transient_failure() {
    init_tracing();
    let env = TestEnv::new();
    let pool = env.pool().await;
    sqlx::query("CREATE TABLE notes (saga_id uuid PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let participant =
        Participant::new("notes")
            .amqp_url(env.amqp_url())
            .action("note", |cmd, conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO notes VALUES ($1)")
                        .bind(cmd.saga_id)
                        .execute(&mut *conn)
                        .await?;
                    // The transaction is failed now; returning success cannot commit it.
                    let _ = sqlx::query("SELECT 1/0").execute(&mut *conn).await;
                    Ok(Outcome::done())
                })
            });
    let running = Running::start(participant, pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "notes").await.unwrap();
    let cmd = TestCommand::action("note");
    kit.send(&cmd).await.unwrap();
    let reply = kit.reply(&cmd).await.unwrap();
    assert!(reply.body.retryable, "{reply:?}");
    assert!(reply.reason().contains("transaction failed"), "{reply:?}");
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(notes, 0);
    running.stop().await;
}

#[tokio::test]
async fn the_reply_continues_the_commands_trace() {
    init_tracing();
    let env = TestEnv::new();
    let bank = Bank::new(&env).await;
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = format!("00-{trace}-b7ad6b7169203331-01");
    let cmd = pay(json!(1)).traceparent(&parent);
    kit.send(&cmd).await.unwrap();
    let reply = kit.reply(&cmd).await.unwrap();
    let tp = reply.traceparent.expect("a traceparent on the reply");
    assert!(
        tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-01"),
        "{tp}"
    );
    assert_ne!(tp, parent, "a span of its own");
    // Without a trace on the command, none on the reply.
    let plain = pay(json!(1));
    kit.send(&plain).await.unwrap();
    assert_eq!(kit.reply(&plain).await.unwrap().traceparent, None);
    running.stop().await;
}

#[tokio::test]
async fn a_participant_without_handlers_or_with_two_for_one_command_does_not_start() {
    let pool = sqlx::PgPool::connect_lazy("postgres://postgres@127.0.0.1:5432/postgres").unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let e = Participant::new("p")
        .run(pool.clone(), stop.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no handler"), "{e}");
    fn handler<'a>(
        _: &'a saga_participant::Command,
        _: &'a mut sqlx::PgConnection,
    ) -> saga_participant::HandlerFuture<'a> {
        Box::pin(async { Ok(Outcome::done()) })
    }
    let e = Participant::new("p")
        .action("a", handler)
        .action("a", handler)
        .run(pool, stop)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("two action handlers for command \"a\""),
        "{e}"
    );
}

#[tokio::test]
async fn the_guide_example_runs() {
    init_tracing();
    let env = TestEnv::new();
    let pool = env.pool().await;
    sqlx::query(
        "CREATE TABLE payments (saga_id uuid PRIMARY KEY, amount_cents bigint, state text)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let running = Running::start(crate::example::payment(env.amqp_url()), pool.clone()).await;

    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();
    let pay = TestCommand::action("authorize_payment").input(json!({"amount_cents": 4200}));
    kit.send(&pay).await.unwrap();
    assert!(kit.reply(&pay).await.unwrap().is_success());
    let undo = pay.compensation("refund_payment");
    kit.send(&undo).await.unwrap();
    assert!(kit.reply(&undo).await.unwrap().is_success());
    let over = TestCommand::action("authorize_payment").input(json!({"amount_cents": 100_001}));
    kit.send(&over).await.unwrap();
    assert_eq!(
        kit.reply(&over).await.unwrap().reason(),
        "amount over the limit"
    );
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT amount_cents, state FROM payments")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows, [(4200, "refunded".to_string())]);
    running.stop().await;
}

/// Backends of the test's database waiting for a lock (a claim or step row held by another
/// transaction).
async fn waiting_on_locks(bank: &Bank) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&bank.pool)
    .await
    .unwrap()
}

/// Deliveries and attempts that arrive while the first attempt's handler is still running wait
/// for its transaction: a second delivery of the command on the claim, a second attempt of the
/// step on the step row. Then the command applied once, and the step once.
#[tokio::test]
async fn deliveries_and_attempts_racing_the_first_apply_nothing_twice() {
    init_tracing();
    let env = TestEnv::new();
    let mut bank = Bank::new(&env).await;
    let gate = Arc::new(Semaphore::new(0));
    bank.gate = Some(Arc::clone(&gate));
    let running = Running::start(bank.participant(&env), bank.pool.clone()).await;
    let mut kit = CommandKit::connect(&env.amqp_url(), "payment")
        .await
        .unwrap();

    // The first attempt succeeds: the second delivery gets its stored reply, the second attempt
    // its output.
    let cmd = pay(json!(10));
    let entered = bank.entered.notified();
    kit.send(&cmd).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), entered)
        .await
        .expect("the handler runs");
    let retry = cmd.retry();
    kit.send(&cmd).await.unwrap();
    kit.send(&retry).await.unwrap();
    poll(
        "both to wait for the first",
        Duration::from_secs(30),
        || async { (waiting_on_locks(&bank).await >= 2).then_some(()) },
    )
    .await;
    // Permits for all three: a handler run twice shows as a second row, not as a hang.
    gate.add_permits(3);
    let (first, again) = (
        kit.reply(&cmd).await.unwrap(),
        kit.reply(&cmd).await.unwrap(),
    );
    assert!(first.is_success(), "{first:?}");
    assert_eq!(first.raw, again.raw);
    let retried = kit.reply(&retry).await.unwrap();
    assert!(retried.is_success(), "{retried:?}");
    assert_eq!(retried.body.output, first.body.output);
    assert_eq!(
        bank.payments(cmd.saga_id()).await,
        [("10".to_string(), "authorized".to_string())]
    );
    assert_eq!(deliveries(&bank, &cmd).await, 2);
    // The handler took one permit: it ran once.
    assert_eq!(gate.forget_permits(3), 2);

    // The first attempt fails (over the limit): its step row goes with its work, so the second
    // attempt, which waited on it, applies.
    let over = pay(json!(5000));
    let entered = bank.entered.notified();
    kit.send(&over).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), entered)
        .await
        .expect("the handler runs");
    let retry = over.retry().input(json!({"amount": 20}));
    kit.send(&retry).await.unwrap();
    poll(
        "the retry to wait for the first",
        Duration::from_secs(30),
        || async { (waiting_on_locks(&bank).await >= 1).then_some(()) },
    )
    .await;
    gate.add_permits(2);
    let failed = kit.reply(&over).await.unwrap();
    assert!(failed.is_failure() && !failed.body.retryable, "{failed:?}");
    let applied = kit.reply(&retry).await.unwrap();
    assert!(applied.is_success(), "{applied:?}");
    assert_eq!(
        bank.payments(over.saga_id()).await,
        [("20".to_string(), "authorized".to_string())]
    );
    running.stop().await;
}
