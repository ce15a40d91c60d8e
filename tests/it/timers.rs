//! Deadlines and back-offs driven by the driver's clock: the test moves a manual clock past them
//! and runs one sweep, instead of sleeping through an hour.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use saga::clock::Clock;
use saga::definition;
use saga::driver::Driver;
use saga::engine::Status;
use saga::store::Store;
use saga::timers::try_sweep;
use serde_json::json;

use crate::helpers::TestEnv;

const HOUR: Duration = Duration::from_secs(3600);

const SLOW: &str = r#"
name = "slow"
version = 1

[[steps]]
name = "only"
participant = "p"
action = "do_it"
compensation = "undo_it"
timeout = "1h"
retry = { max_attempts = 3, initial_backoff = "1h", max_backoff = "1h", multiplier = 1.0 }
"#;

/// A driver on a manual clock (no relay, no sweeper of its own) and one saga of [`SLOW`] started
/// on it, its first command sent.
struct Slow {
    store: Store,
    clock: Clock,
    driver: Driver,
    id: uuid::Uuid,
    stop: tokio_util::sync::CancellationToken,
    writer: tokio::task::JoinHandle<()>,
}

async fn slow_saga(env: &TestEnv) -> Slow {
    let store = Store::connect(&env.database_url(), 2).await.unwrap();
    store.migrate().await.unwrap();
    let def = definition::parse(Path::new("slow.toml"), SLOW).unwrap();
    let registry = store.sync_definitions(&[def]).await.unwrap();
    let def = registry.latest("slow").unwrap();
    let clock = Clock::manual_now();
    let driver = Driver::new(store.clone(), Arc::new(registry)).with_clock(clock.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(driver.start_writer(stop.clone()));
    let (id, _, _) = driver
        .start_saga(&def, json!({}), None, None, None)
        .await
        .unwrap();
    Slow {
        store,
        clock,
        driver,
        id,
        stop,
        writer,
    }
}

#[tokio::test]
async fn a_sweep_fires_a_deadline_and_then_a_back_off_only_once_the_clock_has_passed_them() {
    let env = TestEnv::new();
    let Slow {
        store,
        clock,
        driver,
        id,
        stop,
        writer,
    } = slow_saga(&env).await;
    // A command's deadline runs once the relay has taken it out of the outbox; no relay runs
    // here, so the test takes it out.
    sqlx::query("DELETE FROM outbox")
        .execute(store.pool())
        .await
        .unwrap();
    let attempts = |store: Store| async move {
        let (saga, attempts, _) = store.get_saga(id).await.unwrap().unwrap();
        (saga.state.status, attempts)
    };

    assert_eq!(try_sweep(&driver).await.unwrap(), 0, "nothing is due yet");
    clock.advance(HOUR - Duration::from_secs(1));
    assert_eq!(
        try_sweep(&driver).await.unwrap(),
        0,
        "a second before the deadline"
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(try_sweep(&driver).await.unwrap(), 1, "the deadline passed");
    let (status, tried) = attempts(store.clone()).await;
    assert_eq!(status, Status::Running);
    assert_eq!(tried.len(), 1);
    assert!(tried.iter().all(|a| a.timed_out));

    // The back-off ("equal jitter") lies between half an hour and an hour from the timeout.
    clock.advance(HOUR / 2 - Duration::from_secs(1));
    assert_eq!(try_sweep(&driver).await.unwrap(), 0, "still backing off");
    clock.advance(HOUR / 2 + Duration::from_secs(2));
    assert_eq!(try_sweep(&driver).await.unwrap(), 1, "the back-off passed");
    let (status, tried) = attempts(store.clone()).await;
    assert_eq!(status, Status::Running);
    assert_eq!(tried.len(), 2, "the second attempt was sent");
    assert_eq!(tried.last().map(|a| a.attempt), Some(2));

    stop.cancel();
    writer.await.unwrap();
}

/// A late success of the first attempt and the reply of the second, in one batch: the first
/// counts and abandons the second, whose own reply is then late. Both endings of the second
/// attempt are kept (the fault suite's invariant: every late reply answers an attempt given up).
#[tokio::test]
async fn a_late_success_and_the_reply_it_makes_late_in_one_batch_both_stay_recorded() {
    let env = TestEnv::new();
    let Slow {
        store,
        clock,
        driver,
        id,
        stop,
        writer,
    } = slow_saga(&env).await;
    let sent = || async {
        sqlx::query("DELETE FROM outbox")
            .execute(store.pool())
            .await
            .unwrap();
        store.get_saga(id).await.unwrap().unwrap().1
    };
    let first = sent().await[0].command_id;
    clock.advance(HOUR + Duration::from_secs(1));
    assert_eq!(try_sweep(&driver).await.unwrap(), 1, "the deadline passed");
    clock.advance(HOUR + Duration::from_secs(1));
    assert_eq!(try_sweep(&driver).await.unwrap(), 1, "the back-off passed");
    let second = sent().await[1].command_id;

    let success = |n: i32| saga::engine::Outcome::Success {
        output: json!({ "attempt": n }),
    };
    let results = driver
        .apply_replies(vec![(first, success(1)), (second, success(2))])
        .await
        .unwrap();
    assert_eq!(
        results,
        [
            saga::driver::ReplyResult::Applied,
            saga::driver::ReplyResult::Recorded
        ]
    );
    let (saga, attempts, _) = store.get_saga(id).await.unwrap().unwrap();
    assert_eq!(saga.state.status, Status::Completed);
    assert_eq!(saga.outputs["only"], json!({"attempt": 1}));
    let second = attempts.iter().find(|a| a.command_id == second).unwrap();
    assert!(second.superseded, "{second:?}");
    assert_eq!(second.outcome.as_deref(), Some("success"), "{second:?}");
    assert!(second.replied_at.is_some(), "{second:?}");
    stop.cancel();
    writer.await.unwrap();
}
