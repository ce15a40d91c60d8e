//! Participant tokens bound to participants.

use std::time::Duration;

use saga::proto::v1 as pb;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const OPERATOR: &str = "operator-token-0123456789";
const PAYMENT: &str = "payment-token-0123456789";
const ANY: &str = "any-participant-token-0123";

/// The saga's attempt of `step` still waiting for its reply, once it was sent.
async fn pending(client: &mut SagaServiceClient<AuthChannel>, id: &str, step: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let saga = client
            .get_saga(pb::GetSagaRequest { saga_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if let Some(a) = saga
            .attempts
            .iter()
            .find(|a| a.step == step && a.replied_at.is_none())
        {
            return a.command_id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{step} never sent: {saga:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn success(command_id: &str) -> pb::ReportStepResultRequest {
    pb::ReportStepResultRequest {
        command_id: command_id.into(),
        outcome: pb::Outcome::Success as i32,
        output_json: "{}".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_token_bound_to_payment_reports_only_payment_results() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"ops\"\nscope = \"operator\"\ntoken = \"{OPERATOR}\"\n\
             [[token]]\nname = \"payment-service\"\nscope = \"participant\"\ntoken = \"{PAYMENT}\"\n\
             participants = [\"payment\"]\n\
             [[token]]\nname = \"any\"\nscope = \"participant\"\ntoken = \"{ANY}\"\n"
        ),
    )
    .unwrap();
    let mut settings = env.settings(&repo_sagas());
    settings.tokens_file = Some(tokens);
    let app = spawn_app(settings).await;
    let (mut ops, _) = clients(app.addr, Some(OPERATOR)).await;
    let (mut payment, _) = clients(app.addr, Some(PAYMENT)).await;
    let (mut any, _) = clients(app.addr, Some(ANY)).await;
    let id = start(&mut ops, json!({"order_id": "B-1"})).await;

    let order_cmd = pending(&mut ops, &id, "create_order").await;
    let denied = payment
        .report_step_result(success(&order_cmd))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // An unbound participant token may answer for any participant.
    assert!(
        any.report_step_result(success(&order_cmd))
            .await
            .unwrap()
            .into_inner()
            .applied
    );
    let payment_cmd = pending(&mut ops, &id, "authorize_payment").await;
    assert!(
        payment
            .report_step_result(success(&payment_cmd))
            .await
            .unwrap()
            .into_inner()
            .applied
    );
    app.stop().await;
}

#[tokio::test]
async fn watch_streams_are_capped_per_token() {
    let env = TestEnv::new();
    let mut settings = env.settings(&repo_sagas());
    settings.operator_token = Some(OPERATOR.into());
    settings.participant_token = Some(ANY.into());
    settings.max_watches_per_token = 2;
    let app = spawn_app(settings).await;
    let (mut ops, _) = clients(app.addr, Some(OPERATOR)).await;
    let (mut other, _) = clients(app.addr, Some(ANY)).await;
    // No participant runs: the saga stays running and its watches stay open.
    let id = start(&mut other, json!({"order_id": "W-1"})).await;
    let watch = || pb::WatchSagaRequest {
        saga_id: id.clone(),
        after_seq: 0,
    };
    let first = ops.watch_saga(watch()).await.unwrap().into_inner();
    let _second = ops.watch_saga(watch()).await.unwrap().into_inner();
    let refused = ops.watch_saga(watch()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Another token has its own allowance.
    let _theirs = other.watch_saga(watch()).await.unwrap().into_inner();
    // A stream the caller closes gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ops.watch_saga(watch()).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_watch_follows_the_commits_of_its_saga() {
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let (mut client, _) = clients(app.addr, None).await;
    let id = start(&mut client, json!({"order_id": "W-2"})).await;
    let mut stream = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // Answer each command by hand; every transition shows up on the stream, up to the end.
    let mut kinds = Vec::new();
    let done = async {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the watch stalled")
                .unwrap();
            let Some(event) = event else { break };
            if event.kind == "command_sent" {
                let cmd = event.command_id.clone();
                client.report_step_result(success(&cmd)).await.unwrap();
            }
            kinds.push(event.kind);
        }
    };
    done.await;
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("saga_completed"),
        "{kinds:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn each_commit_announces_the_sagas_it_changed() {
    let env = TestEnv::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = saga::app::Application::build(env.settings(&repo_sagas()), shutdown.clone())
        .await
        .unwrap();
    let mut feed = app.driver().saga_changes();
    let addr = app.local_addr();
    let running = tokio::spawn(app.run_until_stopped());
    let (mut client, _) = clients(addr, None).await;
    let id = start(&mut client, json!({"order_id": "F-1"})).await;
    let cmd = pending(&mut client, &id, "create_order").await;
    client.report_step_result(success(&cmd)).await.unwrap();
    // The reply's transition is what watchers of this saga are woken by.
    let announced = async {
        loop {
            if feed.recv().await.unwrap().to_string() == id {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), announced)
        .await
        .expect("the transition was announced");
    shutdown.cancel();
    running.await.unwrap();
}
