//! Scenarios: one variant under one load, in a fresh database and vhost, and its figures.

use super::*;

#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub(crate) label: String,
    pub(crate) variant: Variant,
    pub(crate) sagas: usize,
    pub(crate) in_flight: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) warmup: usize,
}

/// Where one step's time goes, from the timestamps the two sides store: sagad's
/// `step_attempts.sent_at` (the transition that sent the command; its commit comes after) and
/// `replied_at` (when sagad began applying the reply), and the demo's
/// `demo_processed_commands.applied_at` (when its transaction for the command began).
#[derive(Debug, Clone, Default)]
pub(crate) struct StepBreakdown {
    pub(crate) steps: usize,
    /// sent_at → applied_at: sagad's transition commit, outbox relay (NOTIFY, claim, publish,
    /// confirm), broker, delivery to the participant. (ms: p50, p90, p99)
    pub(crate) to_participant: [f64; 3],
    /// applied_at → replied_at: the participant's transaction and commit, its confirmed reply,
    /// broker, delivery to sagad's reply consumer.
    pub(crate) to_sagad: [f64; 3],
}

pub(crate) async fn step_breakdown(env: &TestEnv) -> anyhow::Result<StepBreakdown> {
    let mut saga_db = PgConnection::connect(&env.database_url()).await?;
    let sent: Vec<(Uuid, time::OffsetDateTime, time::OffsetDateTime)> = sqlx::query_as(
        "SELECT a.command_id, a.sent_at, a.replied_at FROM step_attempts a \
         JOIN sagas s ON s.id = a.saga_id \
         WHERE a.replied_at IS NOT NULL AND s.idempotency_key NOT LIKE '%-warmup-%' \
           AND s.idempotency_key NOT LIKE 'preload-%'",
    )
    .fetch_all(&mut saga_db)
    .await?;
    saga_db.close().await?;
    let mut demo_db = PgConnection::connect(&env.demo_database_url()).await?;
    let applied: HashMap<Uuid, time::OffsetDateTime> =
        sqlx::query_as::<_, (Uuid, time::OffsetDateTime)>(
            "SELECT command_id, applied_at FROM demo_processed_commands",
        )
        .fetch_all(&mut demo_db)
        .await?
        .into_iter()
        .collect();
    demo_db.close().await?;
    let mut out_h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut back_h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let us = |d: time::Duration| d.whole_microseconds().max(1) as u64;
    let mut steps = 0;
    for (id, sent_at, replied_at) in sent {
        if let Some(applied_at) = applied.get(&id) {
            out_h.saturating_record(us(*applied_at - sent_at));
            back_h.saturating_record(us(replied_at - *applied_at));
            steps += 1;
        }
    }
    let q = |h: &Histogram<u64>| {
        [0.5, 0.9, 0.99].map(|p| round(h.value_at_quantile(p) as f64 / 1000.0, 2))
    };
    Ok(StepBreakdown {
        steps,
        to_participant: q(&out_h),
        to_sagad: q(&back_h),
    })
}

/// Samples the outbox backlog (rows committed, not yet published and deleted by the relay)
/// every 100ms until stopped: one cheap query on its own connection. Returns (mean, max).
/// The count goes through the primary key index, as sagad's relay does: a sequential scan
/// would read every dead page the outbox accumulates until autovacuum, ten times a second.
pub(crate) fn sample_outbox(
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(f64, i64)> {
    tokio::spawn(async move {
        let Ok(mut conn) = PgConnection::connect(&url).await else {
            return (0.0, 0);
        };
        if sqlx::raw_sql("SET enable_seqscan = off; SET jit = off")
            .execute(&mut conn)
            .await
            .is_err()
        {
            return (0.0, 0);
        }
        let (mut sum, mut n, mut max) = (0i64, 0i64, 0i64);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Ok(c) = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                .fetch_one(&mut conn)
                .await
            {
                sum += c;
                n += 1;
                max = max.max(c);
            }
        }
        let _ = conn.close().await;
        (sum as f64 / n.max(1) as f64, max)
    })
}

pub(crate) struct ScenarioResult {
    pub(crate) scenario: Scenario,
    pub(crate) steps: StepBreakdown,
    /// Mean and max rows waiting in the outbox during the measured phase.
    pub(crate) outbox_backlog: (f64, i64),
    pub(crate) load: LoadResult,
    pub(crate) sagad_cpu_s: f64,
    pub(crate) sagad_peak_rss_kib: u64,
    pub(crate) sagad_rss_end_kib: u64,
    pub(crate) cpu: CpuBreakdown,
    pub(crate) pg_write_xacts: i64,
    pub(crate) pg_wal_bytes: i64,
}

