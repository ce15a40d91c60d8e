//! Participants misbehaving: one down for longer than the step timeout, one answering twice.

use std::time::{Duration, Instant};

use saga_testkit::fault::*;
use saga_testkit::{TestEnv, definitions_dir, repo_sagas};

/// `sagas/order_fulfillment.toml` with short timeouts, more retries and compensations that
/// never give up, so a participant outage of a few seconds exhausts the action retries of some
/// sagas (they compensate) and not of others (they complete once it is back).
///
/// The back-off grows to 5 s (2.5-5 s with jitter), well above the timeout, as retries must.
/// The orchestrator only records a late reply, even a success for the step it is retrying, so
/// once the returning participant's backlog takes longer to drain than timeout + back-off,
/// every new attempt times out behind stale ones: with a 400 ms cap, 200 sagas sent ~220
/// commands/s to a participant that handled ~100-150/s here, and after a minute they were still
/// compensating, at attempt ~60 (see the fault suite's report).
const SHORT_TIMEOUTS: &str = r#"
name = "order_fulfillment"
version = 1

[defaults]
timeout = "500ms"
retry = { max_attempts = 4, initial_backoff = "200ms", max_backoff = "5s", multiplier = 2.0 }

[compensation]
max_attempts = 1000

[[steps]]
name = "create_order"
participant = "order"
action = "create_order"
compensation = "cancel_order"

[[steps]]
name = "authorize_payment"
participant = "payment"
action = "authorize_payment"
compensation = "refund_payment"

[[steps]]
name = "schedule_delivery"
participant = "delivery"
action = "schedule_delivery"
compensation = "cancel_delivery"
pivot = true

[[steps]]
name = "approve_order"
participant = "order"
action = "approve_order"
"#;

/// Scenario e: the payment service (a `saga-demo` process) is killed with SIGKILL and stays down
/// for 4 s, eight times the step timeout. Its queue fills with authorizations and refunds of
/// timed-out attempts; when it comes back it works through all of them, late. Every saga must
/// still end, and no payment may stay authorized in a compensated saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_longer_than_the_step_timeout() {
    let env = TestEnv::new();
    let pool = env.pool().await;
    let defs = definitions_dir(&[("order_fulfillment.toml", SHORT_TIMEOUTS)]);
    let sagad = Sagad::spawn(&env, defs.path(), "1").await;
    let _order_and_delivery = DemoProcess::spawn(
        &env,
        "order-delivery",
        &["--participants", "order,delivery"],
    );
    let payment_args = ["--participants", "payment"];
    let mut payment = DemoProcess::spawn(&env, "payment-1", &payment_args);
    let endpoints = Endpoints::new(&[&sagad]);
    let load = Load::start(&endpoints, SAGAS);
    load.wait_in_flight(&pool, SAGAS / 4, 10).await;

    payment.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await; // down for 8 step timeouts
    let _payment = DemoProcess::spawn(&env, "payment-2-restarted", &payment_args);
    let fault_end = Instant::now();

    let m = load.finish_and_check(&pool, fault_end).await;
    m.print("e: payment participant down 4s (step timeout 500ms)");
    assert!(m.timeouts > 0, "the outage must have made steps time out");
}

/// Scenario f: the participants send every reply twice. The orchestrator applies the first and
/// recognises the second as a duplicate (not as a late reply, not as a new transition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_sending_every_reply_twice() {
    let env = TestEnv::new();
    let pool = env.pool().await;
    let sagad = Sagad::spawn(&env, &repo_sagas(), "1").await;
    let _demo = DemoProcess::spawn(&env, "1", &["--duplicate-replies"]);
    let endpoints = Endpoints::new(&[&sagad]);
    let load = Load::start(&endpoints, SAGAS);
    let fault_start = Instant::now();

    let m = load.finish_and_check(&pool, fault_start).await;
    m.print(&format!(
        "f: every reply sent twice ({} duplicate replies; recovery = whole run)",
        m.processed
    ));
}
