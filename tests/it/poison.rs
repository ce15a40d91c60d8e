//! Poison replies and the rough edges of the participant contract, as an outside participant
//! meets them: oversized values, nulls, missing reasons, late replies, exact numbers, idempotency
//! conflicts, reflection and malformed protobuf.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Consumer};
use saga::contract::{MAX_JSON_DEPTH, MAX_REASON_BYTES, NO_REASON};
use saga::proto::v1 as pb;
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::*;

async fn next(consumer: &mut Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a message within 10s")
        .unwrap()
        .unwrap()
}

fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
    {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(other) => panic!("header {name}: {other:?}"),
        None => None,
    }
}

fn command_id(d: &lapin::message::Delivery) -> String {
    d.properties.message_id().as_ref().unwrap().to_string()
}

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

async fn publish_raw(ch: &lapin::Channel, body: &[u8], properties: BasicProperties) {
    ch.basic_publish(
        "".into(),
        "saga.replies".into(),
        BasicPublishOptions::default(),
        body,
        properties,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// The broker's connections on the test's vhost, by name (client address and port): a
/// reconnect shows up as a name gone and a new one.
fn connections(vhost: &str) -> BTreeSet<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "vhost", "name"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(v, _)| *v == vhost)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// Waits until sagad's broker connections (relays and reply consumer) and the test's own are
/// all open, and returns them.
async fn settled_connections(env: &TestEnv, expected: usize) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = connections(&env.name);
        if now.len() >= expected {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} connections: {now:?}",
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(app: &mut TestApp, id: &str) -> pb::Saga {
    app.client
        .get_saga(pb::GetSagaRequest {
            saga_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn poison_replies_are_dead_lettered_shortened_and_never_reconnect_the_consumer() {
    let env = TestEnv::new();
    let settings = env.settings(&repo_sagas());
    // The outbox relays' connections, the reply consumer's and this test's.
    let expected = usize::from(settings.relay_workers) + 2;
    let mut app = spawn_app(settings).await;
    let (conn, ch) = amqp_channel(&env).await;
    let mut dead = dead_letters(&ch).await;
    let mut orders = consume(&ch, "saga.participant.order").await;
    let id = start(&mut app.client, json!({"order_id": "P-1"})).await;
    let command = next(&mut orders).await;
    let command_id = command_id(&command);
    let before = settled_connections(&env, expected).await;

    // 1. An `outcome` of 200 KB: the parser's message quotes it whole.
    let huge_outcome =
        json!({"command_id": command_id, "outcome": "x".repeat(200_000)}).to_string();
    publish_raw(&ch, huge_outcome.as_bytes(), BasicProperties::default()).await;

    // 2. A header table just under the frame size: adding a reason would overflow the frame.
    let frame_max = conn.configuration().frame_max() as usize;
    // Frame header and end (8), content header fields (14), table length (4), and the entry's
    // name length, name, type and value length (1 + 3 + 1 + 4).
    let big = frame_max - (8 + 14 + 4 + 9) - 16;
    let mut headers = FieldTable::default();
    headers.insert("pad".into(), AMQPValue::LongString("p".repeat(big).into()));
    let no_command_id = json!({"outcome": "success"}).to_string();
    publish_raw(
        &ch,
        no_command_id.as_bytes(),
        BasicProperties::default().with_headers(headers),
    )
    .await;

    // 3. A valid reply after them is applied.
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id, "outcome": "success", "output": {"ref": "o-1"}}),
    )
    .await;

    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut dead).await;
        d.ack(BasicAckOptions::default()).await.unwrap();
        got.push(d);
    }
    let outcome = got
        .iter()
        .find(|d| d.data == huge_outcome.as_bytes())
        .expect("the 200 KB outcome is dead-lettered, body intact");
    let reason = header(outcome, "x-saga-error").unwrap();
    assert!(reason.len() <= MAX_REASON_BYTES, "{}", reason.len());
    assert!(reason.contains("unknown variant"), "{reason}");
    assert!(header(outcome, "x-saga-shortened").is_none());

    let padded = got
        .iter()
        .find(|d| d.data == no_command_id.as_bytes())
        .expect("the frame-sized header table is dead-lettered, body intact");
    let reason = header(padded, "x-saga-error").unwrap();
    assert!(reason.contains("missing field `command_id`"), "{reason}");
    assert!(
        header(padded, "pad").is_none(),
        "the oversized header is dropped"
    );
    let shortened = header(padded, "x-saga-shortened").expect("the copy says it was shortened");
    assert!(shortened.contains("pad"), "{shortened}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(&mut app, &id).await.attempts[0].outcome != pb::Outcome::Success as i32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "valid reply applied"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        connections(&env.name),
        before,
        "no connection was closed or reopened"
    );
    app.stop().await;
}

