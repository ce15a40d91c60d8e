//! Sagas end to end: sagad, the demo participants, PostgreSQL and RabbitMQ, all real.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use saga::proto::v1 as pb;
use serde_json::{Value, json};

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(20);

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn step_kinds(saga: &pb::Saga) -> Vec<(String, &'static str)> {
    attempts(saga)
}

fn pairs(list: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
    list.iter().map(|(s, k)| (s.to_string(), *k)).collect()
}

#[tokio::test]
async fn a_saga_completes_with_all_four_steps_in_order_and_shows_its_timeline() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});
    let id = start(
        &mut app.client,
        json!({"order_id": "A-1", "amount_cents": 4200}),
    )
    .await;
    let saga = wait_for_status(&mut app.client, &id, pb::SagaStatus::Completed, WITHIN).await;

    assert_eq!(
        step_kinds(&saga),
        pairs(&[
            ("create_order", "action"),
            ("authorize_payment", "action"),
            ("schedule_delivery", "action"),
            ("approve_order", "action"),
        ])
    );
    assert_eq!(
        history_kinds(&saga),
        [
            "saga_started",
            "command_sent",
            "step_succeeded",
            "command_sent",
            "step_succeeded",
            "command_sent",
            "step_succeeded",
            "command_sent",
            "step_succeeded",
            "saga_completed"
        ]
    );
    // Each attempt has its times and outcome; each step's output is in the saga's outputs.
    for a in &saga.attempts {
        assert_eq!(a.outcome, pb::Outcome::Success as i32);
        let (sent, replied) = (a.sent_at.unwrap(), a.replied_at.unwrap());
        assert!((replied.seconds, replied.nanos) >= (sent.seconds, sent.nanos));
        assert!(!a.command_id.is_empty());
    }
    let outputs: Value = serde_json::from_str(&saga.outputs_json).unwrap();
    for step in [
        "create_order",
        "authorize_payment",
        "schedule_delivery",
        "approve_order",
    ] {
        assert!(
            outputs[step].is_object(),
            "{step} output missing in {outputs}"
        );
    }
    assert_eq!(saga.current_step, "");
    assert_eq!(saga.error, "");
    assert_eq!(
        serde_json::from_str::<Value>(&saga.input_json).unwrap(),
        json!({"order_id": "A-1", "amount_cents": 4200})
    );
    let pool = env.pool().await;
    assert_eq!(
        effects(&pool, &id).await,
        map(&[
            ("order", "approved"),
            ("payment", "authorized"),
            ("delivery", "scheduled")
        ])
    );
    demo.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_declined_payment_cancels_the_order_and_the_saga_ends_compensated() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});
    let id = start(
        &mut app.client,
        json!({"order_id": "A-2", "fail_at": "authorize_payment"}),
    )
    .await;
    let saga = wait_for_status(&mut app.client, &id, pb::SagaStatus::Compensated, WITHIN).await;
    assert_eq!(
        step_kinds(&saga),
        pairs(&[
            ("create_order", "action"),
            ("authorize_payment", "action"),
            ("create_order", "compensation")
        ])
    );
    assert!(saga.error.contains("authorize_payment"), "{}", saga.error);
    let failed = &saga.attempts[1];
    assert_eq!(failed.outcome, pb::Outcome::Failure as i32);
    assert!(!failed.reason.is_empty());
    assert_eq!(
        effects(&env.pool().await, &id).await,
        map(&[("order", "cancelled")])
    );
    demo.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_failed_delivery_refunds_the_payment_then_cancels_the_order() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});
    let id = start(
        &mut app.client,
        json!({"order_id": "A-3", "fail_at": ["schedule_delivery"]}),
    )
    .await;
    let saga = wait_for_status(&mut app.client, &id, pb::SagaStatus::Compensated, WITHIN).await;
    // Delivery failed, so it has nothing to undo: no cancel_delivery. Refund before cancel.
    assert_eq!(
        step_kinds(&saga),
        pairs(&[
            ("create_order", "action"),
            ("authorize_payment", "action"),
            ("schedule_delivery", "action"),
            ("authorize_payment", "compensation"),
            ("create_order", "compensation"),
        ])
    );
    let kinds = history_kinds(&saga);
    let refunded = kinds.iter().position(|k| k == "step_compensated").unwrap();
    assert_eq!(saga.history[refunded].step, "authorize_payment");
    assert_eq!(kinds.last().unwrap(), "saga_compensated");
    assert_eq!(
        effects(&env.pool().await, &id).await,
        map(&[("order", "cancelled"), ("payment", "refunded")])
    );
    demo.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_batch_of_mixed_sagas_all_end_and_lifecycle_events_arrive_once_in_order() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});

    let conn = lapin::Connection::connect(&env.amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
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
        "order_fulfillment.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut events = ch
        .basic_consume(
            "read-model".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let fail_at = ["", "authorize_payment", "schedule_delivery", "create_order"];
    let mut expected = BTreeMap::new();
    for i in 0..40 {
        let f = fail_at[i % fail_at.len()];
        let id = start(
            &mut app.client,
            json!({"order_id": format!("B-{i}"), "fail_at": f}),
        )
        .await;
        expected.insert(
            id,
            if f.is_empty() {
                "completed"
            } else {
                "compensated"
            },
        );
    }
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let collect = async {
        while seen.values().map(Vec::len).sum::<usize>() < 2 * expected.len() {
            let d = events.next().await.unwrap().unwrap();
            let body: Value = serde_json::from_slice(&d.data).unwrap();
            assert_eq!(
                d.routing_key.as_str(),
                format!("order_fulfillment.{}", body["event"].as_str().unwrap())
            );
            seen.entry(body["saga_id"].as_str().unwrap().to_string())
                .or_default()
                .push(body["event"].as_str().unwrap().to_string());
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("every saga ends");
    for (id, end) in &expected {
        assert_eq!(seen[id], ["started", end], "saga {id}");
        let status = if *end == "completed" {
            pb::SagaStatus::Completed
        } else {
            pb::SagaStatus::Compensated
        };
        let saga = wait_for_status(&mut app.client, id, status, WITHIN).await;
        // Net effects: a compensated saga leaves nothing live behind.
        let fx = effects(&env.pool().await, id).await;
        if *end == "compensated" {
            assert!(
                fx.values().all(|s| s == "cancelled" || s == "refunded"),
                "{id}: {fx:?} / {saga:?}"
            );
        } else {
            assert_eq!(
                fx,
                map(&[
                    ("order", "approved"),
                    ("payment", "authorized"),
                    ("delivery", "scheduled")
                ])
            );
        }
    }
    // Nothing more than one event per transition, even after a pause.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err()
    );
    demo.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn sagas_in_flight_survive_a_restart_of_sagad() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    // Participants are slow, so the sagas are mid-way when sagad stops.
    let demo = spawn_demo(&env, |c| c.latency = Duration::from_millis(150));
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(start(&mut app.client, json!({"order_id": format!("R-{i}")})).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.stop().await;
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas WHERE status = 'running'")
        .fetch_one(&env.pool().await)
        .await
        .unwrap();
    assert!(running > 0, "the restart must interrupt sagas in flight");

    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    for id in &ids {
        wait_for_status(&mut app.client, id, pb::SagaStatus::Completed, WITHIN).await;
    }
    // Each command was applied once by the participants, whatever was redelivered.
    let applied: Vec<(String, i64)> = sqlx::query_as(
        "SELECT command, count(*) FROM demo_processed_commands GROUP BY command ORDER BY command",
    )
    .fetch_all(&env.pool().await)
    .await
    .unwrap();
    assert_eq!(
        applied,
        [
            ("approve_order", 10),
            ("authorize_payment", 10),
            ("create_order", 10),
            ("schedule_delivery", 10)
        ]
        .map(|(c, n)| (c.to_string(), n))
    );
    demo.stop().await;
    app.stop().await;
}

/// A brand-new database has no statistics, and the plans a connection caches then would scan
/// whole tables for the rest of its life. sagad's connections, pooled or the relay's own, must
/// plan the reply batch's saga update on the primary key even on empty tables.
#[tokio::test]
async fn sagad_connections_plan_on_indexes_even_before_any_statistics() {
    use sqlx::Connection as _;

    let env = TestEnv::new();
    let store = saga::store::Store::connect(&env.database_url(), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();

    let mut pooled = store.pool().acquire().await.unwrap();
    let mut dedicated = store.dedicated_connection().await.unwrap();
    for conn in [&mut *pooled, &mut dedicated] {
        let plan = cached_plan_of_saga_update(conn).await;
        assert!(plan.contains("Index Scan using sagas_pkey"), "{plan}");
        assert!(!plan.contains("Seq Scan on sagas"), "{plan}");
        let jit: String = sqlx::query_scalar("SHOW jit")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(jit, "off");
    }

    // Without the settings the same table gets the plan guarded against above, so those
    // assertions do say something about sagad's connections.
    let mut plain = sqlx::PgConnection::connect(&env.database_url())
        .await
        .unwrap();
    let plan = cached_plan_of_saga_update(&mut plain).await;
    assert!(plan.contains("Seq Scan on sagas"), "{plan}");
}

/// The generic plan (the one a connection caches) of the reply batch's saga update.
async fn cached_plan_of_saga_update(conn: &mut sqlx::PgConnection) -> String {
    sqlx::raw_sql(
        "SET plan_cache_mode = force_generic_plan; \
         PREPARE saga_update (uuid[], text[]) AS UPDATE sagas s SET status = u.status \
           FROM UNNEST($1, $2) AS u(id, status) WHERE s.id = u.id",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE saga_update (NULL, NULL)")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    plan.join("\n")
}

/// The README's food delivery runs, on the demo participants: with a coupon every branch runs and
/// the saga completes; with the shop slow and the card declined, the payment fails while the
/// shop's step is still in flight, the shop's late acceptance is undone, then the order.
#[tokio::test]
async fn food_delivery_runs_its_branches_and_undoes_a_sibling_that_finished_after_a_failure() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});
    let grpc = app.client.clone();
    let start_food = |input: Value| {
        let mut client = grpc.clone();
        async move {
            client
                .start_saga(pb::StartSagaRequest {
                    definition: "food_delivery".into(),
                    input_json: input.to_string(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .saga_id
        }
    };
    let order = json!({"customer_id": "c-1", "shop_id": "s-9", "items": [{"sku": "bibimbap", "qty": 2}],
                       "amount_cents": 12900, "address": "1 Main St", "coupon": "WELCOME"});
    let id = start_food(order).await;
    let saga = wait_for_status(&mut app.client, &id, pb::SagaStatus::Completed, WITHIN).await;
    assert!(
        saga.steps.iter().all(|s| s.state == "succeeded"),
        "{saga:#?}"
    );
    let pool = env.pool().await;
    assert_eq!(
        effects(&pool, &id).await,
        map(&[
            ("coupon", "redeemed"),
            ("delivery", "dispatched"),
            ("notification", "sent"),
            ("order", "created"),
            ("payment", "authorized"),
            ("shop", "accepted"),
        ])
    );

    let declined = json!({"customer_id": "c-2", "shop_id": "slow-9", "items": [],
                          "amount_cents": 2_000_000, "address": "1 Main St"});
    let id = start_food(declined).await;
    let saga = wait_for_status(&mut app.client, &id, pb::SagaStatus::Compensated, WITHIN).await;
    assert!(saga.error.contains("card declined"), "{}", saga.error);
    let states: Vec<(&str, &str)> = saga
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("create_order", "compensated"),
            ("authorize_payment", "failed"),
            ("shop_accepts", "compensated"),
            ("redeem_coupon", "skipped"),
            ("dispatch_rider", "pending"),
            ("notify_customer", "pending"),
        ]
    );
    // The payment failed first; the shop answered later and was undone before the order.
    let kinds = step_kinds(&saga);
    let at = |step: &str, kind: &str| kinds.iter().position(|(s, k)| s == step && *k == kind);
    assert!(at("shop_accepts", "compensation") < at("create_order", "compensation"));
    let failed = saga.history.iter().position(|e| e.kind == "step_failed");
    let accepted = saga
        .history
        .iter()
        .position(|e| e.kind == "step_succeeded" && e.step == "shop_accepts");
    assert!(
        failed < accepted,
        "the shop was still in flight when the payment failed"
    );
    assert_eq!(
        effects(&pool, &id).await,
        map(&[("order", "cancelled"), ("shop", "rejected")])
    );
    demo.stop().await;
    app.stop().await;
}

/// The bench's no-op participants: every command answered with a success at once, through the
/// same confirmed replies, and nothing written to the participants' database.
#[tokio::test]
async fn noop_participants_complete_sagas_without_database_work() {
    let env = TestEnv::new();
    let mut app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |c| c.noop = true);
    let id = start(&mut app.client, json!({"order_id": "N-1"})).await;
    let saga = wait_for_status(&mut app.client, &id, pb::SagaStatus::Completed, WITHIN).await;
    assert_eq!(saga.attempts.len(), 4);
    let pool = env.pool().await;
    assert!(effects(&pool, &id).await.is_empty());
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM demo_processed_commands")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0);
    demo.stop().await;
    app.stop().await;
}
