//! Orchestrator processes dying: `kill -9` of the only `sagad`, of one of two replicas, and a
//! graceful stop (SIGTERM) mid-load.

use std::time::{Duration, Instant};

use saga_testkit::fault::*;
use saga_testkit::{TestEnv, repo_sagas};

/// Scenario a: the only `sagad` is killed with SIGKILL mid-load and restarted a second later.
/// Replies pile up in `saga.replies` meanwhile, outbox rows it had published but not yet deleted
/// are published again, and StartSaga calls fail until the new process is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_sagad_mid_load_loses_nothing_and_does_nothing_twice() {
    let env = TestEnv::new();
    let pool = env.pool().await;
    let mut sagad = Sagad::spawn(&env, &repo_sagas(), "1").await;
    let _demo = DemoProcess::spawn(&env, "1", &[]);
    let endpoints = Endpoints::new(&[&sagad]);
    let load = Load::start(&endpoints, SAGAS);
    load.wait_in_flight(&pool, SAGAS / 3, 10).await;

    sagad.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await; // down for a while
    let sagad = Sagad::spawn(&env, &repo_sagas(), "2-restarted").await;
    endpoints.set(&[&sagad]);
    let fault_end = Instant::now();

    let m = load.finish_and_check(&pool, fault_end).await;
    m.print("a: kill -9 of sagad, restarted");
}

/// Scenario b: two replicas share the database and vhost; one is killed with SIGKILL mid-load
/// and not restarted. The survivor takes over its unacknowledged replies (redelivered by the
/// broker), its claimed outbox rows (the killed transaction rolls back) and its timers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_replicas_the_other_finishes_everything() {
    let env = TestEnv::new();
    let pool = env.pool().await;
    let mut first = Sagad::spawn(&env, &repo_sagas(), "replica-1").await;
    let second = Sagad::spawn(&env, &repo_sagas(), "replica-2").await;
    let _demo = DemoProcess::spawn(&env, "1", &[]);
    let endpoints = Endpoints::new(&[&first, &second]);
    let load = Load::start(&endpoints, SAGAS);
    load.wait_in_flight(&pool, SAGAS / 3, 10).await;

    first.kill9();
    endpoints.set(&[&second]);
    let fault_end = Instant::now();

    let m = load.finish_and_check(&pool, fault_end).await;
    m.print("b: kill -9 of one of two replicas");
}

/// Graceful shutdown: SIGTERM to `sagad` mid-load makes it exit 0 within its grace period
/// (in-flight replies are finished or given back, the relay stops between batches), and a new
/// process finishes every saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_exits_0_within_the_grace_period_and_loses_nothing() {
    let env = TestEnv::new();
    let pool = env.pool().await;
    let mut sagad = Sagad::spawn(&env, &repo_sagas(), "1").await;
    let _demo = DemoProcess::spawn(&env, "1", &[]);
    let endpoints = Endpoints::new(&[&sagad]);
    let load = Load::start(&endpoints, SAGAS);
    load.wait_in_flight(&pool, SAGAS / 3, 10).await;

    let asked = Instant::now();
    // The grace period bounds the wait for in-flight work; a little more for the process to
    // close its pool and exit.
    let status = sagad.sigterm(SHUTDOWN_GRACE + Duration::from_secs(3)).await;
    let took = asked.elapsed();
    assert!(status.success(), "sagad exited with {status} on SIGTERM");
    let sagad = Sagad::spawn(&env, &repo_sagas(), "2-restarted").await;
    endpoints.set(&[&sagad]);
    let fault_end = Instant::now();

    let m = load.finish_and_check(&pool, fault_end).await;
    m.print(&format!(
        "SIGTERM of sagad (exited 0 after {took:.2?}), restarted"
    ));
}