#[tokio::test]
async fn nulls_mean_absent_and_a_failure_without_a_reason_is_accepted() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let mut orders = consume(&ch, "saga.participant.order").await;
    let mut payments = consume(&ch, "saga.participant.payment").await;
    let id = start(&mut app.client, json!({"order_id": "P-2"})).await;

    // What a Java, C# or Go participant writes for unset optional fields.
    let d = next(&mut orders).await;
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id(&d), "outcome": "success",
               "output": null, "reason": null, "retryable": null}),
    )
    .await;
    let d = next(&mut payments).await;
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id(&d), "outcome": "failure", "retryable": null}),
    )
    .await;
    let d = next(&mut orders).await;
    let body: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(body["kind"], "compensation");
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id(&d), "outcome": "success", "reason": null}),
    )
    .await;
    let saga = wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::Compensated,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(saga.attempts[1].outcome, pb::Outcome::Failure as i32);
    assert_eq!(saga.attempts[1].reason, NO_REASON);
    assert!(saga.error.contains(NO_REASON), "{}", saga.error);
    app.stop().await;
}

const LATE: &str = r#"
name = "late"
version = 1

[defaults]
timeout = "300ms"
retry = { max_attempts = 2, initial_backoff = "20ms", max_backoff = "50ms" }

[compensation]
max_attempts = 1

[[steps]]
name = "reserve"
participant = "stock"
action = "reserve"
compensation = "release"
"#;

