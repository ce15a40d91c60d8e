//! Sagas with large inputs and outputs stay readable.

use std::time::Duration;

use futures::StreamExt;
use saga::proto::v1 as pb;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn sagactl_shows_a_saga_with_a_large_input_and_large_outputs() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let id = start(
        &mut app.client,
        json!({"order_id": "L-1", "notes": "i".repeat(200 * 1000)}),
    )
    .await;
    // Each of the four steps answers with an output of about 1 MB, just under the reply limit.
    let mut consumers = std::collections::HashMap::new();
    for p in ["order", "payment", "delivery"] {
        consumers.insert(p, consume(&ch, &format!("saga.participant.{p}")).await);
    }
    for participant in ["order", "payment", "delivery", "order"] {
        let commands = consumers.get_mut(participant).unwrap();
        let command = tokio::time::timeout(Duration::from_secs(20), commands.next())
            .await
            .expect("a command")
            .unwrap()
            .unwrap();
        command
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&command.data).unwrap();
        reply(
            &ch,
            "saga.replies",
            json!({
                "command_id": body["command_id"],
                "outcome": "success",
                "output": {"blob": "o".repeat(1000 * 1000)},
            }),
        )
        .await;
    }
    wait_for_status_large(&mut app, &id).await;

    for output in ["json", "table"] {
        let out = tokio::process::Command::new(saga_testkit::built_bin("sagactl"))
            .args(["--server", &format!("http://{}", app.addr)])
            .args(["--output", output, "show", &id])
            .env_remove("SAGA_TOKEN")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{output}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("approve_order"), "{output}");
    }
    app.stop().await;
}

/// Waits for completion reading only the status: this test's client keeps tonic's default
/// 4 MB decode limit, which the whole saga exceeds.
async fn wait_for_status_large(app: &mut TestApp, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = app
            .client
            .list_sagas(pb::ListSagasRequest::default())
            .await
            .unwrap()
            .into_inner();
        if page
            .sagas
            .iter()
            .any(|s| s.id == id && s.status == pb::SagaStatus::Completed as i32)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {id} not completed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
