//! The demo participants against the real RabbitMQ and PostgreSQL, each run isolated in a fresh
//! vhost and a fresh database (both removed afterwards, also when the test fails).

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use saga::contract::{self, CommandBody, ReplyBody, ReplyOutcome};
use saga_demo::{self as demo, DemoConfig};
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::TestEnv;

const WAIT: Duration = Duration::from_secs(10);

/// Plays the orchestrator: publishes commands and reads replies.
struct Orchestrator {
    channel: Channel,
    replies: Consumer,
}

impl Orchestrator {
    fn command(saga_id: Uuid, step: &str, kind: &str, command: &str, input: Value) -> CommandBody {
        CommandBody {
            command_id: Uuid::now_v7(),
            saga_id,
            definition: "order_fulfillment".into(),
            definition_version: 1,
            step: step.into(),
            kind: kind.into(),
            command: command.into(),
            attempt: 1,
            input,
            outputs: json!({}),
        }
    }

    /// Publishes as `sagad` does (properties and headers per the contract), awaiting the confirm.
    async fn publish(&self, participant: &str, command: &CommandBody) {
        let mut headers = FieldTable::default();
        for (name, value) in [
            (contract::H_SAGA_ID, command.saga_id.to_string()),
            (contract::H_DEFINITION, command.definition.clone()),
            (contract::H_STEP, command.step.clone()),
            (contract::H_KIND, command.kind.clone()),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        headers.insert(
            contract::H_ATTEMPT.into(),
            AMQPValue::LongInt(command.attempt as i32),
        );
        let properties = BasicProperties::default()
            .with_message_id(command.command_id.to_string().into())
            .with_correlation_id(command.saga_id.to_string().into())
            .with_content_type(contract::JSON.into())
            .with_delivery_mode(2)
            .with_reply_to(contract::REPLIES_QUEUE.into())
            .with_type(command.command.as_str().into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        let body = serde_json::to_vec(command).unwrap();
        self.publish_raw(participant, &body, properties).await;
    }

    async fn publish_raw(&self, participant: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                contract::COMMANDS_EXCHANGE.into(),
                participant.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }

    /// The next reply, with its correlation id, or a failure after [`WAIT`].
    async fn reply(&mut self) -> (ReplyBody, String) {
        let delivery = tokio::time::timeout(WAIT, self.replies.next())
            .await
            .expect("no reply within 10s")
            .expect("reply consumer ended")
            .expect("reply delivery");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let props = &delivery.properties;
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            contract::JSON
        );
        assert_eq!(*props.delivery_mode(), Some(2));
        let reply = ReplyBody::parse(&delivery.data).expect("a valid reply");
        let correlation = props.correlation_id().as_ref().unwrap().to_string();
        (reply, correlation)
    }

    /// Publishes `command` and returns its reply, checking it answers that command.
    async fn call(&mut self, participant: &str, command: &CommandBody) -> ReplyBody {
        self.publish(participant, command).await;
        let (reply, correlation) = self.reply().await;
        assert_eq!(reply.command_id, command.command_id);
        assert_eq!(correlation, command.command_id.to_string());
        reply
    }

    async fn no_more_replies(&mut self) {
        if let Ok(extra) =
            tokio::time::timeout(Duration::from_millis(300), self.replies.next()).await
        {
            panic!("unexpected reply: {extra:?}");
        }
    }
}

async fn effect(db: &PgPool, saga_id: Uuid, resource: &str) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM demo_effects WHERE saga_id = $1 AND resource = $2")
        .bind(saga_id)
        .bind(resource)
        .fetch_optional(db)
        .await
        .unwrap()
}

