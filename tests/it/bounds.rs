//! Bounds: values that validation accepted (or an older, laxer loader stored) must never take a
//! shared task down, and out-of-range settings and API durations are refused up front.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use saga::app::Application;
use saga::contract::ReplyBody;
use saga::definition::{Definition, RetryPolicy, Step};
use saga::driver::Driver;
use saga::proto::v1 as pb;
use saga::proto::v1::admin_service_client::AdminServiceClient;
use saga::store::Store;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(20);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn one_step(name: &str, participant: &str, timeout: Duration, backoff: Duration) -> Definition {
    Definition {
        name: name.into(),
        version: 1,
        description: String::new(),
        steps: vec![Step {
            name: "only".into(),
            participant: participant.into(),
            action: "do_it".into(),
            compensation: Some("undo_it".into()),
            timeout,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: backoff,
                max_backoff: backoff,
                multiplier: 2.0,
            },
            after: None,
            when: None,
            input: None,
            compensation_input: None,
        }],
        pivot: 0,
        compensation_max_attempts: 3,
    }
}

fn simple_toml(name: &str, version: u32, participant: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = {version}\n\n[[steps]]\nname = \"only\"\n\
         participant = \"{participant}\"\naction = \"do_it\"\ncompensation = \"undo_it\"\n"
    )
}

