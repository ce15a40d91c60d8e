//! Operators: repairs with their refusals and audit trail, bulk redrive, pause/resume, the
//! circuit breaker, filters, counts, watch, and authentication on every service.

use std::time::Duration;

use futures::StreamExt;
use saga::proto::v1 as pb;
use saga_demo::FailRule;
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::*;

pub(crate) const OPERATOR: &str = "operator-token-0123456789";
pub(crate) const PARTICIPANT: &str = "participant-token-0123456789";
const WITHIN: Duration = Duration::from_secs(20);

pub(crate) fn settings_with_auth(env: &TestEnv, dir: &std::path::Path) -> saga::config::Settings {
    let mut s = env.settings(dir);
    s.operator_token = Some(OPERATOR.into());
    s.participant_token = Some(PARTICIPANT.into());
    s
}

fn repair(saga_id: &str, reason: &str) -> pb::RepairRequest {
    pb::RepairRequest {
        saga_id: saga_id.into(),
        reason: reason.into(),
        step: String::new(),
    }
}

/// The order saga, but a compensation that fails once needs an operator at once.
fn impatient_order_saga() -> tempfile::TempDir {
    let text = std::fs::read_to_string(repo_sagas().join("order_fulfillment.toml"))
        .unwrap()
        .replace("max_attempts = 10", "max_attempts = 1");
    definitions_dir(&[("order_fulfillment.toml", &text)])
}

