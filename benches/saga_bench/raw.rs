//! Raw limits of the servers on this machine: durable PostgreSQL commits and confirmed
//! persistent AMQP round trips per second.

use super::*;

#[derive(Debug, Clone, Default)]
pub(crate) struct RawLimits {
    pub(crate) rabbit_rt_per_s: f64,
    /// With one round trip in flight: 1 / its latency.
    pub(crate) rabbit_rt_per_s_serial: f64,
    /// (connections, commits per second)
    pub(crate) pg_commits: Vec<(usize, f64)>,
    pub(crate) synchronous_commit: String,
    pub(crate) fsync: String,
}

impl RawLimits {
    pub(crate) fn pg_best(&self) -> f64 {
        self.pg_commits.iter().map(|(_, c)| *c).fold(0.0, f64::max)
    }

    /// Sagas per second the pipeline could carry if sagad added nothing: the tighter of the
    /// broker bound (one confirmed round trip per command) and the database bound (one durable
    /// commit per sagad transition and per participant command).
    pub(crate) fn pipeline_limit(&self, v: Variant) -> f64 {
        (self.rabbit_rt_per_s / v.commands()).min(self.pg_best() / v.commits())
    }

    /// A rough floor for one saga alone, in ms: its commands' round trips and its commits one
    /// after the other, each at the latency measured with nothing else in flight.
    pub(crate) fn serial_floor_ms(&self, v: Variant) -> Option<f64> {
        let commit = self.pg_commits.iter().find(|(c, _)| *c == 1)?.1;
        if commit <= 0.0 || self.rabbit_rt_per_s_serial <= 0.0 {
            return None;
        }
        Some(1000.0 * v.commands() / self.rabbit_rt_per_s_serial + 1000.0 * v.commits() / commit)
    }
}