async fn start_on(
    client: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
    definition: &str,
) -> pb::StartSagaResponse {
    client
        .start_saga(pb::StartSagaRequest {
            definition: definition.into(),
            input_json: "{}".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn saga(
    client: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
    id: &str,
) -> pb::Saga {
    client
        .get_saga(pb::GetSagaRequest { saga_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Polls the saga until `pred` holds; fails with the saga after `WITHIN`.
async fn wait_until(
    client: &mut pb::saga_service_client::SagaServiceClient<tonic::transport::Channel>,
    id: &str,
    what: &str,
    pred: impl Fn(&pb::Saga) -> bool,
) -> pb::Saga {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let s = saga(client, id).await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {id}: {what} not reached: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A definition stored by an older loader with a step timeout of 8000 years: starting a saga on
/// it must not take down the group-commit writer that every later start goes through.
#[tokio::test]
async fn a_stored_definition_with_an_absurd_timeout_does_not_break_later_starts() {
    let env = TestEnv::new();
    let store = Store::connect(&env.database_url(), 2).await.unwrap();
    store.migrate().await.unwrap();
    let absurd = one_step("absurd", "p", 8000 * YEAR, Duration::from_millis(10));
    let normal = one_step(
        "normal",
        "p",
        Duration::from_secs(5),
        Duration::from_millis(10),
    );
    let registry = store
        .sync_definitions(&[absurd.clone(), normal.clone()])
        .await
        .unwrap();
    let driver = Driver::new(store, Arc::new(registry));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(driver.start_writer(stop.clone()));
    let (_, created, _) = driver
        .start_saga(&Arc::new(absurd), json!({}), None, None, None)
        .await
        .expect("a saga starts on the absurd definition");
    assert!(created);
    let (_, created, _) = driver
        .start_saga(&Arc::new(normal), json!({}), None, None, None)
        .await
        .expect("later starts still work");
    assert!(created);
    stop.cancel();
    writer.await.unwrap();
}

/// Back-offs of 20000 years in a stored definition: the first timeout (timer sweeper) and the
/// first retryable failure (reply consumer) schedule a retry without taking either task down.
#[tokio::test]
async fn absurd_stored_back_offs_break_neither_the_sweeper_nor_the_reply_consumer() {
    let env = TestEnv::new();
    let store = Store::connect(&env.database_url(), 2).await.unwrap();
    store.migrate().await.unwrap();
    // Times out at once, then would wait 20000 years.
    let timing_out = one_step("timing_out", "p", Duration::from_millis(1), 20000 * YEAR);
    // Waits for its reply, then would wait 20000 years.
    let failing = one_step("failing", "p", Duration::from_secs(60), 20000 * YEAR);
    let registry = store
        .sync_definitions(&[timing_out.clone(), failing.clone()])
        .await
        .unwrap();
    let driver = Driver::new(store, Arc::new(registry));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(driver.start_writer(stop.clone()));
    let (timed_out_id, _, _) = driver
        .start_saga(&Arc::new(timing_out), json!({}), None, None, None)
        .await
        .unwrap();
    let (failing_id, _, _) = driver
        .start_saga(&Arc::new(failing), json!({}), None, None, None)
        .await
        .unwrap();
    stop.cancel();
    writer.await.unwrap();
    drop(driver);

    // Only a sane definition is shipped now; the stored ones stay usable for their sagas.
    let dir = definitions_dir(&[("sane.toml", &simple_toml("sane", 1, "p"))]);
    let mut settings = env.settings(dir.path());
    settings.timer_poll = Duration::from_millis(20);
    let mut app = spawn_app(settings).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let mut commands = consume(&ch, "saga.participant.p").await;
    let retry_scheduled = |s: &pb::Saga| history_kinds(s).iter().any(|k| k == "retry_scheduled");

    wait_until(
        &mut app.client,
        &timed_out_id.to_string(),
        "retry after timeout",
        retry_scheduled,
    )
    .await;

    // Answer the failing saga's command with a retryable failure, through the broker.
    let mut sane_command = None;
    loop {
        let d = tokio::time::timeout(WITHIN, commands.next())
            .await
            .expect("a command")
            .unwrap()
            .unwrap();
        let id = d.properties.correlation_id().as_ref().unwrap().to_string();
        let command_id: uuid::Uuid = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        if id == failing_id.to_string() {
            let body = ReplyBody::failure(command_id, "busy", true);
            reply(&ch, "saga.replies", serde_json::to_value(body).unwrap()).await;
            break;
        }
        let _ = sane_command.insert(command_id);
    }
    wait_until(
        &mut app.client,
        &failing_id.to_string(),
        "retry after failure",
        retry_scheduled,
    )
    .await;

    // Both tasks are still alive: a new saga's timeout is swept and its reply applied.
    let started = start_on(&mut app.client, "sane").await;
    loop {
        let d = tokio::time::timeout(WITHIN, commands.next())
            .await
            .expect("the sane saga's command")
            .unwrap()
            .unwrap();
        if d.properties.correlation_id().as_ref().unwrap().as_str() == started.saga_id {
            let command_id = d
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .parse()
                .unwrap();
            let body = ReplyBody::success(command_id, json!({}));
            reply(&ch, "saga.replies", serde_json::to_value(body).unwrap()).await;
            break;
        }
    }
    wait_for_status(
        &mut app.client,
        &started.saga_id,
        pb::SagaStatus::Completed,
        WITHIN,
    )
    .await;
    app.stop().await;
}

/// Loading v1 and v2 once, then shipping only v1: new sagas start on v1 again, and a saga that
/// was running on v2 still finishes on v2.
#[tokio::test]
async fn a_version_no_longer_shipped_is_retired_and_its_running_sagas_still_finish() {
    let env = TestEnv::new();
    let v1 = simple_toml("versioned", 1, "p");
    // v2 has a second step, so which version a saga runs on shows in its attempts.
    let v2 = simple_toml("versioned", 2, "p")
        + "\n[[steps]]\nname = \"second\"\nparticipant = \"p\"\naction = \"do_second\"\n";
    let both = definitions_dir(&[("v1.toml", &v1), ("v2.toml", &v2)]);
    let mut app = spawn_app(env.settings(both.path())).await;
    let on_v2 = start_on(&mut app.client, "versioned").await;
    assert_eq!(
        saga(&mut app.client, &on_v2.saga_id)
            .await
            .definition_version,
        2
    );
    app.stop().await;

    let only_v1 = definitions_dir(&[("v1.toml", &v1)]);
    let mut app = spawn_app(env.settings(only_v1.path())).await;
    let on_v1 = start_on(&mut app.client, "versioned").await;
    assert_eq!(
        saga(&mut app.client, &on_v1.saga_id)
            .await
            .definition_version,
        1
    );

    // Play participant p: every command succeeds.
    let (_conn, ch) = amqp_channel(&env).await;
    let mut commands = consume(&ch, "saga.participant.p").await;
    let answer = tokio::spawn(async move {
        while let Some(Ok(d)) = commands.next().await {
            let command_id = d
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .parse()
                .unwrap();
            let body = ReplyBody::success(command_id, json!({}));
            reply(&ch, "saga.replies", serde_json::to_value(body).unwrap()).await;
        }
    });
    let done_v2 = wait_for_status(
        &mut app.client,
        &on_v2.saga_id,
        pb::SagaStatus::Completed,
        WITHIN,
    )
    .await;
    assert_eq!(attempts(&done_v2).len(), 2, "v2 runs both its steps");
    let done_v1 = wait_for_status(
        &mut app.client,
        &on_v1.saga_id,
        pb::SagaStatus::Completed,
        WITHIN,
    )
    .await;
    assert_eq!(attempts(&done_v1).len(), 1);
    answer.abort();
    app.stop().await;

    // No file of it at all: no new saga starts on it, and the refusal says why.
    let other = definitions_dir(&[("other.toml", &simple_toml("other", 1, "p"))]);
    let mut app = spawn_app(env.settings(other.path())).await;
    let err = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: "versioned".into(),
            input_json: "{}".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("retired"), "{err:?}");
    assert!(err.message().ends_with("known: other"), "{err:?}");
    app.stop().await;
}

/// `stuck_for` too long to subtract from now is INVALID_ARGUMENT, not a handler panic.
#[tokio::test]
async fn an_absurd_stuck_for_is_an_invalid_argument() {
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let (mut sagas, mut admin): (_, AdminServiceClient<AuthChannel>) =
        clients(app.addr, None).await;
    let filter = pb::ListSagasRequest {
        stuck_for: Some(prost_types::Duration {
            seconds: 1_000_000_000_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    let err = sagas.list_sagas(filter.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stuck_for"), "{err:?}");
    let err = admin
        .redrive(pb::RedriveRequest {
            filter: Some(filter),
            reason: "test".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // Request times out of the clock's range are refused the same way.
    for seconds in [i64::MAX, i64::MIN] {
        let err = sagas
            .list_sagas(pb::ListSagasRequest {
                created_after: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    // The server is still serving after all of these.
    let ok = sagas
        .list_sagas(pb::ListSagasRequest {
            stuck_for: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    app.stop().await;
}

/// Durations `sagad check` used to accept, and names that would make routing keys ambiguous,
/// are refused at start-up with the file, line and field.
#[tokio::test]
async fn out_of_range_definitions_are_refused_at_start_up() {
    let env = TestEnv::new();
    let cases = [
        ("timeout = \"8000y\"", 9, "steps[0].timeout", "at most"),
        (
            "retry = { initial_backoff = \"20000y\", max_backoff = \"20000y\" }",
            9,
            "steps[0].retry.initial_backoff",
            "at most",
        ),
        ("timeout = \"500us\"", 9, "steps[0].timeout", "at least"),
    ];
    for (line, at, field, needle) in cases {
        let text = simple_toml("s", 1, "p") + line + "\n";
        let dir = definitions_dir(&[("s.toml", &text)]);
        let err = Application::build(env.settings(dir.path()), CancellationToken::new())
            .await
            .err()
            .unwrap_or_else(|| panic!("{line} must be refused"));
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("s.toml:{at}: field `{field}`")),
            "{shown}"
        );
        assert!(shown.contains(needle), "{shown}");
    }
    let text = simple_toml("s", 1, "p.q");
    let dir = definitions_dir(&[("s.toml", &text)]);
    let err = Application::build(env.settings(dir.path()), CancellationToken::new())
        .await
        .err()
        .expect("a dotted participant must be refused");
    assert!(
        err.to_string()
            .contains("s.toml:6: field `steps[0].participant`"),
        "{err}"
    );
}

/// Runs the real binary; one that does not exit (it accepted what it should refuse) fails the
/// test instead of hanging it.
async fn sagad(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagad"))
        .args(args)
        .env("SAGA_DATABASE_URL", env.database_url())
        .env("SAGA_AMQP_URL", env.amqp_url())
        .env("SAGA_LISTEN", "127.0.0.1:0")
        .env("SAGA_METRICS_LISTEN", "127.0.0.1:0")
        .env("SAGA_CONSOLE_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(WITHIN, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sagad {args:?} is still running: it should have refused"))
        .unwrap();
    // Both streams: an error must appear once in all of the output, not once in each.
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Out-of-range flags refuse to start, naming the flag, and the error is printed once.
#[tokio::test]
async fn out_of_range_settings_refuse_to_start_with_one_clear_error() {
    let env = TestEnv::new();
    let mut settings = env.settings(&repo_sagas());
    settings.outbox_batch = 0;
    let err = Application::build(settings, CancellationToken::new())
        .await
        .err()
        .expect("--outbox-batch 0 must be refused");
    assert!(err.to_string().contains("--outbox-batch"), "{err}");

    let sagas = repo_sagas();
    let sagas = sagas.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--definitions", sagas, "--outbox-batch", "0"],
            "--outbox-batch",
        ),
        (
            vec!["--definitions", sagas, "--timer-poll", "0s"],
            "--timer-poll",
        ),
        (
            vec!["--definitions", sagas, "--db-max-connections", "0"],
            "--db-max-connections",
        ),
        (
            vec![
                "--definitions",
                sagas,
                "--amqp-url",
                "amqp://guest:guest@host:notaport/",
            ],
            "--amqp-url",
        ),
        (
            vec!["--database-url", "mysql://root@127.0.0.1/saga", "migrate"],
            "--database-url",
        ),
    ] {
        let (ok, out) = sagad(&env, &args).await;
        assert!(!ok, "{args:?} must fail: {out}");
        assert_eq!(out.matches(needle).count(), 1, "{args:?}: {out}");
    }

    // `check` of an empty directory fails like `serve` does.
    let empty = definitions_dir(&[]);
    let (ok, out) = sagad(
        &env,
        &["--definitions", empty.path().to_str().unwrap(), "check"],
    )
    .await;
    assert!(!ok, "{out}");
    assert_eq!(out.matches("no saga definitions found").count(), 1, "{out}");
    let (ok, out) = sagad(&env, &["--definitions", sagas, "check"]).await;
    assert!(ok, "{out}");
}