#[tokio::test]
async fn every_repair_works_in_the_right_state_is_refused_in_a_wrong_one_and_is_audited() {
    let env = TestEnv::new();
    let dir = impatient_order_saga();
    let app = spawn_app(settings_with_auth(&env, dir.path())).await;
    let (mut sagas, mut admin) = clients(app.addr, Some(OPERATOR)).await;

    // No participants yet: sagas wait on create_order.
    let waiting = start(&mut sagas, json!({})).await;
    let e = admin.retry_step(repair(&waiting, " ")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "a reason is required");
    let e = admin
        .resolve_saga(repair(&waiting, "nothing to resolve"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("needs an operator"), "{}", e.message());

    // Retry now: a second attempt, the first superseded.
    let saga = admin
        .retry_step(repair(&waiting, "queue was purged"))
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.attempts.len(), 2);
    assert!(saga.attempts[0].superseded);
    assert_eq!(
        (saga.attempts[1].step.as_str(), saga.attempts[1].attempt),
        ("create_order", 2)
    );
    assert_eq!(
        operator_actions(&saga),
        [
            json!({"action": "retry", "actor": "operator", "reason": "queue was purged", "kind": "action"})
        ]
    );

    // Skip: done by hand, with an output; the saga moves on to the payment.
    let saga = admin
        .skip_step(pb::SkipStepRequest {
            saga_id: waiting.clone(),
            reason: "order created by hand".into(),
            output_json: r#"{"order_ref": "manual-1"}"#.into(),
            step: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.current_step, "authorize_payment");
    let outputs: Value = serde_json::from_str(&saga.outputs_json).unwrap();
    assert_eq!(outputs["create_order"], json!({"order_ref": "manual-1"}));

    // Compensate: the running saga turns around.
    let saga = admin
        .compensate_saga(repair(&waiting, "customer cancelled"))
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.status, pb::SagaStatus::Compensating as i32);
    assert_eq!(operator_actions(&saga).len(), 3);

    // Now let the participants answer: cancel_order fails every time, so the saga needs an
    // operator; resolve closes it.
    let demo = spawn_demo(&env, |c| {
        c.failures = vec!["cancel_order".parse::<FailRule>().unwrap()]
    });
    let saga = wait_for_status_on(&mut sagas, &waiting, pb::SagaStatus::NeedsOperator).await;
    assert!(
        saga.error.contains("cancel_order") || saga.error.contains("create_order"),
        "{}",
        saga.error
    );
    let e = admin
        .compensate_saga(repair(&waiting, "again"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let saga = admin
        .resolve_saga(repair(&waiting, "refunded by hand, ticket 7"))
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.status, pb::SagaStatus::Resolved as i32);
    assert_eq!(saga.history.last().unwrap().kind, "saga_resolved");
    for r in [
        admin.retry_step(repair(&waiting, "x")).await,
        admin.resolve_saga(repair(&waiting, "x")).await,
    ] {
        assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
    }
    let e = admin
        .retry_step(repair(&uuid::Uuid::now_v7().to_string(), "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    demo.stop().await;
    app.stop().await;
}

async fn wait_for_status_on(
    client: &mut pb::saga_service_client::SagaServiceClient<AuthChannel>,
    id: &str,
    status: pb::SagaStatus,
) -> pb::Saga {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let saga = client
            .get_saga(pb::GetSagaRequest { saga_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if saga.status == status as i32 {
            return saga;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {id} not {status:?}: {saga:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn redrive_retries_exactly_the_matching_sagas_and_a_dry_run_none() {
    let env = TestEnv::new();
    let app = spawn_app(settings_with_auth(&env, &repo_sagas())).await;
    let (mut sagas, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(start(&mut sagas, json!({})).await);
    }
    // One saga moved on to the payment step by hand: the filter below must not touch it.
    let other = start(&mut sagas, json!({})).await;
    admin
        .skip_step(pb::SkipStepRequest {
            saga_id: other.clone(),
            reason: "by hand".into(),
            output_json: String::new(),
            step: String::new(),
        })
        .await
        .unwrap();

    let filter = pb::ListSagasRequest {
        step: "create_order".into(),
        ..Default::default()
    };
    let redrive = |dry_run| pb::RedriveRequest {
        filter: Some(filter.clone()),
        reason: "broker lost messages at 10:00".into(),
        dry_run,
        batch_size: 2,
        limit: 0,
    };
    let attempts_of = |sagas: &mut pb::saga_service_client::SagaServiceClient<AuthChannel>,
                       id: String| {
        let mut c = sagas.clone();
        async move {
            c.get_saga(pb::GetSagaRequest { saga_id: id })
                .await
                .unwrap()
                .into_inner()
                .attempts
                .len()
        }
    };

    let progress: Vec<_> = admin
        .redrive(redrive(true))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let last = progress.last().unwrap().as_ref().unwrap();
    assert_eq!((last.matched, last.retried, last.done), (5, 5, true));
    let mut listed: Vec<_> = last.saga_ids.clone();
    listed.sort();
    let mut expected = waiting.clone();
    expected.sort();
    assert_eq!(listed, expected);
    for id in &waiting {
        assert_eq!(
            attempts_of(&mut sagas, id.clone()).await,
            1,
            "a dry run changes nothing"
        );
    }

    let progress: Vec<_> = admin
        .redrive(redrive(false))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(progress.len(), 3, "5 sagas in batches of 2");
    let last = progress.last().unwrap().as_ref().unwrap();
    assert_eq!(
        (last.matched, last.retried, last.skipped, last.done),
        (5, 5, 0, true)
    );
    for id in &waiting {
        assert_eq!(attempts_of(&mut sagas, id.clone()).await, 2);
    }
    assert_eq!(
        attempts_of(&mut sagas, other.clone()).await,
        2,
        "create_order + authorize_payment only"
    );

    let everything = pb::RedriveRequest {
        filter: None,
        reason: "all".into(),
        ..Default::default()
    };
    assert_eq!(
        admin.redrive(everything).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    app.stop().await;
}

#[tokio::test]
async fn a_paused_participant_holds_its_commands_and_resume_delivers_them() {
    let env = TestEnv::new();
    let app = spawn_app(settings_with_auth(&env, &repo_sagas())).await;
    let (mut sagas, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    let demo = spawn_demo(&env, |_| {});
    let p = admin
        .pause_participant(pb::ParticipantRequest {
            participant: "payment".into(),
            reason: "db maintenance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(p.paused);
    assert_eq!(
        (p.paused_by.as_str(), p.paused_reason.as_str()),
        ("operator", "db maintenance")
    );

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(start(&mut sagas, json!({})).await);
    }
    // The payment commands wait in the outbox; no saga fails meanwhile.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let ps = admin
            .list_participants(pb::ListParticipantsRequest {})
            .await
            .unwrap()
            .into_inner()
            .participants;
        let payment = ps.iter().find(|p| p.name == "payment").unwrap();
        if payment.held_commands == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "payment commands not held: {payment:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pool = env.pool().await;
    let paid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM demo_processed_commands WHERE command = 'authorize_payment'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(paid, 0);
    for id in &ids {
        let saga = sagas
            .get_saga(pb::GetSagaRequest {
                saga_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (saga.status, saga.current_step.as_str()),
            (pb::SagaStatus::Running as i32, "authorize_payment")
        );
    }

    // Held long enough that, once out, each gets its whole timeout from then on.
    loop {
        let waited: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE created_at < now() - interval '1100 milliseconds'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waited == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "held commands vanished"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let p = admin
        .resume_participant(pb::ParticipantRequest {
            participant: "payment".into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!p.paused);
    for id in &ids {
        wait_for_status_on(&mut sagas, id, pb::SagaStatus::Completed).await;
    }
    // Their attempts count from when they were published, not from when they were decided.
    let restarted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM step_attempts a JOIN sagas s ON s.id = a.saga_id \
         WHERE a.step = 'authorize_payment' AND a.sent_at > s.created_at + interval '1 second'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(restarted, 3);
    let e = admin
        .pause_participant(pb::ParticipantRequest {
            participant: "nobody".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    demo.stop().await;
    app.stop().await;
}

const FLAKY: &str = r#"
name = "flaky"
version = 1

[defaults]
timeout = "200ms"
retry = { max_attempts = 1000, initial_backoff = "20ms", max_backoff = "50ms" }

[[steps]]
name = "ping"
participant = "remote"
action = "ping"
"#;

#[tokio::test]
async fn a_silent_participant_trips_its_circuit_its_commands_wait_and_a_probe_closes_it() {
    use futures::StreamExt as _;
    use lapin::options::BasicAckOptions;

    let env = TestEnv::new();
    let dir = definitions_dir(&[("flaky.toml", FLAKY)]);
    let mut settings = env.settings(dir.path());
    settings.circuit_failures = 3;
    settings.circuit_cooldown = Duration::from_millis(500);
    let mut app = spawn_app(settings).await;
    let id = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: "flaky".into(),
            input_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    let (_, mut admin) = clients(app.addr, None).await;

    // Nobody answers: after 3 timeouts the circuit opens and the retries wait in the outbox.
    let deadline = tokio::time::Instant::now() + WITHIN;
    let open = loop {
        let ps = admin
            .list_participants(pb::ListParticipantsRequest {})
            .await
            .unwrap()
            .into_inner()
            .participants;
        let remote = ps.into_iter().find(|p| p.name == "remote").unwrap();
        if remote.circuit == pb::CircuitState::Open as i32 {
            break remote;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "circuit never opened: {remote:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(open.consecutive_failures >= 3);
    let sent_when_open = app
        .client
        .get_saga(pb::GetSagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .attempts
        .len();
    // While open, probes go out at most once per cool-down, not every 20 ms back-off: over
    // 1.5 s a closed circuit would send dozens of attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent_later = app
        .client
        .get_saga(pb::GetSagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .attempts
        .len();
    assert!(
        sent_later - sent_when_open <= 4,
        "{sent_when_open} -> {sent_later}"
    );

    // The participant comes back: the next probe succeeds, the circuit closes, the saga ends.
    let (_conn, ch) = amqp_channel(&env).await;
    let mut commands = consume(&ch, "saga.participant.remote").await;
    let answer = async {
        while let Some(Ok(d)) = commands.next().await {
            let body: Value = serde_json::from_slice(&d.data).unwrap();
            reply(
                &ch,
                "saga.replies",
                json!({"command_id": body["command_id"], "outcome": "success"}),
            )
            .await;
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    };
    let done = wait_for_status(&mut app.client, &id, pb::SagaStatus::Completed, WITHIN);
    tokio::select! {
        _ = answer => panic!("consumer ended"),
        _ = done => {}
    }
    let ps = admin
        .list_participants(pb::ListParticipantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .participants;
    let remote = ps.into_iter().find(|p| p.name == "remote").unwrap();
    assert_eq!(
        (remote.circuit, remote.consecutive_failures),
        (pb::CircuitState::Closed as i32, 0)
    );
    app.stop().await;
}

#[tokio::test]
async fn filters_counts_and_watch_show_where_sagas_wait() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_, mut admin) = clients(app.addr, None).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(start(&mut app.client, json!({})).await);
    }
    let lister = app.client.clone();
    let list = |req: pb::ListSagasRequest| {
        let mut c = lister.clone();
        async move {
            c.list_sagas(req)
                .await
                .unwrap()
                .into_inner()
                .sagas
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(pb::ListSagasRequest {
            participant: "order".into(),
            ..Default::default()
        })
        .await
        .len(),
        3
    );
    assert!(
        list(pb::ListSagasRequest {
            participant: "payment".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        list(pb::ListSagasRequest {
            step: "create_order".into(),
            ..Default::default()
        })
        .await
        .len(),
        3
    );
    let stuck = |secs| pb::ListSagasRequest {
        stuck_for: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
        ..Default::default()
    };
    assert!(
        list(stuck(3600)).await.is_empty(),
        "nothing has waited an hour"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(list(stuck(1)).await.len(), 3);
    let past = prost_types::Timestamp {
        seconds: 0,
        nanos: 0,
    };
    assert_eq!(
        list(pb::ListSagasRequest {
            created_after: Some(past),
            ..Default::default()
        })
        .await
        .len(),
        3
    );
    assert!(
        list(pb::ListSagasRequest {
            created_before: Some(past),
            ..Default::default()
        })
        .await
        .is_empty()
    );

    let counts = admin
        .count_sagas(pb::CountSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.by_status.len(), 1);
    assert_eq!(
        (counts.by_status[0].status, counts.by_status[0].count),
        (pb::SagaStatus::Running as i32, 3)
    );
    let at = &counts.by_step[0];
    assert_eq!(
        (at.step.as_str(), at.participant.as_str(), at.count),
        ("create_order", "order", 3)
    );

    // Watch one saga from start to finish.
    let mut events = app
        .client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: waiting[0].clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first.kind, "saga_started");
    let demo = spawn_demo(&env, |c| {
        c.failures = vec!["schedule_delivery".parse::<FailRule>().unwrap()]
    });
    let rest: Vec<_> = tokio::time::timeout(WITHIN, events.collect::<Vec<_>>())
        .await
        .expect("the stream ends with the saga");
    let kinds: Vec<String> = std::iter::once(first.kind)
        .chain(rest.into_iter().map(|e| e.unwrap().kind))
        .collect();
    assert_eq!(kinds.last().unwrap(), "saga_compensated");
    assert_eq!(kinds.iter().filter(|k| *k == "step_compensated").count(), 2);
    // The demo fails schedule_delivery for every saga: all three end compensated with that error.
    for id in &waiting {
        wait_for_status(&mut app.client, id, pb::SagaStatus::Compensated, WITHIN).await;
    }
    let by_error = |text: &str| pb::ListSagasRequest {
        error_contains: text.into(),
        ..Default::default()
    };
    assert_eq!(
        list(by_error("SCHEDULE_delivery")).await.len(),
        3,
        "case-insensitive"
    );
    assert!(list(by_error("authorize_payment")).await.is_empty());
    assert!(
        list(by_error("%")).await.is_empty(),
        "wildcards are matched literally"
    );
    demo.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn every_service_refuses_missing_bad_and_underprivileged_tokens() {
    let env = TestEnv::new();
    let app = spawn_app(settings_with_auth(&env, &repo_sagas())).await;
    let any_id = uuid::Uuid::now_v7().to_string();
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("not-a-real-token-at-all"), Code::Unauthenticated),
    ] {
        let (mut sagas, mut admin) = clients(app.addr, token).await;
        assert_eq!(
            sagas
                .get_saga(pb::GetSagaRequest {
                    saga_id: any_id.clone()
                })
                .await
                .unwrap_err()
                .code(),
            code
        );
        assert_eq!(
            sagas
                .list_sagas(pb::ListSagasRequest::default())
                .await
                .unwrap_err()
                .code(),
            code
        );
        assert_eq!(
            sagas
                .start_saga(pb::StartSagaRequest::default())
                .await
                .unwrap_err()
                .code(),
            code
        );
        assert_eq!(
            admin
                .retry_step(repair(&any_id, "x"))
                .await
                .unwrap_err()
                .code(),
            code
        );
        assert_eq!(
            admin
                .list_participants(pb::ListParticipantsRequest {})
                .await
                .unwrap_err()
                .code(),
            code
        );
    }
    // A participant token works on the saga service, not on the admin service.
    let (mut sagas, mut admin) = clients(app.addr, Some(PARTICIPANT)).await;
    let id = start(&mut sagas, json!({})).await;
    sagas
        .get_saga(pb::GetSagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap();
    let e = admin.retry_step(repair(&id, "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        !e.message().contains(PARTICIPANT),
        "tokens are never echoed"
    );
    assert_eq!(
        admin
            .count_sagas(pb::CountSagasRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // Health checks need no token.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    app.stop().await;
}

#[tokio::test]
async fn a_participant_token_reads_only_the_sagas_it_started() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"shop\"\nscope = \"participant\"\ntoken = \"shop-token-0123456789\"\n\n\
             [[token]]\nname = \"kiosk\"\nscope = \"participant\"\ntoken = \"kiosk-token-0123456789\"\n\n\
             [[token]]\nname = \"ops\"\nscope = \"operator\"\ntoken = \"{OPERATOR}\"\n"
        ),
    )
    .unwrap();
    let mut settings = env.settings(&repo_sagas());
    settings.tokens_file = Some(tokens);
    let app = spawn_app(settings).await;
    let (mut shop, _) = clients(app.addr, Some("shop-token-0123456789")).await;
    let (mut kiosk, _) = clients(app.addr, Some("kiosk-token-0123456789")).await;
    let (mut ops, _) = clients(app.addr, Some(OPERATOR)).await;
    let mine = start(&mut shop, json!({})).await;
    let theirs = start(&mut kiosk, json!({})).await;

    let ids = |r: pb::ListSagasResponse| r.sagas.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(shop
            .list_sagas(pb::ListSagasRequest::default())
            .await
            .unwrap()
            .into_inner()),
        vec![mine.clone()]
    );
    assert_eq!(
        ids(kiosk
            .list_sagas(pb::ListSagasRequest::default())
            .await
            .unwrap()
            .into_inner()),
        vec![theirs.clone()]
    );
    assert_eq!(
        ids(ops
            .list_sagas(pb::ListSagasRequest::default())
            .await
            .unwrap()
            .into_inner())
        .len(),
        2
    );

    shop.get_saga(pb::GetSagaRequest {
        saga_id: mine.clone(),
    })
    .await
    .unwrap();
    let e = shop
        .get_saga(pb::GetSagaRequest {
            saga_id: theirs.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "another participant's saga looks missing"
    );
    let e = shop
        .watch_saga(pb::WatchSagaRequest {
            saga_id: theirs.clone(),
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let saga = ops
        .get_saga(pb::GetSagaRequest { saga_id: theirs })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(saga.id.len(), 36);

    // Idempotency keys do not reach across callers either.
    let keyed = |key: &str| pb::StartSagaRequest {
        definition: "order_fulfillment".into(),
        input_json: "{}".into(),
        idempotency_key: key.into(),
    };
    shop.start_saga(keyed("order-9")).await.unwrap();
    let e = kiosk.start_saga(keyed("order-9")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    app.stop().await;
}
