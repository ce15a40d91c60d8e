//! The AMQP contract, exercised by a participant written from docs/participant-contract.md
//! alone (raw lapin, no project code on its side), and the reply path's refusals.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Consumer};
use saga::proto::v1 as pb;
use serde_json::{Value, json};

use crate::helpers::*;

fn header(d: &lapin::message::Delivery, name: &str) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

/// A consumer of the dead-letter queue. sagad declares it; declaring it here with the same
/// arguments makes sure it exists before the test consumes.
async fn dead_letters(ch: &lapin::Channel) -> Consumer {
    ch.queue_declare(
        "saga.dead-letter".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    consume(ch, "saga.dead-letter").await
}

#[tokio::test]
async fn a_participant_written_from_the_docs_drives_a_saga_to_completion() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let id = start(
        &mut app.client,
        json!({"order_id": "A-7", "amount_cents": 4200}),
    )
    .await;

    let expected = [
        ("order", "create_order"),
        ("payment", "authorize_payment"),
        ("delivery", "schedule_delivery"),
        ("order", "approve_order"),
    ];
    let mut consumers = std::collections::HashMap::new();
    for p in ["order", "payment", "delivery"] {
        consumers.insert(p, consume(&ch, &format!("saga.participant.{p}")).await);
    }
    for (i, (participant, step)) in expected.iter().enumerate() {
        let d = next(consumers.get_mut(participant).unwrap()).await;
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        let command_id = d.properties.message_id().as_ref().unwrap().to_string();
        assert_eq!(body["command_id"], json!(command_id));
        assert_eq!(d.properties.correlation_id().as_ref().unwrap().as_str(), id);
        assert_eq!(
            d.properties.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*d.properties.delivery_mode(), Some(2));
        assert_eq!(d.properties.kind().as_ref().unwrap().as_str(), *step);
        assert_eq!(header(&d, "saga-id"), id);
        assert_eq!(header(&d, "saga-step"), *step);
        assert_eq!(header(&d, "saga-kind"), "action");
        assert_eq!(header(&d, "saga-attempt"), "1");
        assert_eq!(header(&d, "saga-definition"), "order_fulfillment");
        assert_eq!(body["saga_id"], json!(id));
        assert_eq!(
            body["input"],
            json!({"order_id": "A-7", "amount_cents": 4200})
        );
        assert_eq!(
            (
                body["step"].as_str(),
                body["kind"].as_str(),
                body["attempt"].as_u64()
            ),
            (Some(*step), Some("action"), Some(1))
        );
        // Every earlier step's output travels with the command.
        let outputs = body["outputs"].as_object().unwrap();
        assert_eq!(outputs.len(), i);
        if i > 0 {
            assert_eq!(outputs[expected[i - 1].1], json!({"n": i - 1}));
        }
        let reply_to = d.properties.reply_to().as_ref().unwrap().to_string();
        reply(
            &ch,
            &reply_to,
            json!({"command_id": command_id, "outcome": "success", "output": {"n": i}}),
        )
        .await;
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let saga = wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::Completed,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(saga.attempts.len(), 4);
    assert!(
        saga.attempts
            .iter()
            .all(|a| a.replied_at.is_some() && a.outcome == pb::Outcome::Success as i32)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_participant_may_answer_over_grpc_and_duplicates_change_nothing() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let id = start(&mut app.client, json!({})).await;
    let mut orders = consume(&ch, "saga.participant.order").await;
    let mut payments = consume(&ch, "saga.participant.payment").await;

    let d = next(&mut orders).await;
    let command_id = d.properties.message_id().as_ref().unwrap().to_string();
    let ok = pb::ReportStepResultRequest {
        command_id: command_id.clone(),
        outcome: pb::Outcome::Success as i32,
        output_json: r#"{"order_ref": "r-1"}"#.into(),
        ..Default::default()
    };
    assert!(
        app.client
            .report_step_result(ok.clone())
            .await
            .unwrap()
            .into_inner()
            .applied
    );
    // The same answer again, over gRPC and over AMQP: recognised, acknowledged, ignored.
    assert!(
        !app.client
            .report_step_result(ok)
            .await
            .unwrap()
            .into_inner()
            .applied
    );
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id, "outcome": "failure", "reason": "late"}),
    )
    .await;

    let d = next(&mut payments).await;
    let payment_command = d.properties.message_id().as_ref().unwrap().to_string();
    let declined = pb::ReportStepResultRequest {
        command_id: payment_command,
        outcome: pb::Outcome::Failure as i32,
        reason: "card declined".into(),
        ..Default::default()
    };
    assert!(
        app.client
            .report_step_result(declined)
            .await
            .unwrap()
            .into_inner()
            .applied
    );

    // The order is compensated.
    let d = next(&mut orders).await;
    let body: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(
        (body["command"].as_str(), body["kind"].as_str()),
        (Some("cancel_order"), Some("compensation"))
    );
    assert_eq!(body["outputs"]["create_order"], json!({"order_ref": "r-1"}));
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": body["command_id"], "outcome": "success"}),
    )
    .await;

    let saga = wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::Compensated,
        Duration::from_secs(10),
    )
    .await;
    assert!(saga.error.contains("card declined"), "{}", saga.error);
    assert_eq!(
        attempts(&saga),
        [
            ("create_order".into(), "action"),
            ("authorize_payment".into(), "action"),
            ("create_order".into(), "compensation")
        ]
    );
    // The duplicate failure reply never reached the saga: the order step stays a success.
    assert_eq!(saga.attempts[0].outcome, pb::Outcome::Success as i32);
    app.stop().await;
}