/// A participant that answers after its saga ended is still heard: the reply lands on its
/// attempt and in the history (`late_reply`), and `ReportStepResult.applied` says it changed
/// nothing. Also: the lifecycle events are those the contract lists, `resolved` included.
#[tokio::test]
async fn replies_after_the_saga_ended_are_recorded_and_lifecycle_events_match_the_docs() {
    let env = TestEnv::new();
    let dir = definitions_dir(&[("late.toml", LATE)]);
    let mut app = spawn_app(env.settings(dir.path())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    ch.queue_declare(
        "read-model".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "read-model".into(),
        "saga.events".into(),
        "late.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut events = consume(&ch, "read-model").await;
    let mut stock = consume(&ch, "saga.participant.stock").await;
    let id = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: "late".into(),
            input_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    // Both reserve attempts go unanswered; the release fails: the saga needs an operator.
    let first = next(&mut stock).await;
    let second = next(&mut stock).await;
    let release = next(&mut stock).await;
    let body: Value = serde_json::from_slice(&release.data).unwrap();
    assert_eq!(body["command"], "release");
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id(&release), "outcome": "failure", "reason": "locked"}),
    )
    .await;
    wait_for_status(
        &mut app.client,
        &id,
        pb::SagaStatus::NeedsOperator,
        Duration::from_secs(10),
    )
    .await;
    let (_, mut admin) = clients(app.addr, None).await;
    admin
        .resolve_saga(pb::RepairRequest {
            saga_id: id.clone(),
            reason: "released by hand".into(),
            step: String::new(),
        })
        .await
        .unwrap();

    // Now both reserve attempts are answered, over AMQP and over gRPC.
    reply(
        &ch,
        "saga.replies",
        json!({"command_id": command_id(&first), "outcome": "success", "output": {"n": 1}}),
    )
    .await;
    let report = pb::ReportStepResultRequest {
        command_id: command_id(&second),
        outcome: pb::Outcome::Success as i32,
        output_json: r#"{"n": 2}"#.into(),
        ..Default::default()
    };
    let applied = app
        .client
        .report_step_result(report.clone())
        .await
        .unwrap()
        .into_inner()
        .applied;
    assert!(!applied, "a report that changed nothing is not applied");
    let again = app.client.report_step_result(report).await.unwrap();
    assert!(!again.into_inner().applied);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let saga = loop {
        let saga = get(&mut app, &id).await;
        if saga.attempts[..2].iter().all(|a| a.replied_at.is_some()) {
            break saga;
        }
        assert!(tokio::time::Instant::now() < deadline, "{saga:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(saga.status, pb::SagaStatus::Resolved as i32);
    for (attempt, n) in saga.attempts[..2].iter().zip([1, 2]) {
        assert_eq!(attempt.outcome, pb::Outcome::Success as i32);
        assert_eq!(
            serde_json::from_str::<Value>(&attempt.output_json).unwrap(),
            json!({"n": n})
        );
    }
    let after_resolved: Vec<_> = history_kinds(&saga)
        .into_iter()
        .skip_while(|k| k != "saga_resolved")
        .collect();
    assert_eq!(
        after_resolved,
        ["saga_resolved", "late_reply", "late_reply"]
    );

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let d = next(&mut events).await;
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(
            d.routing_key.as_str(),
            format!("late.{}", body["event"].as_str().unwrap())
        );
        seen.push(body["event"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["started", "needs_operator", "resolved"]);
    app.stop().await;
}

#[tokio::test]
async fn numbers_travel_exactly_and_too_deep_inputs_are_refused() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let (_conn, ch) = amqp_channel(&env).await;
    let mut orders = consume(&ch, "saga.participant.order").await;
    let mut payments = consume(&ch, "saga.participant.payment").await;
    let big = "123456789012345678901234567890";
    let fine = "1.00000000000000000001";
    let id = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: "order_fulfillment".into(),
            input_json: format!(r#"{{"amount": {big}, "rate": {fine}, "n": [-0.5, 7]}}"#),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    let d = next(&mut orders).await;
    let text = String::from_utf8(d.data.to_vec()).unwrap();
    assert!(
        text.contains(&format!(r#""amount":{big}"#)) && text.contains(&format!(r#""rate":{fine}"#)),
        "{text}"
    );
    // The reply's output is raw text too, so nothing on this side rounds it.
    let output = format!(r#"{{"total": {fine}, "cents": {big}}}"#);
    let body = format!(
        r#"{{"command_id": "{}", "outcome": "success", "output": {output}}}"#,
        command_id(&d)
    );
    publish_raw(&ch, body.as_bytes(), BasicProperties::default()).await;
    let d = next(&mut payments).await;
    let text = String::from_utf8(d.data.to_vec()).unwrap();
    assert!(
        text.contains(&format!(r#""total":{fine}"#)) && text.contains(&format!(r#""cents":{big}"#)),
        "{text}"
    );
    let saga = get(&mut app, &id).await;
    assert!(
        saga.input_json.contains(big) && saga.input_json.contains(fine),
        "{}",
        saga.input_json
    );
    assert!(
        saga.attempts[0].output_json.contains(fine) && saga.outputs_json.contains(big),
        "{saga:#?}"
    );

    // As deep as allowed is fine; one level deeper is refused up front.
    let nested = |depth: usize| {
        // The input object itself is one level.
        format!(
            r#"{{"a": {}1{}}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    };
    let start = |input: String| pb::StartSagaRequest {
        definition: "order_fulfillment".into(),
        input_json: input,
        ..Default::default()
    };
    app.client
        .start_saga(start(nested(MAX_JSON_DEPTH)))
        .await
        .unwrap();
    let e = app
        .client
        .start_saga(start(nested(MAX_JSON_DEPTH + 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("deeper"), "{}", e.message());
    app.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_with_a_different_request_is_already_exists() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let request = |input: &str| pb::StartSagaRequest {
        definition: "order_fulfillment".into(),
        input_json: input.into(),
        idempotency_key: "order-K-1".into(),
    };
    let first = app
        .client
        .start_saga(request(r#"{"order_id": "K-1", "amount_cents": 100}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    // The same input, spelled differently: a retry.
    let retry = app
        .client
        .start_saga(request(r#"{"amount_cents": 1.00e2, "order_id": "K-1"}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retry.saga_id.as_str(), retry.created),
        (first.saga_id.as_str(), false)
    );
    let e = app
        .client
        .start_saga(request(r#"{"order_id": "K-1", "amount_cents": 999}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&first.saga_id), "{}", e.message());
    app.stop().await;
}

#[tokio::test]
async fn oversized_fields_are_quoted_only_in_part() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let long = "z".repeat(500_000);
    let e = app
        .client
        .get_saga(pb::GetSagaRequest {
            saga_id: long.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().len() <= MAX_REASON_BYTES,
        "{}",
        e.message().len()
    );
    let e = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: long.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().len() <= MAX_REASON_BYTES,
        "{}",
        e.message().len()
    );
    // The JSON parser quotes an unknown token whole.
    let e = app
        .client
        .start_saga(pb::StartSagaRequest {
            definition: "order_fulfillment".into(),
            input_json: format!(r#"{{"a": "\{}"}}"#, "q".repeat(200_000)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().len() <= MAX_REASON_BYTES,
        "{}",
        e.message().len()
    );
    app.stop().await;
}

#[tokio::test]
async fn server_reflection_answers_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1: not a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"saga.v1.SagaService".to_string()),
        "{names:?}"
    );

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha: not a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"saga.v1.AdminService".to_string()),
        "{names:?}"
    );
    app.stop().await;
}

/// A hand-built gRPC frame whose message is not protobuf: the caller's fault, so
/// INVALID_ARGUMENT, not INTERNAL.
#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    use tonic::codegen::{Body as _, Bytes, Service, http};
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Field 1 (definition, a string) claims 100 bytes and has 2.
    let message = [0x0a, 100, b'o', b'r'];
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/saga.v1.SagaService/StartSaga", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(frame),
        )))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let response = channel.call(request).await.unwrap();
    let (parts, mut body) = response.into_parts();
    // A trailers-only answer has the status in the headers, else it is in the trailers.
    let mut status = parts.headers.get("grpc-status").cloned();
    while status.is_none() {
        let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        else {
            break;
        };
        if let Ok(trailers) = frame.unwrap().into_trailers() {
            status = trailers.get("grpc-status").cloned();
        }
    }
    assert_eq!(
        status.expect("a grpc-status").to_str().unwrap(),
        (Code::InvalidArgument as i32).to_string()
    );
    app.stop().await;
}
