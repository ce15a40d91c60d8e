//! Scenario g: a flood of malformed replies mixed with the good ones.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use saga::contract;
use serde_json::json;
use uuid::Uuid;

use saga_testkit::fault::*;
use saga_testkit::{TestEnv, repo_sagas};

/// Bad replies published during the load.
const BAD: usize = 300;

/// The i-th bad reply: every way a reply can be refused, some naming real command ids (of sagas
/// in flight) so that only the parsing stands between them and a saga.
fn bad_reply(i: usize, real: Uuid) -> Vec<u8> {
    match i % 8 {
        0 => b"not json at all".to_vec(),
        1 => b"{}".to_vec(),
        2 => json!({"command_id": real, "outcome": "maybe"})
            .to_string()
            .into_bytes(),
        3 => json!({"command_id": 42, "outcome": "success"})
            .to_string()
            .into_bytes(),
        // Well-formed, but no saga sent this command.
        4 => json!({"command_id": Uuid::new_v4(), "outcome": "success"})
            .to_string()
            .into_bytes(),
        // A reason must be text.
        5 => json!({"command_id": real, "outcome": "failure", "reason": ["x"]})
            .to_string()
            .into_bytes(),
        6 => json!({"command_id": real, "outcome": "failure", "reason": "x", "retryable": "yes"})
            .to_string()
            .into_bytes(),
        _ => b"[1, 2, 3]".to_vec(),
    }
}

/// Passive declare: the number of ready messages in `queue`.
async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_replies_is_dead_lettered_and_good_sagas_finish() {
    let env = TestEnv::new();
    let pool = env.pool().await;
    let sagad = Sagad::spawn(&env, &repo_sagas(), "1").await;
    let _demo = DemoProcess::spawn(&env, "1", &[]);
    let conn = Connection::connect(&env.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let endpoints = Endpoints::new(&[&sagad]);
    let load = Load::start(&endpoints, SAGAS);
    load.wait_in_flight(&pool, 10, 5).await;
    let fault_start = Instant::now();

    // The flood, spread over the load: published persistent, confirmed one by one.
    let mut sent: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut real: Vec<Uuid> = Vec::new();
    for i in 0..BAD {
        if i % 25 == 0 {
            real = sqlx::query_scalar(
                "SELECT command_id FROM step_attempts ORDER BY sent_at DESC LIMIT 25",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
        }
        let body = bad_reply(i, real[i % real.len()]);
        let confirm = channel
            .basic_publish(
                "".into(),
                contract::REPLIES_QUEUE.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(contract::JSON.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        *sent.entry(body).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let m = load.finish_and_check(&pool, fault_start).await;

    // Every bad reply, and nothing else, reaches the dead-letter queue, with the reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (dead, pending) = (
            ready(&channel, contract::DEAD_LETTER_QUEUE).await,
            ready(&channel, contract::REPLIES_QUEUE).await,
        );
        if dead as usize >= BAD && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dead} of {BAD} bad replies dead-lettered, {pending} replies still queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut dead = 0;
    while let Some(d) = channel
        .basic_get(
            contract::DEAD_LETTER_QUEUE.into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
    {
        dead += 1;
        let headers = d.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        let reason = header(contract::H_ERROR)
            .unwrap_or_else(|| panic!("dead letter without {}: {:?}", contract::H_ERROR, d.data));
        assert_eq!(
            header("x-original-queue").as_deref(),
            Some(contract::REPLIES_QUEUE)
        );
        // The reason without its details (positions, ids), e.g. "invalid reply: missing field
        // `outcome`" or "unknown command id".
        let class = match reason.split(" at line").next().unwrap() {
            r if r.starts_with("unknown command id") => "unknown command id".to_string(),
            r => r.chars().take(70).collect(),
        };
        *reasons.entry(class).or_default() += 1;
        match sent.get_mut(&d.data) {
            Some(n) if *n > 0 => *n -= 1,
            _ => panic!(
                "dead-lettered a message that is not one of the bad replies: {}",
                String::from_utf8_lossy(&d.data)
            ),
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(dead, BAD, "dead letters");
    assert!(sent.values().all(|n| *n == 0));
    m.print(&format!(
        "g: {BAD} malformed replies among the good ones, all {dead} dead-lettered with {}",
        contract::H_ERROR
    ));
    eprintln!("[fault] g: dead-letter reasons: {reasons:#?}");
}