/// Durable single-row commits per second: `connections` tasks, each BEGIN; INSERT; COMMIT.
pub(crate) async fn pg_commit_probe(
    url: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32)
        .min_connections(connections as u32)
        .connect(url)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS bench_commits (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id uuid NOT NULL,
            payload jsonb NOT NULL,
            at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let warm = Duration::from_millis((duration.as_millis() as u64 / 5).clamp(100, 1000));
    let start = Instant::now() + warm;
    let end = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let pool = pool.clone();
        tasks.spawn(async move {
            let payload = json!({"order_ref": "ord-0123abcd", "authorization": "auth-0123abcd"});
            let mut n = 0u64;
            loop {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_commits (saga_id, payload) VALUES ($1, $2)")
                    .bind(Uuid::now_v7())
                    .bind(&payload)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= start {
                    n += 1;
                }
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n??;
    }
    pool.close().await;
    Ok(total as f64 / duration.as_secs_f64())
}

/// Confirmed persistent round trips per second through durable queues, the way a command
/// travels: publish with confirm → consume with manual ack → publish the reply with confirm →
/// consume the reply with manual ack. `in_flight` round trips at a time.
pub(crate) async fn rabbit_rt_probe(
    amqp_url: &str,
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    const REQUESTS: &str = "bench.requests";
    const REPLIES: &str = "bench.replies";
    let prefetch = in_flight.clamp(1, u16::MAX as usize) as u16;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // The orchestrator's side (like sagad: relay publishes, reply consumer acks).
    let orch = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    // The participant's side (like saga-demo).
    let part = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let setup = orch.create_channel().await?;
    for q in [REQUESTS, REPLIES] {
        setup
            .queue_declare(q.into(), durable, FieldTable::default())
            .await?;
    }

    // Participant: consume requests, publish the reply with confirm, then ack the request.
    let part_pub = part.create_channel().await?;
    part_pub
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let part_sub = part.create_channel().await?;
    part_sub
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut requests = part_sub
        .basic_consume(
            REQUESTS.into(),
            "bench-participant".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let participant = tokio::spawn(async move {
        while let Some(Ok(delivery)) = requests.next().await {
            let publisher = part_pub.clone();
            tokio::spawn(async move {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(contract::JSON.into())
                    .with_correlation_id(
                        delivery
                            .properties
                            .correlation_id()
                            .clone()
                            .unwrap_or_default(),
                    );
                let body = br#"{"command_id":"0190f5a4-6a5e-7d3c-9a0e-1b2c3d4e5f60","outcome":"success","output":{"authorization":"auth-0123abcd"}}"#;
                let confirmed = async {
                    publisher
                        .basic_publish(
                            "".into(),
                            REPLIES.into(),
                            BasicPublishOptions::default(),
                            body,
                            props,
                        )
                        .await?
                        .await
                }
                .await;
                if confirmed.is_ok() {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            });
        }
    });

    // Orchestrator: the reply consumer completes the waiting round trip, then acks.
    let waiters: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
    let orch_sub = orch.create_channel().await?;
    orch_sub
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut replies = orch_sub
        .basic_consume(
            REPLIES.into(),
            "bench-orchestrator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let reply_waiters = waiters.clone();
    let consumer = tokio::spawn(async move {
        while let Some(Ok(delivery)) = replies.next().await {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            let id = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            if let Some(tx) = reply_waiters.lock().unwrap().remove(&id) {
                let _ = tx.send(());
            }
        }
    });
    let orch_pub = orch.create_channel().await?;
    orch_pub
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let command_body = vec![b'x'; 600]; // about the size of a command body
    let warm = Duration::from_millis((duration.as_millis() as u64 / 5).clamp(100, 1000));
    let start = Instant::now() + warm;
    let end = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let publisher = orch_pub.clone();
        let waiters = waiters.clone();
        let body = command_body.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            loop {
                let id = Uuid::now_v7().to_string();
                let (tx, rx) = oneshot::channel();
                waiters.lock().unwrap().insert(id.clone(), tx);
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(contract::JSON.into())
                    .with_message_id(id.as_str().into())
                    .with_correlation_id(id.as_str().into())
                    .with_reply_to(REPLIES.into());
                let confirm = publisher
                    .basic_publish(
                        "".into(),
                        REQUESTS.into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await?
                    .await?;
                if !confirm.is_ack() {
                    bail!("the broker nacked a probe message");
                }
                tokio::time::timeout(Duration::from_secs(30), rx)
                    .await
                    .context("a probe reply did not come back within 30s")??;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= start {
                    n += 1;
                }
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n??;
    }
    participant.abort();
    consumer.abort();
    let _ = orch.close(200, "done".into()).await;
    let _ = part.close(200, "done".into()).await;
    Ok(total as f64 / duration.as_secs_f64())
}

pub(crate) async fn raw_limits(ctx: &Ctx) -> anyhow::Result<RawLimits> {
    let name = format!("saga_bench_{}_raw", ctx.run_id);
    eprintln!("== raw limits: database and vhost {name}");
    let env = TestEnv::create(
        &name,
        Options {
            template: None,
            demo_database: true,
            keep: ctx.args.keep_env,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let d = ctx.args.raw_duration;
    let mut raw = RawLimits::default();
    {
        let mut conn = PgConnection::connect(&env.database_url()).await?;
        raw.synchronous_commit = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut conn)
            .await?;
        raw.fsync = sqlx::query_scalar("SHOW fsync")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await?;
    }
    eprintln!(
        "   RabbitMQ: confirmed persistent round trips, {} in flight, {d:?}",
        ctx.args.in_flight
    );
    raw.rabbit_rt_per_s = rabbit_rt_probe(&env.amqp_url(), ctx.args.in_flight, d).await?;
    eprintln!("   RabbitMQ: confirmed persistent round trips, 1 in flight, {d:?}");
    raw.rabbit_rt_per_s_serial = rabbit_rt_probe(&env.amqp_url(), 1, d).await?;
    let mut sizes = vec![1, 16, ctx.args.in_flight.max(1)];
    sizes.sort();
    sizes.dedup();
    for c in sizes {
        eprintln!("   PostgreSQL: INSERT+COMMIT, {c} connections, {d:?}");
        let rate = pg_commit_probe(&env.database_url(), c, d).await?;
        raw.pg_commits.push((c, rate));
    }
    drop(env);
    Ok(raw)
}
