//! Scale of state: sagas preloaded into the database, and many sagas held in flight.

use super::*;

/// The definitions with every reply timeout raised to 24h, so sagas wait for replies that
/// will not come without timing out, retrying and compensating (which would measure the timer
/// sweeper instead of the state held).
pub(crate) fn long_timeout_definitions(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let changed: Vec<String> = text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("timeout") && t.contains('=') {
                    "timeout = \"24h\"".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(
            dst.join(path.file_name().unwrap()),
            changed.join("\n") + "\n",
        )?;
    }
    Ok(())
}

/// The `--hold` measurement: sagad alone (no participant), RSS as in-flight sagas accumulate.
pub(crate) async fn hold(ctx: &Ctx, n: usize) -> anyhow::Result<Value> {
    let name = format!("saga_bench_{}_hold", ctx.run_id);
    eprintln!("== hold: {n} sagas in flight; database and vhost {name}");
    let env = TestEnv::create(
        &name,
        Options {
            template: None,
            demo_database: true,
            keep: ctx.args.keep_env,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let defs = ctx.logs.join("hold-definitions");
    long_timeout_definitions(&ctx.definitions, &defs)?;
    let (mut sagad, addr) = start_sagad(ctx, &env, &defs, "hold").await?;
    let clients = connect_clients(&addr, ctx.args.connections).await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.database_url())
        .await?;
    let mut checkpoints: Vec<usize> = [100, 1_000, 10_000, 100_000]
        .into_iter()
        .filter(|&c| c <= n)
        .collect();
    checkpoints.push(n);
    checkpoints.dedup();
    let rss0 = status_kib(sagad.pid(), "VmRSS").unwrap_or(0);
    eprintln!("   sagad idle RSS: {:.1} MiB", rss0 as f64 / 1024.0);
    let mut samples = Vec::new();
    let mut started = 0usize;
    let next = Arc::new(AtomicUsize::new(0));
    for cp in checkpoints {
        let t = Instant::now();
        let mut tasks = JoinSet::new();
        for w in 0..ctx.args.in_flight.max(1) {
            let mut client = clients[w % clients.len()].clone();
            let next = next.clone();
            let prefix = format!("{}-hold", ctx.run_id);
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cp {
                        next.fetch_sub(1, Ordering::Relaxed);
                        break;
                    }
                    let key = format!("{prefix}-{i}");
                    client
                        .start_saga(pb::StartSagaRequest {
                            definition: Variant::A.definition().into(),
                            input_json: Variant::A.input(&key).to_string(),
                            idempotency_key: key,
                        })
                        .await
                        .map_err(|s| anyhow::anyhow!("StartSaga: {s}"))?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let start_rate = (cp - started) as f64 / t.elapsed().as_secs_f64();
        started = cp;
        // Let the relay publish the commands, so the sample sees a settled process.
        let drain = Instant::now();
        loop {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&pool)
                .await?;
            if left == 0 || drain.elapsed() > Duration::from_secs(120) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        sagad.check_alive().map_err(anyhow::Error::msg)?;
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sagas WHERE status = 'running'")
                .fetch_one(&pool)
                .await?;
        let rss = status_kib(sagad.pid(), "VmRSS").unwrap_or(0);
        let hwm = status_kib(sagad.pid(), "VmHWM").unwrap_or(0);
        eprintln!(
            "   {cp:>7} started, {running:>7} running: RSS {:.1} MiB, peak {:.1} MiB ({start_rate:.0} starts/s)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        samples.push(json!({
            "in_flight": running, "started": cp, "rss_mib": round(rss as f64 / 1024.0, 1),
            "peak_rss_mib": round(hwm as f64 / 1024.0, 1), "start_calls_per_s": round(start_rate, 1),
        }));
    }
    pool.close().await;
    drop(clients);
    sagad.stop(Duration::from_secs(15));
    drop(env);
    Ok(json!({ "idle_rss_mib": round(rss0 as f64 / 1024.0, 1), "samples": samples }))
}