#[tokio::test]
async fn malformed_and_unknown_replies_go_to_the_dead_letter_queue_with_the_reason() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let mut dead = dead_letters(&ch).await;

    let unknown = uuid::Uuid::now_v7();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "invalid reply"),
        (
            json!({"outcome": "success"}).to_string().into_bytes(),
            "missing field `command_id`",
        ),
        (
            json!({"command_id": 12, "outcome": "success"})
                .to_string()
                .into_bytes(),
            "invalid type",
        ),
        (
            json!({"command_id": unknown, "outcome": "success"})
                .to_string()
                .into_bytes(),
            "unknown command id",
        ),
        (
            json!({"command_id": unknown, "outcome": "failure"})
                .to_string()
                .into_bytes(),
            "unknown command id",
        ),
    ];
    for (body, _) in &bad {
        ch.basic_publish(
            "".into(),
            "saga.replies".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut got = Vec::new();
    for _ in &bad {
        let d = next(&mut dead).await;
        got.push((d.data.clone(), header(&d, "x-saga-error")));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    for (body, needle) in &bad {
        let (_, reason) = got
            .iter()
            .find(|(b, _)| b == body)
            .expect("every bad reply is dead-lettered");
        assert!(reason.contains(needle), "{reason} lacks {needle}");
    }
    // The service still works.
    let id = start(&mut app.client, json!({})).await;
    assert!(!id.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_reply_the_database_cannot_store_is_dead_lettered_and_the_saga_goes_on() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let mut dead = dead_letters(&ch).await;
    let mut orders = consume(&ch, "saga.participant.order").await;
    let poisoned = start(&mut app.client, json!({"order_id": "A-9"})).await;
    let healthy = start(&mut app.client, json!({"order_id": "A-10"})).await;
    let mut command_of = std::collections::HashMap::new();
    for _ in 0..2 {
        let command = next(&mut orders).await;
        let id = command
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        command_of.insert(header(&command, "saga-id"), id);
    }
    let (bad_command, good_command) = (&command_of[&poisoned], &command_of[&healthy]);

    // Valid JSON, but `jsonb` cannot hold a NUL character. Sent back to back with a good
    // reply to another saga's command, so both may be applied in one batch: the bad one must
    // not hold the good one back, nor come back for ever. (Answering different commands keeps
    // the bad reply from becoming a mere duplicate when the good one commits first.)
    let bad = format!(
        r#"{{"command_id": "{bad_command}", "outcome": "success", "output": {{"note": "a\u0000b"}}}}"#
    );
    ch.basic_publish(
        "".into(),
        "saga.replies".into(),
        BasicPublishOptions::default(),
        bad.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": good_command, "outcome": "success", "output": {"order": "created"}}),
    )
    .await;

    let d = next(&mut dead).await;
    assert_eq!(d.data, bad.as_bytes());
    let reason = header(&d, "x-saga-error");
    assert!(reason.contains("cannot store"), "{reason}");
    // The good reply moved its saga on: the payment step's command went out.
    let mut payments = consume(&ch, "saga.participant.payment").await;
    let next_command = next(&mut payments).await;
    assert_eq!(header(&next_command, "saga-id"), healthy);
    let saga = app
        .client
        .get_saga(pb::GetSagaRequest {
            saga_id: healthy.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(saga.attempts[0].outcome, pb::Outcome::Success as i32);
    assert_eq!(
        serde_json::from_str::<Value>(&saga.attempts[0].output_json).unwrap(),
        json!({"order": "created"})
    );
    // The poisoned saga lost nothing: it still waits for its reply, and a good one moves it on.
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": bad_command, "outcome": "success", "output": {"order": "created"}}),
    )
    .await;
    let next_command = next(&mut payments).await;
    assert_eq!(header(&next_command, "saga-id"), poisoned);
    app.stop().await;
}

const IMPATIENT: &str = r#"
name = "impatient"
version = 1

# Long enough for an answer that does come, even on a loaded machine (only the bank stays
# silent, and only for charges); the stock step waits longer still, as its attempts must be one.
[defaults]
timeout = "2s"
retry = { max_attempts = 2, initial_backoff = "50ms", max_backoff = "100ms" }

[[steps]]
name = "reserve"
participant = "stock"
action = "reserve"
compensation = "release"
timeout = "30s"

[[steps]]
name = "charge"
participant = "bank"
action = "charge"
compensation = "refund"
"#;

#[tokio::test]
async fn a_silent_participant_times_out_is_retried_and_then_compensated() {
    let env = TestEnv::new();
    let dir = definitions_dir(&[("impatient.toml", IMPATIENT)]);
    let mut app = spawn_app(env.settings(dir.path())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let id = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: "impatient".into(),
            input_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    // Stock answers everything; the bank loses every charge request but answers refunds.
    let mut stock = consume(&ch, "saga.participant.stock").await;
    let mut bank = consume(&ch, "saga.participant.bank").await;
    let answer = async {
        let mut charges_ignored = 0;
        loop {
            let d = tokio::select! { d = next(&mut stock) => d, d = next(&mut bank) => d };
            let body: Value = serde_json::from_slice(&d.data).unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
            if body["command"] == "charge" {
                charges_ignored += 1;
                continue;
            }
            reply(
                &ch,
                "saga.replies",
                json!({"command_id": body["command_id"], "outcome": "success"}),
            )
            .await;
            if body["command"] == "release" {
                return charges_ignored;
            }
        }
    };
    let ignored = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("stock is released");
    assert_eq!(ignored, 2);
    let saga = wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::Compensated,
        Duration::from_secs(10),
    )
    .await;

    // Two attempts of charge, each timed out, each with its own command id; then, since the
    // bank may have charged without answering, charge is refunded before stock is released.
    assert_eq!(
        attempts(&saga),
        [
            ("reserve".into(), "action"),
            ("charge".into(), "action"),
            ("charge".into(), "action"),
            ("charge".into(), "compensation"),
            ("reserve".into(), "compensation"),
        ]
    );
    assert!(
        saga.attempts[1..3]
            .iter()
            .all(|a| a.timed_out && a.replied_at.is_none())
    );
    assert_ne!(saga.attempts[1].command_id, saga.attempts[2].command_id);
    let kinds = history_kinds(&saga);
    assert_eq!(kinds.iter().filter(|k| *k == "step_timed_out").count(), 2);
    assert!(kinds.contains(&"compensation_started".to_string()));
    assert_eq!(kinds.last().unwrap(), "saga_compensated");
    app.stop().await;
}
