//! Observability: one trace across gRPC, the database and RabbitMQ; Prometheus metrics over
//! HTTP; health and readiness.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use saga::proto::v1 as pb;
use serde_json::json;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_completed_saga_is_one_trace_from_the_start_call_through_every_command_and_reply() {
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});
    // The caller's own span: the saga's trace must hang below it.
    let trace_id = TraceId::from_hex(&uuid::Uuid::new_v4().simple().to_string()).unwrap();
    let caller = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let mut req = tonic::Request::new(pb::StartSagaRequest {
        definition: "order_fulfillment".into(),
        input_json: json!({"order_id": "T-1"}).to_string(),
        idempotency_key: String::new(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller}-01").parse().unwrap(),
    );
    let mut client = app.client.clone();
    let id = client.start_saga(req).await.unwrap().into_inner().saga_id;
    wait_for_status(&mut client, &id, pb::SagaStatus::Completed, WITHIN).await;

    // The last reply's span ends just after the transition commits: poll for it.
    let deadline = tokio::time::Instant::now() + WITHIN;
    let spans = loop {
        let spans: Vec<_> = spans()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .collect();
        if spans
            .iter()
            .filter(|s| s.name == "process saga.replies")
            .count()
            == 4
        {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let by_id: HashMap<SpanId, &opentelemetry_sdk::trace::SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let parent_name = |s: &opentelemetry_sdk::trace::SpanData| {
        by_id.get(&s.parent_span_id).map(|p| p.name.to_string())
    };

    let start = named("saga.v1.SagaService/StartSaga");
    assert_eq!(start.len(), 1);
    assert_eq!(
        start[0].parent_span_id, caller,
        "the start call continues the caller's trace"
    );
    assert!(
        start[0]
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "rpc.system" && kv.value.as_str() == "grpc")
    );

    let publishes = named("publish saga.commands");
    assert_eq!(publishes.len(), 4, "one publish per command");
    for p in &publishes {
        assert_eq!(
            p.parent_span_id,
            start[0].span_context.span_id(),
            "commands are children of the start call"
        );
        assert!(
            p.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "messaging.system" && kv.value.as_str() == "rabbitmq")
        );
    }
    let mut handled = Vec::new();
    for participant in ["order", "payment", "delivery"] {
        for s in named(&format!("process saga.participant.{participant}")) {
            assert_eq!(
                parent_name(s).as_deref(),
                Some("publish saga.commands"),
                "participant work is a child of its command"
            );
            handled.push(s.span_context.span_id());
        }
    }
    assert_eq!(handled.len(), 4);
    for r in named("process saga.replies") {
        assert!(
            handled.contains(&r.parent_span_id),
            "each reply is a child of the participant's work"
        );
    }
    assert_eq!(
        named("publish saga.events").len(),
        2,
        "started and completed lifecycle events"
    );
    demo.stop().await;
    app.stop().await;
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_as_sagas_complete_and_compensate_and_readiness_reflects_the_servers() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let (code, body) = http_get(app.metrics_addr, "/readyz").await;
        if code == 200 {
            assert!(body.contains("\"database\":true"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(http_get(app.metrics_addr, "/healthz").await.0, 200);

    let demo = spawn_demo(&env, |_| {});
    let ok = start(&mut app.client, json!({})).await;
    let bad = start(&mut app.client, json!({"fail_at": "authorize_payment"})).await;
    wait_for_status(&mut app.client, &ok, pb::SagaStatus::Completed, WITHIN).await;
    wait_for_status(&mut app.client, &bad, pb::SagaStatus::Compensated, WITHIN).await;

    let (code, text) = http_get(app.metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    let d = ("definition", "order_fulfillment");
    assert_eq!(
        metric(
            &text,
            "saga_lifecycle_events_total",
            &[d, ("event", "started")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "saga_lifecycle_events_total",
            &[d, ("event", "completed")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "saga_lifecycle_events_total",
            &[d, ("event", "compensated")]
        ),
        1.0
    );
    let payment = [
        ("participant", "payment"),
        ("step", "authorize_payment"),
        ("kind", "action"),
    ];
    assert_eq!(
        metric(
            &text,
            "saga_step_duration_seconds_count",
            &[payment[0], payment[1], payment[2], ("outcome", "success")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "saga_step_duration_seconds_count",
            &[payment[0], payment[1], payment[2], ("outcome", "failure")]
        ),
        1.0
    );
    assert!(text.contains("saga_outbox_backlog"), "{text}");
    assert_eq!(
        metric(&text, "saga_circuit_state", &[("participant", "payment")]),
        0.0
    );
    assert_eq!(metric(&text, "saga_replies_dead_lettered_total", &[]), 0.0);
    demo.stop().await;
    app.stop().await;
}