/// Fills a template database with `n` finished sagas shaped like the ones sagad writes
/// (90% completed like variant A, 10% compensated like variant B), then vacuums and analyzes
/// it as autovacuum would have.
pub(crate) async fn prepare_preload(ctx: &Ctx, n: u64) -> anyhow::Result<TestEnv> {
    let name = format!("saga_bench_{}_preload", ctx.run_id);
    eprintln!("== preload: {n} finished sagas into template database {name}");
    let env = TestEnv::database_only(&name).map_err(anyhow::Error::msg)?;
    let store = saga::store::Store::connect(&env.database_url(), 2).await?;
    store.migrate().await?;
    let defs = saga::definition::load_dir(&ctx.definitions)?;
    store.sync_definitions(&defs).await?;
    store.pool().close().await;

    let mut conn = PgConnection::connect(&env.database_url()).await?;
    sqlx::raw_sql(PRELOAD_FUNCTIONS).execute(&mut conn).await?;
    let t = Instant::now();
    let last = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let chunk = 50_000u64;
    let mut lo = 0u64;
    while lo < n {
        let hi = (lo + chunk).min(n) - 1;
        for sql in [PRELOAD_SAGAS, PRELOAD_ATTEMPTS, PRELOAD_HISTORY] {
            sqlx::query(sql)
                .bind(lo as i64)
                .bind(hi as i64)
                .bind(n as i64)
                .bind(last)
                .execute(&mut conn)
                .await
                .context("preloading")?;
        }
        lo = hi + 1;
        eprintln!(
            "   {lo}/{n} ({:.0} sagas/s)",
            lo as f64 / t.elapsed().as_secs_f64()
        );
    }
    sqlx::raw_sql("VACUUM (ANALYZE) sagas")
        .execute(&mut conn)
        .await?;
    sqlx::raw_sql("VACUUM (ANALYZE) step_attempts")
        .execute(&mut conn)
        .await?;
    sqlx::raw_sql("VACUUM (ANALYZE) saga_history")
        .execute(&mut conn)
        .await?;
    let size: String =
        sqlx::query_scalar("SELECT pg_size_pretty(pg_database_size(current_database()))")
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;
    eprintln!(
        "   done in {:.0}s, database size {size}",
        t.elapsed().as_secs_f64()
    );
    Ok(env)
}

/// UUIDv7 from a time and a salt (the ids sagad writes are UUIDv7, so ordering by id is
/// ordering by creation, and the preloaded sagas sort before the new ones).
pub(crate) const PRELOAD_FUNCTIONS: &str = r#"
CREATE FUNCTION bench_uuid7(ts timestamptz, salt bigint) RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
  SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7'
          || substr(md5(salt::text), 1, 3) || '8' || substr(md5(salt::text), 4, 15))::uuid
$$;
CREATE FUNCTION bench_ts(i bigint, n bigint, base timestamptz) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
  SELECT base - (n - i) * interval '10 ms'
$$;
"#;

// $1..=$2: the range of saga numbers; $3: the total and $4 the time of the last one (saga i
// started (n - i) * 10ms before it). Saga i is
// compensated when i % 10 = 0, completed otherwise.
pub(crate) const PRELOAD_SAGAS: &str = r#"
INSERT INTO sagas (id, definition, definition_version, status, graph,
                   wake_at, input, outputs, error, idempotency_key, created_at, updated_at)
SELECT bench_uuid7(ts, i * 16), 'order_fulfillment', 1,
       CASE WHEN comp THEN 'compensated' ELSE 'completed' END,
       CASE WHEN comp
            THEN '{"started": true, "turned": true, "steps": ["compensated", "compensated", "failed", "pending"]}'::jsonb
            ELSE '{"started": true, "turned": false, "steps": ["succeeded", "succeeded", "succeeded", "succeeded"]}'::jsonb END,
       NULL,
       CASE WHEN comp
            THEN jsonb_build_object('order_id', 'P-' || i, 'amount_cents', 4200, 'fail_at', 'schedule_delivery')
            ELSE jsonb_build_object('order_id', 'P-' || i, 'amount_cents', 4200) END,
       CASE WHEN comp
            THEN jsonb_build_object('create_order', jsonb_build_object('order_ref', 'ord-' || h),
                                    'authorize_payment', jsonb_build_object('authorization', 'auth-' || h))
            ELSE jsonb_build_object('create_order', jsonb_build_object('order_ref', 'ord-' || h),
                                    'authorize_payment', jsonb_build_object('authorization', 'auth-' || h),
                                    'schedule_delivery', jsonb_build_object('tracking', 'trk-' || h),
                                    'approve_order', jsonb_build_object('order_ref', 'ord-' || h)) END,
       CASE WHEN comp THEN 'step schedule_delivery failed: injected failure: saga input has fail_at "schedule_delivery"' END,
       'preload-' || i, ts, ts + interval '20 ms'
FROM (SELECT i, bench_ts(i, $3, $4) AS ts, i % 10 = 0 AS comp, substr(md5(i::text), 1, 8) AS h
      FROM generate_series($1::bigint, $2::bigint) AS i) s
"#;

pub(crate) const PRELOAD_ATTEMPTS: &str = r#"
INSERT INTO step_attempts (command_id, saga_id, step_index, step, participant, kind, attempt,
                           sent_at, deadline, replied_at, outcome, output, reason, timed_out)
