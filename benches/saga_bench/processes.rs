//! Running sagad and the demo as processes on a scenario's database and vhost.

use super::*;

pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) sagad_bin: PathBuf,
    pub(crate) demo_bin: PathBuf,
    pub(crate) definitions: PathBuf,
    pub(crate) logs: PathBuf,
    pub(crate) run_id: String,
    /// The preloaded template database, if any.
    pub(crate) template: Option<String>,
}

/// Starts `bin` with its output in `log`; it is killed if still running when dropped.
pub(crate) fn spawn(
    what: &'static str,
    bin: &Path,
    args: &[String],
    envs: &[(&str, &str)],
    log: PathBuf,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc::spawn(cmd, what, log).map_err(anyhow::Error::msg)
}

/// Starts sagad on `env` and waits until its gRPC port answers.
pub(crate) async fn start_sagad(
    ctx: &Ctx,
    env: &TestEnv,
    definitions: &Path,
    label: &str,
) -> anyhow::Result<(Proc, String)> {
    let port = free_addr().port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--database-url".to_string(),
        env.database_url(),
        "--amqp-url".into(),
        env.amqp_url(),
        "--listen".into(),
        addr.clone(),
        // Leaves the default metrics port to a sagad the user may be running.
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--definitions".into(),
        definitions.display().to_string(),
    ];
    args.extend(ctx.args.sagad_args.iter().cloned());
    let mut sagad = spawn(
        "sagad",
        &ctx.sagad_bin,
        &args,
        // As an environment variable, which a sagad built before the console ignores.
        &[("SAGA_CONSOLE_LISTEN", "127.0.0.1:0")],
        ctx.logs.join(format!("{label}-sagad.log")),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sagad.check_alive().map_err(anyhow::Error::msg)?;
        if Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .is_ok()
        {
            return Ok((sagad, addr));
        }
        if Instant::now() > deadline {
            bail!("sagad did not listen on {addr} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn start_demo(ctx: &Ctx, env: &TestEnv, label: &str) -> anyhow::Result<Proc> {
    let mut args = vec![
        "--amqp-url".to_string(),
        env.amqp_url(),
        "--database-url".into(),
        env.demo_database_url(),
    ];
    if ctx.args.participants == crate::args::ParticipantsArg::Noop {
        args.push("--noop".into());
    }
    args.extend(ctx.args.demo_args.iter().cloned());
    // The demo stands for services on other machines: its per-command info log would only
    // take CPU from the process under test on this 2-core box.
    let log_level = std::env::var("SAGA_BENCH_DEMO_LOG").unwrap_or_else(|_| "warn".into());
    spawn(
        "saga-demo",
        &ctx.demo_bin,
        &args,
        &[("RUST_LOG", log_level.as_str())],
        ctx.logs.join(format!("{label}-demo.log")),
    )
}