async fn count(db: &PgPool, sql: &'static str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_participants_follow_the_contract() {
    let env = TestEnv::new();

    let connection = Connection::connect(&env.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    contract::declare_topology(&channel, demo::PARTICIPANTS)
        .await
        .expect("declare the topology");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let replies = channel
        .basic_consume(
            contract::REPLIES_QUEUE.into(),
            "test-orchestrator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut sagad = Orchestrator { channel, replies };

    let shutdown = CancellationToken::new();
    let participants = tokio::spawn(demo::run(
        DemoConfig {
            amqp_url: env.amqp_url(),
            database_url: env.database_url(),
            latency: Duration::from_millis(1),
            ..DemoConfig::default()
        },
        shutdown.clone(),
    ));
    let db = PgPool::connect(&env.database_url()).await.unwrap();

    // An action succeeds, with output, and applies its effect.
    let saga = Uuid::now_v7();
    let create = Orchestrator::command(saga, "create_order", "action", "create_order", json!({}));
    let reply = sagad.call("order", &create).await;
    assert_eq!(reply.outcome, ReplyOutcome::Success);
    let id = saga.simple().to_string();
    assert_eq!(
        reply.output,
        json!({"order_id": format!("ord-{}", &id[20..]), "order_ref": format!("ord-{}", &id[..8])})
    );
    assert_eq!(effect(&db, saga, "order").await.as_deref(), Some("created"));

    // The food_delivery services run in the same process: a shop that is closed refuses the
    // order for good, and applies nothing; an open one accepts it.
    let closed = Orchestrator::command(
        saga,
        "shop_accepts",
        "action",
        "accept_order",
        json!({"order_id": "ord-1", "shop_id": "closed-3", "items": []}),
    );
    let reply = sagad.call("shop", &closed).await;
    assert_eq!(
        (reply.outcome, reply.reason.as_deref(), reply.retryable),
        (ReplyOutcome::Failure, Some("shop is closed"), false)
    );
    assert_eq!(effect(&db, saga, "shop").await, None);
    let open = Orchestrator::command(
        saga,
        "shop_accepts",
        "action",
        "accept_order",
        json!({"order_id": "ord-1", "shop_id": "s-3", "items": []}),
    );
    let reply = sagad.call("shop", &open).await;
    assert_eq!(reply.outcome, ReplyOutcome::Success, "{reply:?}");
    assert_eq!(effect(&db, saga, "shop").await.as_deref(), Some("accepted"));

    // The same command delivered twice: two identical replies, applied once.
    let pay = Orchestrator::command(
        saga,
        "authorize_payment",
        "action",
        "authorize_payment",
        json!({"amount_cents": 4200}),
    );
    sagad.publish("payment", &pay).await;
    sagad.publish("payment", &pay).await;
    let (first, c1) = sagad.reply().await;
    let (second, c2) = sagad.reply().await;
    assert_eq!(first, second);
    assert_eq!(
        (c1, c2),
        (pay.command_id.to_string(), pay.command_id.to_string())
    );
    assert_eq!(first.command_id, pay.command_id);
    assert_eq!(first.outcome, ReplyOutcome::Success);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM demo_processed_commands WHERE command_id = $1",
            pay.command_id
        )
        .await,
        1
    );
    // ... and the second delivery is counted as a recognised redelivery.
    assert_eq!(
        count(
            &db,
            "SELECT redeliveries::bigint FROM demo_processed_commands WHERE command_id = $1",
            pay.command_id
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM demo_effects WHERE saga_id = $1 AND resource = 'payment'",
            saga
        )
        .await,
        1
    );
    assert_eq!(
        effect(&db, saga, "payment").await.as_deref(),
        Some("authorized")
    );

    // A saga that asks to fail: a final failure with a reason, and no effect.
    let doomed = Uuid::now_v7();
    for (participant, input) in [
        ("order", json!({"fail_at": "create_order"})),
        (
            "payment",
            json!({"fail_at": ["schedule_delivery", "authorize_payment"]}),
        ),
    ] {
        let command = match participant {
            "order" => "create_order",
            _ => "authorize_payment",
        };
        let cmd = Orchestrator::command(doomed, command, "action", command, input);
        let reply = sagad.call(participant, &cmd).await;
        assert_eq!(reply.outcome, ReplyOutcome::Failure, "{reply:?}");
        assert!(!reply.retryable);
        assert!(
            reply.reason.as_deref().unwrap_or("").contains(command),
            "{reply:?}"
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM demo_effects WHERE saga_id = $1",
            doomed
        )
        .await,
        0
    );

    // A compensation whose action never applied succeeds, undoes nothing, and leaves a
    // tombstone so that the action, if it arrives late, is refused.
    let never = Uuid::now_v7();
    let refund = Orchestrator::command(
        never,
        "authorize_payment",
        "compensation",
        "refund_payment",
        json!({}),
    );
    let reply = sagad.call("payment", &refund).await;
    assert_eq!(reply.outcome, ReplyOutcome::Success, "{reply:?}");
    assert_eq!(reply.output, json!({"undone": false}));
    assert_eq!(
        effect(&db, never, "payment").await.as_deref(),
        Some("refunded")
    );
    let late = Orchestrator::command(
        never,
        "authorize_payment",
        "action",
        "authorize_payment",
        json!({}),
    );
    let reply = sagad.call("payment", &late).await;
    assert_eq!(reply.outcome, ReplyOutcome::Failure, "{reply:?}");
    assert!(
        reply
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("already compensated"),
        "{reply:?}"
    );
    assert_eq!(
        effect(&db, never, "payment").await.as_deref(),
        Some("refunded")
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM demo_processed_commands WHERE command_id = $1",
            refund.command_id
        )
        .await,
        1
    );

    // Compensating the order created above leaves it cancelled.
    let cancel = Orchestrator::command(
        saga,
        "create_order",
        "compensation",
        "cancel_order",
        json!({}),
    );
    let reply = sagad.call("order", &cancel).await;
    assert_eq!(reply.outcome, ReplyOutcome::Success, "{reply:?}");
    assert_eq!(
        effect(&db, saga, "order").await.as_deref(),
        Some("cancelled")
    );

    // An unknown command is a final failure saying so.
    let odd = Orchestrator::command(saga, "teleport", "action", "teleport_order", json!({}));
    let reply = sagad.call("order", &odd).await;
    assert_eq!(reply.outcome, ReplyOutcome::Failure);
    assert!(!reply.retryable);
    assert!(
        reply
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("unknown command")
    );

    // A malformed command is rejected to the dead-letter queue, unanswered.
    sagad
        .publish_raw(
            "delivery",
            b"not json",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    let mut dead = sagad
        .channel
        .basic_consume(
            contract::DEAD_LETTER_QUEUE.into(),
            "test-dead-letters".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let poison = tokio::time::timeout(WAIT, dead.next())
        .await
        .expect("no dead letter within 10s")
        .expect("dead-letter consumer ended")
        .expect("dead-letter delivery");
    assert_eq!(poison.data, b"not json");
    poison.ack(BasicAckOptions::default()).await.unwrap();
    sagad.no_more_replies().await;

    // Shutdown is graceful and prompt.
    shutdown.cancel();
    tokio::time::timeout(WAIT, participants)
        .await
        .expect("run did not stop within 10s")
        .expect("run panicked")
        .expect("run failed");

    db.close().await;
    connection.close(200, "done".into()).await.ok();
}

/// What the demo relies on for two concurrent deliveries of one new command: the second call of
/// `demo_handle` waits for the first one's commit, then fails on the primary key with nothing
/// applied, and calling it again answers with the first delivery's reply.
#[tokio::test]
async fn a_command_delivered_twice_at_once_is_applied_once_and_answered_alike() {
    let env = TestEnv::new();
    let db = PgPool::connect(&env.database_url()).await.unwrap();
    sqlx::raw_sql(demo::SCHEMA).execute(&db).await.unwrap();
    let (saga, command) = (Uuid::now_v7(), Uuid::now_v7());
    let call = move |reply: Value| {
        sqlx::query_as::<_, (Value, bool)>(
            "SELECT reply, duplicate FROM demo_handle($1, $2, 'payment', 'authorize_payment', \
             'action', 1, 'payment', 'authorized', false, ARRAY['cancelled', 'refunded'], $3, NULL)",
        )
        .bind(command)
        .bind(saga)
        .bind(reply)
    };
    let first = json!({"command_id": command, "outcome": "success", "output": {"n": 1}});
    let second = json!({"command_id": command, "outcome": "success", "output": {"n": 2}});

    let mut a = db.begin().await.unwrap();
    let (reply, duplicate) = call(first.clone()).fetch_one(&mut *a).await.unwrap();
    assert_eq!((reply, duplicate), (first.clone(), false));
    let racing = tokio::spawn({
        let db = db.clone();
        let second = second.clone();
        async move { call(second).fetch_one(&db).await }
    });
    // Commit only once the second call is really blocked behind the first.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE '%demo_handle%'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second call never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.commit().await.unwrap();
    let err = racing.await.unwrap().unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("23505"),
        "{err}"
    );
    let (reply, duplicate) = call(second).fetch_one(&db).await.unwrap();
    assert_eq!((reply, duplicate), (first, true));
    let (rows, redeliveries, effects): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(redeliveries), \
           (SELECT count(*) FROM demo_effects WHERE saga_id = $2) \
         FROM demo_processed_commands WHERE command_id = $1",
    )
    .bind(command)
    .bind(saga)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((rows, redeliveries, effects), (1, 1, 1));
}