SELECT bench_uuid7(ts + a.n * interval '4 ms', i * 16 + a.n), bench_uuid7(ts, i * 16),
       a.step_index, a.step, a.participant, a.kind, 1,
       ts + a.n * interval '4 ms', ts + a.n * interval '4 ms' + interval '10 s',
       ts + a.n * interval '4 ms' + interval '3 ms',
       CASE WHEN comp AND a.step = 'schedule_delivery' THEN 'failure' ELSE 'success' END,
       CASE WHEN comp AND a.step = 'schedule_delivery' THEN NULL
            WHEN a.kind = 'compensation' THEN '{"undone": true}'::jsonb
            ELSE jsonb_build_object(a.out_key, a.out_prefix || h) END,
       CASE WHEN comp AND a.step = 'schedule_delivery'
            THEN 'injected failure: saga input has fail_at "schedule_delivery"' END,
       false
FROM (SELECT i, bench_ts(i, $3, $4) AS ts, i % 10 = 0 AS comp, substr(md5(i::text), 1, 8) AS h
      FROM generate_series($1::bigint, $2::bigint) AS i) s
JOIN (VALUES
        (1, 0, 'create_order', 'order', 'action', 'order_ref', 'ord-', 'both'),
        (2, 1, 'authorize_payment', 'payment', 'action', 'authorization', 'auth-', 'both'),
        (3, 2, 'schedule_delivery', 'delivery', 'action', 'tracking', 'trk-', 'both'),
        (4, 3, 'approve_order', 'order', 'action', 'order_ref', 'ord-', 'a'),
        (4, 1, 'authorize_payment', 'payment', 'compensation', '', '', 'b'),
        (5, 0, 'create_order', 'order', 'compensation', '', '', 'b')
     ) AS a(n, step_index, step, participant, kind, out_key, out_prefix, who)
  ON a.who = 'both' OR (a.who = 'a' AND NOT comp) OR (a.who = 'b' AND comp)
"#;

pub(crate) const PRELOAD_HISTORY: &str = r#"
INSERT INTO saga_history (saga_id, at, kind, step, command_id, detail)
SELECT bench_uuid7(ts, i * 16), ts + e.n * interval '2 ms', e.kind, e.step,
       CASE WHEN e.cmd IS NULL THEN NULL
            ELSE bench_uuid7(ts + e.cmd * interval '4 ms', i * 16 + e.cmd) END,
       CASE WHEN e.out_key IS NULL THEN e.detail::jsonb
            ELSE jsonb_build_object('output', jsonb_build_object(e.out_key, e.out_prefix || h)) END
FROM (SELECT i, bench_ts(i, $3, $4) AS ts, i % 10 = 0 AS comp, substr(md5(i::text), 1, 8) AS h
      FROM generate_series($1::bigint, $2::bigint) AS i) s
JOIN (VALUES
        (0, 'saga_started', NULL, NULL, '{"definition_version": 1}', NULL, NULL, 'both'),
        (1, 'command_sent', 'create_order', 1, '{"kind": "action", "attempt": 1}', NULL, NULL, 'both'),
        (2, 'step_succeeded', 'create_order', 1, NULL, 'order_ref', 'ord-', 'both'),
        (3, 'command_sent', 'authorize_payment', 2, '{"kind": "action", "attempt": 1}', NULL, NULL, 'both'),
        (4, 'step_succeeded', 'authorize_payment', 2, NULL, 'authorization', 'auth-', 'both'),
        (5, 'command_sent', 'schedule_delivery', 3, '{"kind": "action", "attempt": 1}', NULL, NULL, 'both'),
        (6, 'step_succeeded', 'schedule_delivery', 3, NULL, 'tracking', 'trk-', 'a'),
        (7, 'command_sent', 'approve_order', 4, '{"kind": "action", "attempt": 1}', NULL, NULL, 'a'),
        (8, 'step_succeeded', 'approve_order', 4, NULL, 'order_ref', 'ord-', 'a'),
        (9, 'saga_completed', NULL, NULL, '{}', NULL, NULL, 'a'),
        (6, 'step_failed', 'schedule_delivery', 3,
            '{"reason": "injected failure: saga input has fail_at \"schedule_delivery\"", "retryable": false}', NULL, NULL, 'b'),
        (7, 'compensation_started', 'schedule_delivery', NULL,
            '{"reason": "injected failure: saga input has fail_at \"schedule_delivery\"", "attempts": 1}', NULL, NULL, 'b'),
        (8, 'command_sent', 'authorize_payment', 4, '{"kind": "compensation", "attempt": 1}', NULL, NULL, 'b'),
        (9, 'step_compensated', 'authorize_payment', 4, '{}', NULL, NULL, 'b'),
        (10, 'command_sent', 'create_order', 5, '{"kind": "compensation", "attempt": 1}', NULL, NULL, 'b'),
        (11, 'step_compensated', 'create_order', 5, '{}', NULL, NULL, 'b'),
        (12, 'saga_compensated', NULL, NULL, '{}', NULL, NULL, 'b')
     ) AS e(n, kind, step, cmd, detail, out_key, out_prefix, who)
  ON e.who = 'both' OR (e.who = 'a' AND NOT comp) OR (e.who = 'b' AND comp)
"#;
