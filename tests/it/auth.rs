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