impl ScenarioResult {
    pub(crate) fn per_s(&self) -> f64 {
        self.load.ok as f64 / self.load.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn cpu_per_saga(&self) -> f64 {
        self.sagad_cpu_s / (self.load.ok.max(1) as f64)
    }
}

pub(crate) async fn run_scenario(ctx: &Ctx, sc: &Scenario) -> anyhow::Result<ScenarioResult> {
    let label: String = sc
        .label
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let name = format!("saga_bench_{}_{label}", ctx.run_id);
    eprintln!("== {}: setting up database and vhost {name}", sc.label);
    let env = TestEnv::create(
        &name,
        Options {
            template: ctx.template.as_deref(),
            demo_database: true,
            keep: ctx.args.keep_env,
        },
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(kind) = &ctx.args.queue_type {
        let definition = match kind.as_str() {
            "1" | "2" => format!(r#"{{"queue-version":{kind}}}"#),
            other => anyhow::bail!("--queue-type {other}: 1 or 2 (classic queue versions)"),
        };
        saga_testkit::rabbitmqctl(&[
            "set_policy",
            "-p",
            &name,
            "--apply-to",
            "queues",
            "queue-version",
            ".*",
            &definition,
        ])
        .map_err(anyhow::Error::msg)?;
    }
    let (mut sagad, addr) = start_sagad(ctx, &env, &ctx.definitions, &sc.label).await?;
    let mut demo = start_demo(ctx, &env, &sc.label)?;
    let tracker = Arc::new(Tracker::default());
    let (observer, observer_task) = observe_events(&env.amqp_url(), tracker.clone()).await?;
    let clients = connect_clients(&addr, ctx.args.connections).await?;
    let prefix = format!("{}-{}", ctx.run_id, sc.label);

    if sc.warmup > 0 {
        eprintln!(
            "   warm-up: {} sagas, {} in flight",
            sc.warmup, sc.in_flight
        );
        let w = closed_loop(
            &clients,
            &tracker,
            sc.variant,
            sc.warmup,
            sc.in_flight,
            &format!("{prefix}-warmup"),
            ctx.args.timeout,
        )
        .await;
        sagad.check_alive().map_err(anyhow::Error::msg)?;
        demo.check_alive().map_err(anyhow::Error::msg)?;
        if w.failed > 0 {
            bail!(
                "{}: {} of {} warm-up sagas failed: {:?}",
                sc.label,
                w.failed,
                sc.warmup,
                w.reasons
            );
        }
    }

    match sc.rate {
        Some(r) => eprintln!("   measuring: {} sagas at {r}/s (open loop)", sc.sagas),
        None => eprintln!(
            "   measuring: {} sagas, {} in flight (closed loop)",
            sc.sagas, sc.in_flight
        ),
    }
    let pg_before = pg_counters().await?;
    let cpu_before = CpuSnapshot::take();
    let sagad_before = proc_cpu(sagad.pid()).map_or(0, |(_, t)| t);
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = sample_outbox(env.database_url(), stop_sampling.clone());
    let load = match sc.rate {
        Some(rate) => {
            open_loop(
                &clients,
                &tracker,
                sc.variant,
                sc.sagas,
                rate,
                &prefix,
                ctx.args.timeout,
            )
            .await
        }
        None => {
            closed_loop(
                &clients,
                &tracker,
                sc.variant,
                sc.sagas,
                sc.in_flight,
                &prefix,
                ctx.args.timeout,
            )
            .await
        }
    };
    let sagad_after = proc_cpu(sagad.pid()).map_or(0, |(_, t)| t);
    let cpu_after = CpuSnapshot::take();
    stop_sampling.cancel();
    let outbox_backlog = sampler.await.unwrap_or((0.0, 0));
    let (pg_write_xacts, pg_wal_bytes) = pg_delta(&pg_before).await?;
    let sagad_peak_rss_kib = status_kib(sagad.pid(), "VmHWM").unwrap_or(0);
    let sagad_rss_end_kib = status_kib(sagad.pid(), "VmRSS").unwrap_or(0);
    sagad.check_alive().map_err(anyhow::Error::msg)?;
    demo.check_alive().map_err(anyhow::Error::msg)?;
    let cpu = CpuBreakdown::between(&cpu_before, &cpu_after, sagad.pid(), Some(demo.pid()));
    let steps = step_breakdown(&env).await.unwrap_or_else(|e| {
        eprintln!("warning: no step breakdown: {e:#}");
        StepBreakdown::default()
    });

    drop(clients);
    observer_task.abort();
    let _ = observer.close(200, "done".into()).await;
    demo.stop(Duration::from_secs(10));
    sagad.stop(Duration::from_secs(15));
    drop(env);
    Ok(ScenarioResult {
        scenario: sc.clone(),
        steps,
        outbox_backlog,
        load,
        sagad_cpu_s: sagad_after.saturating_sub(sagad_before) as f64 / clk_tck(),
        sagad_peak_rss_kib,
        sagad_rss_end_kib,
        cpu,
        pg_write_xacts,
        pg_wal_bytes,
    })
}
