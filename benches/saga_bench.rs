//! `saga_bench`: end-to-end figures for sagad on this machine's PostgreSQL and RabbitMQ.
//!
//! `cargo bench --bench saga_bench -- [--quick] [--json PATH] ...` (see `--help` and
//! `docs/benchmarks.md`). Cargo builds `sagad` and `saga-demo` with the bench profile (release
//! optimisations) for this target, and the program runs them as separate processes, each
//! scenario in a fresh database and a fresh RabbitMQ vhost, removed afterwards.
//!
//! Per scenario it prints completed sagas per second, end-to-end latency (the `StartSaga` call,
//! or in open loop the scheduled start, up to the lifecycle event `completed` / `compensated`
//! observed on `saga.events`), sagad CPU seconds per saga (utime + stime from `/proc`), and
//! sagad's peak RSS (`VmHWM`). It also measures the raw limits of the pipeline on the same
//! servers (confirmed persistent AMQP round trips per second, durable PostgreSQL commits per
//! second) and prints the throughput as a fraction of them.
//!
//! It never asserts speed. It exits non-zero when a saga does not reach the expected end
//! (timeout, wrong status) or a process dies, so CI catches rot.
//!
//! Run by `cargo test --all-targets` (no `--bench` argument), it runs a tiny smoke scenario on
//! the debug binaries instead: the figures are meaningless there, the exit code is not.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use saga::contract::{self, LifecycleEvent};
use saga::proto::v1 as pb;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection as _, Row};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

const PG: &str = "postgres://postgres@127.0.0.1:5432";
const DEFINITION: &str = "order_fulfillment";

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Parser, Debug, Clone)]
#[command(
    name = "saga_bench",
    about = "End-to-end benchmark of sagad with the demo participants on the local PostgreSQL and RabbitMQ",
    after_help = "Run through cargo: cargo bench --bench saga_bench -- [OPTIONS]. See docs/benchmarks.md."
)]
struct Args {
    /// Sagas measured per scenario (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    sagas: usize,
    /// Sagas in flight (closed loop: a new saga starts when one ends). Also the concurrency of
    /// the raw-limit probes.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Sagas run before each measured phase, not counted.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Which workload: a (all steps succeed), b (delivery fails: refund, cancel), or both.
    #[arg(long, value_enum, default_value = "both")]
    variant: VariantArg,
    /// Open loop: start sagas at this fixed rate (per second) instead of keeping --in-flight
    /// going; latency counts from each saga's scheduled start (no coordinated omission).
    #[arg(long)]
    rate: Option<f64>,
    /// Sagas of the single-saga latency scenario (variant A, one in flight); 0 skips it.
    #[arg(long, default_value_t = 200)]
    single: usize,
    /// Duration of each raw-limit probe (RabbitMQ round trips, PostgreSQL commits); 0s skips them.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    raw_duration: Duration,
    /// The smallest scenario, for CI: 200 sagas, 16 in flight, 50 warm-up, 50 single, 1s probes
    /// (options given explicitly still win).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Before each scenario, store this many finished sagas (rows in sagas, step_attempts and
    /// saga_history, inserted with SQL) in its database.
    #[arg(long, value_name = "N")]
    preload: Option<u64>,
    /// Instead of the throughput scenarios: start N sagas with no participant running (and reply
    /// timeouts of 24h) and sample sagad's RSS at 100, 1,000, 10,000, 100,000 and N in flight.
    #[arg(long, value_name = "N")]
    hold: Option<usize>,
    /// gRPC connections the starting tasks share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// A saga not ended after this long counts as failed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The sagad executable (default: the one cargo built for this bench).
    #[arg(long)]
    sagad_bin: Option<PathBuf>,
    /// The saga-demo executable (default: the one cargo built for this bench).
    #[arg(long)]
    demo_bin: Option<PathBuf>,
    /// Extra argument for sagad, repeatable, e.g. --sagad-arg=--db-max-connections=32.
    #[arg(long = "sagad-arg", value_name = "ARG", allow_hyphen_values = true)]
    sagad_args: Vec<String>,
    /// Extra argument for saga-demo, repeatable, e.g. --demo-arg=--prefetch=128.
    #[arg(long = "demo-arg", value_name = "ARG", allow_hyphen_values = true)]
    demo_args: Vec<String>,
    /// Keep the process logs (always kept when something fails).
    #[arg(long)]
    keep_logs: bool,
    /// Keep the databases and vhosts (for inspection); they are named in the output.
    #[arg(long)]
    keep_env: bool,
    /// Passed by `cargo bench`; without it (as under `cargo test`) a smoke run is made.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VariantArg {
    A,
    B,
    Both,
}

/// Parses the arguments; `--quick` changes the defaults of the options not given explicitly.
fn parse_args() -> Args {
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let defaulted =
        |id: &str| matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine);
    if args.quick {
        if defaulted("sagas") {
            args.sagas = 200;
        }
        if defaulted("in_flight") {
            args.in_flight = 16;
        }
        if defaulted("warmup") {
            args.warmup = 50;
        }
        if defaulted("single") {
            args.single = 50;
        }
        if defaulted("raw_duration") {
            args.raw_duration = Duration::from_secs(1);
        }
    }
    args
}

/// The arguments of the smoke run made under `cargo test`: every code path, tiny counts.
fn smoke_args() -> Args {
    let mut args = Args::parse_from(["saga_bench"]);
    args.sagas = 40;
    args.in_flight = 8;
    args.warmup = 8;
    args.single = 5;
    args.raw_duration = Duration::from_millis(300);
    args.timeout = Duration::from_secs(60);
    args
}

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Every step succeeds: create_order, authorize_payment, schedule_delivery, approve_order.
    A,
    /// schedule_delivery (the pivot) fails for good: refund_payment, cancel_order.
    B,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::A => "A",
            Variant::B => "B",
        }
    }

    fn input(self, order_id: &str) -> Value {
        match self {
            Variant::A => json!({ "order_id": order_id, "amount_cents": 4200 }),
            Variant::B => json!({
                "order_id": order_id, "amount_cents": 4200, "fail_at": "schedule_delivery"
            }),
        }
    }

    /// The lifecycle event that ends a saga of this variant as expected.
    fn expected_event(self) -> &'static str {
        match self {
            Variant::A => "completed",
            Variant::B => "compensated",
        }
    }

    /// Command round trips (command out, reply back) per saga.
    fn commands(self) -> u32 {
        match self {
            Variant::A => 4, // create, authorize, schedule, approve
            Variant::B => 5, // create, authorize, schedule (fails), refund, cancel
        }
    }

    /// Durable commits per saga: sagad's transitions (1 start + 1 per reply) plus the
    /// participant's own commit per command (the demo commits once per command).
    fn commits(self) -> u32 {
        (1 + self.commands()) + self.commands()
    }
}

// ---------------------------------------------------------------------------------------------
// Isolated environments: a database (or two) and a vhost per run
// ---------------------------------------------------------------------------------------------

fn run_tool(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn psql(sql: &str) -> anyhow::Result<()> {
    run_tool(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
    )
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-q"];
    all.extend_from_slice(args);
    run_tool("rabbitmqctl", &all)
}

/// Databases and a vhost created for one run; dropped with it (unless kept).
struct Env {
    name: String,
    databases: Vec<String>,
    vhost: bool,
    keep: bool,
}

impl Env {
    /// Database `<name>` (a copy of `template` if given), database `<name>_demo` for the demo
    /// participants, and vhost `<name>`.
    fn create(name: &str, template: Option<&str>, keep: bool) -> anyhow::Result<Env> {
        let mut env = Env {
            name: name.to_string(),
            databases: Vec::new(),
            vhost: false,
            keep,
        };
        rabbitmqctl(&["add_vhost", name])?;
        env.vhost = true;
        rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])?;
        match template {
            // FILE_COPY: a checkpoint and a file copy, much faster than WAL-logging gigabytes.
            Some(t) => psql(&format!(
                "CREATE DATABASE {name} TEMPLATE {t} STRATEGY FILE_COPY"
            ))?,
            None => psql(&format!("CREATE DATABASE {name}"))?,
        }
        env.databases.push(name.to_string());
        psql(&format!("CREATE DATABASE {name}_demo"))?;
        env.databases.push(format!("{name}_demo"));
        Ok(env)
    }

    /// One database, no vhost (the preload template).
    fn database_only(name: &str) -> anyhow::Result<Env> {
        psql(&format!("CREATE DATABASE {name}"))?;
        Ok(Env {
            name: name.to_string(),
            databases: vec![name.to_string()],
            vhost: false,
            keep: false,
        })
    }

    fn database_url(&self) -> String {
        format!("{PG}/{}", self.name)
    }

    fn demo_database_url(&self) -> String {
        format!("{PG}/{}_demo", self.name)
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "  kept: databases {:?}, vhost {}",
                self.databases,
                if self.vhost { &self.name } else { "-" }
            );
            return;
        }
        for db in self.databases.iter().rev() {
            if let Err(e) = psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")) {
                eprintln!("warning: {e:#}");
            }
        }
        if self.vhost
            && let Err(e) = rabbitmqctl(&["delete_vhost", &self.name])
        {
            eprintln!("warning: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and /proc
// ---------------------------------------------------------------------------------------------

/// A child process, killed if still running when dropped.
struct Proc {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        what: &'static str,
        bin: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Proc { what, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (naming the log) if the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log: {}\n{}",
                self.what,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not stopped within `grace`.
    fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Clock ticks per second of the times in /proc (USER_HZ).
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (comm, utime + stime in ticks) of a process, all threads included.
fn proc_cpu(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    // Fields after the comm start at field 3 (state); utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// A field of /proc/<pid>/status in KiB, e.g. `VmHWM` (peak RSS) or `VmRSS`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Busy ticks of the whole machine (all CPUs; iowait and idle excluded).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

/// CPU ticks of every process, and of the machine, at one moment.
struct CpuSnapshot {
    procs: HashMap<u32, (String, u64)>,
    machine: u64,
}

impl CpuSnapshot {
    fn take() -> CpuSnapshot {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                    && let Some(v) = proc_cpu(pid)
                {
                    procs.insert(pid, v);
                }
            }
        }
        CpuSnapshot {
            procs,
            machine: machine_busy_ticks(),
        }
    }
}

/// Where the CPU went between two snapshots, in seconds.
#[derive(Debug, Clone, Default)]
struct CpuBreakdown {
    sagad: f64,
    demo: f64,
    postgres: f64,
    rabbitmq: f64,
    bench: f64,
    /// Everything else that ran on the machine meanwhile (other builds, tests...).
    other: f64,
    machine: f64,
}

impl CpuBreakdown {
    fn between(before: &CpuSnapshot, after: &CpuSnapshot, sagad: u32, demo: Option<u32>) -> Self {
        let hz = clk_tck();
        let me = std::process::id();
        let mut b = CpuBreakdown::default();
        for (pid, (comm, ticks)) in &after.procs {
            let prev = before
                .procs
                .get(pid)
                .filter(|(c, _)| c == comm)
                .map_or(0, |(_, t)| *t);
            let s = ticks.saturating_sub(prev) as f64 / hz;
            if *pid == sagad {
                b.sagad += s;
            } else if Some(*pid) == demo {
                b.demo += s;
            } else if *pid == me {
                b.bench += s;
            } else if comm == "postgres" {
                b.postgres += s;
            } else if comm == "beam.smp" {
                b.rabbitmq += s;
            }
        }
        b.machine = after.machine.saturating_sub(before.machine) as f64 / hz;
        b.other = (b.machine - b.sagad - b.demo - b.bench - b.postgres - b.rabbitmq).max(0.0);
        b
    }

    fn json(&self, per: f64) -> Value {
        let r = |x: f64| round(x / per, 6);
        json!({
            "sagad": r(self.sagad), "demo": r(self.demo), "postgres": r(self.postgres),
            "rabbitmq": r(self.rabbitmq), "bench_client": r(self.bench), "other": r(self.other),
            "machine": r(self.machine),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL counters: write transactions and WAL bytes (cluster-wide, read at once)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PgCounters {
    xid: i64,
    wal_lsn: String,
}

async fn pg_counters() -> anyhow::Result<PgCounters> {
    let mut conn = PgConnection::connect(&format!("{PG}/postgres")).await?;
    let row = sqlx::query(
        "SELECT pg_current_xact_id()::text::bigint AS xid, pg_current_wal_lsn()::text AS lsn",
    )
    .fetch_one(&mut conn)
    .await?;
    let counters = PgCounters {
        xid: row.try_get("xid")?,
        wal_lsn: row.try_get("lsn")?,
    };
    conn.close().await?;
    Ok(counters)
}

/// (write transactions, WAL bytes) between two readings.
async fn pg_delta(before: &PgCounters) -> anyhow::Result<(i64, i64)> {
    let mut conn = PgConnection::connect(&format!("{PG}/postgres")).await?;
    let row = sqlx::query(
        "SELECT pg_current_xact_id()::text::bigint AS xid, \
         pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint AS wal",
    )
    .bind(&before.wal_lsn)
    .fetch_one(&mut conn)
    .await?;
    let xid: i64 = row.try_get("xid")?;
    let wal: i64 = row.try_get("wal")?;
    conn.close().await?;
    // Minus the one this reading took.
    Ok((xid - before.xid - 1, wal))
}

// ---------------------------------------------------------------------------------------------
// Observing completion: a private queue bound to saga.events
// ---------------------------------------------------------------------------------------------

/// Matches lifecycle events to the sagas waiting for them. An event may arrive before the
/// `StartSaga` response that names its saga; it is kept until asked for.
#[derive(Default)]
struct Tracker {
    slots: Mutex<HashMap<Uuid, Slot>>,
}

type Ended = (Instant, String);

enum Slot {
    Waiting(oneshot::Sender<Ended>),
    Arrived(Ended),
}

impl Tracker {
    fn arrived(&self, saga_id: Uuid, ended: Ended) {
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(&saga_id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(ended);
            }
            // A duplicate (delivery is at least once): keep the first.
            Some(arrived @ Slot::Arrived(_)) => {
                slots.insert(saga_id, arrived);
            }
            None => {
                slots.insert(saga_id, Slot::Arrived(ended));
            }
        }
    }

    fn wait_for(&self, saga_id: Uuid) -> oneshot::Receiver<Ended> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(&saga_id) {
            Some(Slot::Arrived(ended)) => {
                let _ = tx.send(ended);
            }
            _ => {
                slots.insert(saga_id, Slot::Waiting(tx));
            }
        }
        rx
    }
}

/// Binds an exclusive, non-durable queue to the terminal lifecycle events and timestamps each
/// on arrival. Non-durable and auto-ack: the observer adds no disk write to the broker.
async fn observe_events(
    amqp_url: &str,
    tracker: Arc<Tracker>,
) -> anyhow::Result<(Connection, tokio::task::JoinHandle<()>)> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("observer: cannot connect to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for event in ["completed", "compensated", "needs_operator"] {
        channel
            .queue_bind(
                queue.name().clone(),
                contract::EVENTS_EXCHANGE.into(),
                format!("{DEFINITION}.{event}").into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding to saga.events (is sagad up?)")?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "saga-bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let handle = tokio::spawn(async move {
        let _channel = channel; // keep it open
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            match serde_json::from_slice::<LifecycleEvent>(&delivery.data) {
                Ok(event) => tracker.arrived(event.saga_id, (at, event.event)),
                Err(e) => eprintln!("warning: unreadable lifecycle event: {e}"),
            }
        }
    });
    Ok((conn, handle))
}

// ---------------------------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------------------------

type Client = SagaServiceClient<Channel>;

async fn connect_clients(addr: &str, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::new();
    for _ in 0..n.max(1) {
        // One Endpoint::connect is one HTTP/2 connection.
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        clients.push(SagaServiceClient::new(channel));
    }
    Ok(clients)
}

/// Starts one saga and waits for its terminal event. Returns when it ended and how.
async fn one_saga(
    client: &mut Client,
    tracker: &Tracker,
    variant: Variant,
    key: String,
    deadline: tokio::time::Instant,
) -> Result<Ended, String> {
    let request = pb::StartSagaRequest {
        definition: DEFINITION.into(),
        input_json: variant.input(&key).to_string(),
        idempotency_key: key,
    };
    let started = tokio::time::timeout_at(deadline, client.start_saga(request))
        .await
        .map_err(|_| "StartSaga timed out".to_string())?
        .map_err(|s| format!("StartSaga: {} {}", s.code(), s.message()))?
        .into_inner();
    let id: Uuid = started
        .saga_id
        .parse()
        .map_err(|e| format!("StartSaga returned a bad id: {e}"))?;
    let rx = tracker.wait_for(id);
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(ended)) => Ok(ended),
        Ok(Err(_)) => Err(format!("saga {id}: observer stopped")),
        Err(_) => Err(format!("saga {id}: no terminal event in time")),
    }
}

/// What a load phase produced.
struct LoadResult {
    ok: u64,
    failed: u64,
    reasons: Vec<String>,
    /// Microseconds.
    latency: Histogram<u64>,
    elapsed: Duration,
    max_in_flight: usize,
}

impl LoadResult {
    fn new() -> Self {
        LoadResult {
            ok: 0,
            failed: 0,
            reasons: Vec::new(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap(),
            elapsed: Duration::ZERO,
            max_in_flight: 0,
        }
    }

    fn record(
        &mut self,
        variant: Variant,
        from: Instant,
        result: Result<Ended, String>,
    ) -> Instant {
        match result {
            Ok((at, event)) if event == variant.expected_event() => {
                self.ok += 1;
                let us = at.saturating_duration_since(from).as_micros() as u64;
                self.latency.saturating_record(us.max(1));
                at
            }
            Ok((at, event)) => {
                self.fail(format!(
                    "ended {event}, expected {}",
                    variant.expected_event()
                ));
                at
            }
            Err(reason) => {
                self.fail(reason);
                Instant::now()
            }
        }
    }

    fn fail(&mut self, reason: String) {
        self.failed += 1;
        if self.reasons.len() < 5 {
            self.reasons.push(reason);
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        for r in other.reasons {
            if self.reasons.len() < 5 {
                self.reasons.push(r);
            }
        }
        self.latency.add(&other.latency).unwrap();
    }

    fn ms(&self, q: f64) -> f64 {
        round(self.latency.value_at_quantile(q) as f64 / 1000.0, 2)
    }
}

/// Closed loop: `in_flight` tasks, each starting a saga as soon as its previous one ended.
async fn closed_loop(
    clients: &[Client],
    tracker: &Arc<Tracker>,
    variant: Variant,
    count: usize,
    in_flight: usize,
    prefix: &str,
    timeout: Duration,
) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let begin = Instant::now();
    let mut tasks = JoinSet::new();
    for w in 0..in_flight.clamp(1, count.max(1)) {
        let mut client = clients[w % clients.len()].clone();
        let tracker = tracker.clone();
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            let mut result = LoadResult::new();
            let mut last = begin;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let from = Instant::now();
                let deadline = tokio::time::Instant::from_std(from + timeout);
                let r = one_saga(
                    &mut client,
                    &tracker,
                    variant,
                    format!("{prefix}-{i}"),
                    deadline,
                )
                .await;
                last = last.max(result.record(variant, from, r));
            }
            (result, last)
        });
    }
    let mut total = LoadResult::new();
    let mut last = begin;
    while let Some(done) = tasks.join_next().await {
        let (r, l) = done.expect("load task panicked");
        total.merge(r);
        last = last.max(l);
    }
    total.elapsed = last - begin;
    total.max_in_flight = in_flight.min(count);
    total
}

/// Open loop: saga i is due at `i / rate` seconds; its latency counts from then, however late
/// the start call itself went out, so a slow system cannot hide its queueing.
async fn open_loop(
    clients: &[Client],
    tracker: &Arc<Tracker>,
    variant: Variant,
    count: usize,
    rate: f64,
    prefix: &str,
    timeout: Duration,
) -> LoadResult {
    let t0 = Instant::now() + Duration::from_millis(20);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut max_in_flight = 0;
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        max_in_flight = max_in_flight.max(in_flight.fetch_add(1, Ordering::Relaxed) + 1);
        let mut client = clients[i % clients.len()].clone();
        let tracker = tracker.clone();
        let key = format!("{prefix}-{i}");
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            let deadline = tokio::time::Instant::from_std(due + timeout);
            let r = one_saga(&mut client, &tracker, variant, key, deadline).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            (due, r)
        });
    }
    let mut total = LoadResult::new();
    let mut last = t0;
    while let Some(done) = tasks.join_next().await {
        let (due, r) = done.expect("load task panicked");
        last = last.max(total.record(variant, due, r));
    }
    total.elapsed = last - t0;
    total.max_in_flight = max_in_flight;
    total
}

// ---------------------------------------------------------------------------------------------
// Running sagad and the demo
// ---------------------------------------------------------------------------------------------

struct Ctx {
    args: Args,
    sagad_bin: PathBuf,
    demo_bin: PathBuf,
    definitions: PathBuf,
    logs: PathBuf,
    run_id: String,
    /// The preloaded template database, if any.
    template: Option<String>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Starts sagad on `env` and waits until its gRPC port answers.
async fn start_sagad(
    ctx: &Ctx,
    env: &Env,
    definitions: &Path,
    label: &str,
) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
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
    let mut sagad = Proc::spawn(
        "sagad",
        &ctx.sagad_bin,
        &args,
        &[],
        ctx.logs.join(format!("{label}-sagad.log")),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sagad.check_alive()?;
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

fn start_demo(ctx: &Ctx, env: &Env, label: &str) -> anyhow::Result<Proc> {
    let mut args = vec![
        "--amqp-url".to_string(),
        env.amqp_url(),
        "--database-url".into(),
        env.demo_database_url(),
    ];
    args.extend(ctx.args.demo_args.iter().cloned());
    // The demo stands for services on other machines: its per-command info log would only
    // take CPU from the process under test on this 2-core box.
    let log_level = std::env::var("SAGA_BENCH_DEMO_LOG").unwrap_or_else(|_| "warn".into());
    Proc::spawn(
        "saga-demo",
        &ctx.demo_bin,
        &args,
        &[("RUST_LOG", log_level.as_str())],
        ctx.logs.join(format!("{label}-demo.log")),
    )
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Scenario {
    label: String,
    variant: Variant,
    sagas: usize,
    in_flight: usize,
    rate: Option<f64>,
    warmup: usize,
}

/// Where one step's time goes, from the timestamps the two sides store: sagad's
/// `step_attempts.sent_at` (the transition that sent the command; its commit comes after) and
/// `replied_at` (when sagad began applying the reply), and the demo's
/// `demo_processed_commands.applied_at` (when its transaction for the command began).
#[derive(Debug, Clone, Default)]
struct StepBreakdown {
    steps: usize,
    /// sent_at → applied_at: sagad's transition commit, outbox relay (NOTIFY, claim, publish,
    /// confirm), broker, delivery to the participant. (ms: p50, p90, p99)
    to_participant: [f64; 3],
    /// applied_at → replied_at: the participant's transaction and commit, its confirmed reply,
    /// broker, delivery to sagad's reply consumer.
    to_sagad: [f64; 3],
}

async fn step_breakdown(env: &Env) -> anyhow::Result<StepBreakdown> {
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
fn sample_outbox(
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

struct ScenarioResult {
    scenario: Scenario,
    steps: StepBreakdown,
    /// Mean and max rows waiting in the outbox during the measured phase.
    outbox_backlog: (f64, i64),
    load: LoadResult,
    sagad_cpu_s: f64,
    sagad_peak_rss_kib: u64,
    sagad_rss_end_kib: u64,
    cpu: CpuBreakdown,
    pg_write_xacts: i64,
    pg_wal_bytes: i64,
}

impl ScenarioResult {
    fn per_s(&self) -> f64 {
        self.load.ok as f64 / self.load.elapsed.as_secs_f64().max(1e-9)
    }

    fn cpu_per_saga(&self) -> f64 {
        self.sagad_cpu_s / (self.load.ok.max(1) as f64)
    }
}

async fn run_scenario(ctx: &Ctx, sc: &Scenario) -> anyhow::Result<ScenarioResult> {
    let label: String = sc
        .label
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let name = format!("saga_bench_{}_{label}", ctx.run_id);
    eprintln!("== {}: setting up database and vhost {name}", sc.label);
    let env = Env::create(&name, ctx.template.as_deref(), ctx.args.keep_env)?;
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
        sagad.check_alive()?;
        demo.check_alive()?;
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
    sagad.check_alive()?;
    demo.check_alive()?;
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

// ---------------------------------------------------------------------------------------------
// Raw limits
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct RawLimits {
    rabbit_rt_per_s: f64,
    /// With one round trip in flight: 1 / its latency.
    rabbit_rt_per_s_serial: f64,
    /// (connections, commits per second)
    pg_commits: Vec<(usize, f64)>,
    synchronous_commit: String,
    fsync: String,
}

impl RawLimits {
    fn pg_best(&self) -> f64 {
        self.pg_commits.iter().map(|(_, c)| *c).fold(0.0, f64::max)
    }

    /// Sagas per second the pipeline could carry if sagad added nothing: the tighter of the
    /// broker bound (one confirmed round trip per command) and the database bound (one durable
    /// commit per sagad transition and per participant command).
    fn pipeline_limit(&self, v: Variant) -> f64 {
        (self.rabbit_rt_per_s / v.commands() as f64).min(self.pg_best() / v.commits() as f64)
    }

    /// A rough floor for one saga alone, in ms: its commands' round trips and its commits one
    /// after the other, each at the latency measured with nothing else in flight.
    fn serial_floor_ms(&self, v: Variant) -> Option<f64> {
        let commit = self.pg_commits.iter().find(|(c, _)| *c == 1)?.1;
        if commit <= 0.0 || self.rabbit_rt_per_s_serial <= 0.0 {
            return None;
        }
        Some(
            1000.0 * v.commands() as f64 / self.rabbit_rt_per_s_serial
                + 1000.0 * v.commits() as f64 / commit,
        )
    }
}

/// Durable single-row commits per second: `connections` tasks, each BEGIN; INSERT; COMMIT.
async fn pg_commit_probe(url: &str, connections: usize, duration: Duration) -> anyhow::Result<f64> {
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
async fn rabbit_rt_probe(
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

async fn raw_limits(ctx: &Ctx) -> anyhow::Result<RawLimits> {
    let name = format!("saga_bench_{}_raw", ctx.run_id);
    eprintln!("== raw limits: database and vhost {name}");
    let env = Env::create(&name, None, ctx.args.keep_env)?;
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

// ---------------------------------------------------------------------------------------------
// Scale of state: preload and hold
// ---------------------------------------------------------------------------------------------

/// The definitions with every reply timeout raised to 24h, so sagas wait for replies that
/// will not come without timing out, retrying and compensating (which would measure the timer
/// sweeper instead of the state held).
fn long_timeout_definitions(src: &Path, dst: &Path) -> anyhow::Result<()> {
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
async fn hold(ctx: &Ctx, n: usize) -> anyhow::Result<Value> {
    let name = format!("saga_bench_{}_hold", ctx.run_id);
    eprintln!("== hold: {n} sagas in flight; database and vhost {name}");
    let env = Env::create(&name, None, ctx.args.keep_env)?;
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
                            definition: DEFINITION.into(),
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
        sagad.check_alive()?;
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
async fn prepare_preload(ctx: &Ctx, n: u64) -> anyhow::Result<Env> {
    let name = format!("saga_bench_{}_preload", ctx.run_id);
    eprintln!("== preload: {n} finished sagas into template database {name}");
    let env = Env::database_only(&name)?;
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
const PRELOAD_FUNCTIONS: &str = r#"
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
const PRELOAD_SAGAS: &str = r#"
INSERT INTO sagas (id, definition, definition_version, status, step, kind, attempt, command_id,
                   wake_at, input, outputs, error, idempotency_key, created_at, updated_at)
SELECT bench_uuid7(ts, i * 16), 'order_fulfillment', 1,
       CASE WHEN comp THEN 'compensated' ELSE 'completed' END,
       CASE WHEN comp THEN 0 ELSE 3 END,
       CASE WHEN comp THEN 'compensation' ELSE 'action' END,
       1, NULL, NULL,
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

const PRELOAD_ATTEMPTS: &str = r#"
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

const PRELOAD_HISTORY: &str = r#"
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

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| round(kib / 1024.0 / 1024.0, 1));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

fn scenario_json(r: &ScenarioResult, raw: Option<&RawLimits>) -> Value {
    let per = r.load.ok.max(1) as f64;
    let limit = raw.map(|raw| raw.pipeline_limit(r.scenario.variant));
    json!({
        "scenario": r.scenario.label,
        "variant": r.scenario.variant.name(),
        "mode": if r.scenario.rate.is_some() { "open" } else { "closed" },
        "in_flight": r.scenario.in_flight,
        "rate": r.scenario.rate,
        "max_in_flight": r.load.max_in_flight,
        "warmup": r.scenario.warmup,
        "sagas": r.scenario.sagas,
        "completed": r.load.ok,
        "failed": r.load.failed,
        "failures": r.load.reasons,
        "elapsed_s": round(r.load.elapsed.as_secs_f64(), 3),
        "sagas_per_s": round(r.per_s(), 1),
        "latency_ms": {
            "p50": r.load.ms(0.50), "p90": r.load.ms(0.90), "p99": r.load.ms(0.99),
            "max": round(r.load.latency.max() as f64 / 1000.0, 2),
            "mean": round(r.load.latency.mean() / 1000.0, 2),
        },
        "sagad_cpu_s_per_saga": round(r.cpu_per_saga(), 6),
        "sagad_cpu_cores": round(r.sagad_cpu_s / r.load.elapsed.as_secs_f64().max(1e-9), 2),
        "sagad_peak_rss_mib": round(r.sagad_peak_rss_kib as f64 / 1024.0, 1),
        "sagad_rss_end_mib": round(r.sagad_rss_end_kib as f64 / 1024.0, 1),
        "pipeline_limit_sagas_per_s": limit.map(|l| round(l, 1)),
        "fraction_of_limit": limit.map(|l| round(r.per_s() / l, 3)),
        "cpu_s_per_saga": r.cpu.json(per),
        "pg_write_xacts_per_saga": round(r.pg_write_xacts as f64 / per, 2),
        "pg_wal_bytes_per_saga": round(r.pg_wal_bytes as f64 / per, 0),
        "outbox_backlog": { "mean": round(r.outbox_backlog.0, 1), "max": r.outbox_backlog.1 },
        "step_ms": {
            "steps": r.steps.steps,
            "sagad_sent_to_participant_began": {
                "p50": r.steps.to_participant[0], "p90": r.steps.to_participant[1], "p99": r.steps.to_participant[2],
            },
            "participant_began_to_sagad_got_reply": {
                "p50": r.steps.to_sagad[0], "p90": r.steps.to_sagad[1], "p99": r.steps.to_sagad[2],
            },
        },
    })
}

fn print_table(results: &[ScenarioResult], raw: Option<&RawLimits>) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "scenario",
        "load",
        "done",
        "failed",
        "sagas/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "sagad CPU ms/saga",
        "sagad cores",
        "sagad peak RSS MiB",
        "% of limit",
    ]);
    for r in results {
        let load = match r.scenario.rate {
            Some(rate) => format!("open {rate}/s"),
            None => format!("{} in flight", r.scenario.in_flight),
        };
        let limit = raw
            .map(|raw| {
                format!(
                    "{:.0}%",
                    100.0 * r.per_s() / raw.pipeline_limit(r.scenario.variant)
                )
            })
            .unwrap_or_else(|| "-".into());
        t.add_row(vec![
            r.scenario.label.clone(),
            load,
            r.load.ok.to_string(),
            r.load.failed.to_string(),
            format!("{:.0}", r.per_s()),
            format!("{:.1}", r.load.ms(0.50)),
            format!("{:.1}", r.load.ms(0.90)),
            format!("{:.1}", r.load.ms(0.99)),
            format!("{:.1}", r.load.latency.max() as f64 / 1000.0),
            format!("{:.3}", 1000.0 * r.cpu_per_saga()),
            format!(
                "{:.2}",
                r.sagad_cpu_s / r.load.elapsed.as_secs_f64().max(1e-9)
            ),
            format!("{:.1}", r.sagad_peak_rss_kib as f64 / 1024.0),
            limit,
        ]);
    }
    println!("{t}");

    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "scenario",
        "CPU ms/saga: sagad",
        "demo",
        "postgres",
        "rabbitmq",
        "bench",
        "other",
        "machine",
        "PG write xacts/saga",
        "WAL KiB/saga",
    ]);
    for r in results {
        let per = r.load.ok.max(1) as f64;
        let ms = |x: f64| format!("{:.3}", 1000.0 * x / per);
        t.add_row(vec![
            r.scenario.label.clone(),
            ms(r.cpu.sagad),
            ms(r.cpu.demo),
            ms(r.cpu.postgres),
            ms(r.cpu.rabbitmq),
            ms(r.cpu.bench),
            ms(r.cpu.other),
            ms(r.cpu.machine),
            format!("{:.1}", r.pg_write_xacts as f64 / per),
            format!("{:.1}", r.pg_wal_bytes as f64 / per / 1024.0),
        ]);
    }
    println!("where the CPU went (whole machine, measured phase):\n{t}");

    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "scenario",
        "steps",
        "sagad sent → participant began, p50/p90/p99 ms",
        "participant began → sagad got reply, p50/p90/p99 ms",
        "outbox backlog mean / max",
    ]);
    for r in results {
        let f = |v: [f64; 3]| format!("{:.1} / {:.1} / {:.1}", v[0], v[1], v[2]);
        t.add_row(vec![
            r.scenario.label.clone(),
            r.steps.steps.to_string(),
            f(r.steps.to_participant),
            f(r.steps.to_sagad),
            format!("{:.1} / {}", r.outbox_backlog.0, r.outbox_backlog.1),
        ]);
    }
    println!("where a step's time went (from the timestamps sagad and the demo store):\n{t}");
    for r in results {
        if r.cpu.other / r.load.elapsed.as_secs_f64().max(1e-9) > 0.1 {
            println!(
                "note: {}: other processes used {:.2} cores during the measurement; treat its figures as provisional",
                r.scenario.label,
                r.cpu.other / r.load.elapsed.as_secs_f64().max(1e-9)
            );
        }
        if r.load.failed > 0 {
            println!(
                "FAILED: {}: {} sagas did not end as expected, e.g. {:?}",
                r.scenario.label, r.load.failed, r.load.reasons
            );
        }
    }
}

fn print_raw(raw: &RawLimits, variants: &[Variant]) {
    println!(
        "raw limits (synchronous_commit={}, fsync={}):",
        raw.synchronous_commit, raw.fsync
    );
    println!(
        "  RabbitMQ: {:.0} confirmed persistent round trips/s (publish+confirm → consume+ack → reply+confirm → consume+ack, durable queues); one at a time: {:.0}/s = {:.2} ms each",
        raw.rabbit_rt_per_s,
        raw.rabbit_rt_per_s_serial,
        1000.0 / raw.rabbit_rt_per_s_serial.max(1e-9)
    );
    for (c, rate) in &raw.pg_commits {
        println!(
            "  PostgreSQL: {rate:.0} single-row durable commits/s with {c} connection{} ({:.2} ms per commit per connection)",
            if *c == 1 { "" } else { "s" },
            1000.0 * *c as f64 / rate.max(1e-9)
        );
    }
    for v in variants {
        println!(
            "  pipeline limit, variant {}: min({:.0} / {} commands, {:.0} / {} commits) = {:.0} sagas/s",
            v.name(),
            raw.rabbit_rt_per_s,
            v.commands(),
            raw.pg_best(),
            v.commits(),
            raw.pipeline_limit(*v)
        );
    }
    println!(
        "  (commands = command round trips per saga; commits = sagad transitions (1 start + 1 per reply) + 1 participant commit per command)"
    );
    for v in variants {
        if let Some(floor) = raw.serial_floor_ms(*v) {
            println!(
                "  one saga alone, variant {}: about {floor:.1} ms if its {} round trips and {} commits each waited as long as in the one-at-a-time probes (indicative only)",
                v.name(),
                v.commands(),
                v.commits()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn locate(explicit: Option<PathBuf>, built: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = explicit.unwrap_or_else(|| PathBuf::from(built));
    if !path.is_file() {
        bail!(
            "{name} not found at {} (build it with `cargo build --release --bins` and pass --{name}-bin)",
            path.display()
        );
    }
    Ok(path)
}

/// The `saga-demo` of this build. It is another package's binary, which `cargo bench` does not
/// build for this target (and cargo names only the package's own binaries in
/// `CARGO_BIN_EXE_*`), so a benchmark run builds it with the same cargo, in release mode, into the
/// same target dir: a no-op when it is fresh. The smoke run under `cargo test` takes the debug
/// one, which `cargo test` at the root builds (saga-demo has integration tests of its own).
fn built_demo(smoke: bool) -> anyhow::Result<PathBuf> {
    // This program is target/<profile>/deps/saga_bench-<hash>.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench binary is not in target/<profile>/deps")?;
    if let (false, Some(cargo), Some(target_dir)) =
        (smoke, std::env::var_os("CARGO"), profile_dir.parent())
    {
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "saga-demo",
                "--bin",
                "saga-demo",
            ])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .context("cannot run cargo to build saga-demo")?;
        if !status.success() {
            bail!("cargo could not build saga-demo ({status})");
        }
    }
    locate(
        None,
        &profile_dir.join("saga-demo").to_string_lossy(),
        "demo",
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let args = if smoke {
        eprintln!(
            "saga_bench: no --bench argument (run by `cargo test`?): smoke run on the binaries of this build; figures are meaningless, only failures count"
        );
        smoke_args()
    } else {
        parse_args()
    };
    let result = tokio::select! {
        r = run(args, smoke) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("saga_bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs everything; false if any saga failed.
async fn run(args: Args, smoke: bool) -> anyhow::Result<bool> {
    let sagad_bin = locate(args.sagad_bin.clone(), env!("CARGO_BIN_EXE_sagad"), "sagad")?;
    let demo_bin = match args.demo_bin.clone() {
        Some(explicit) => locate(Some(explicit), "", "demo")?,
        None => built_demo(smoke)?,
    };
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_string();
    let logs = std::env::temp_dir().join(format!("saga-bench-{run_id}"));
    std::fs::create_dir_all(&logs)?;
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let machine = machine_info();
    eprintln!(
        "saga_bench {run_id}: sagad {}, demo {}, logs in {}",
        sagad_bin.display(),
        demo_bin.display(),
        logs.display()
    );
    eprintln!("machine: {machine}");
    let mut ctx = Ctx {
        args: args.clone(),
        sagad_bin,
        demo_bin,
        definitions: Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas"),
        logs: logs.clone(),
        run_id,
        template: None,
    };

    let outcome = async {
        let mut report = json!({
            "started_at": started_at,
            "machine": machine,
            "mode": if smoke { "smoke" } else if args.quick { "quick" } else { "custom" },
            "args": {
                "sagas": args.sagas, "in_flight": args.in_flight, "warmup": args.warmup,
                "rate": args.rate, "single": args.single, "connections": args.connections,
                "raw_duration_s": args.raw_duration.as_secs_f64(), "preload": args.preload,
                "hold": args.hold, "sagad_args": args.sagad_args, "demo_args": args.demo_args,
            },
        });
        if let Some(n) = args.hold {
            let held = hold(&ctx, n).await?;
            println!("hold: {held}");
            report["hold"] = held;
            return anyhow::Ok((report, true));
        }

        let variants: Vec<Variant> = match args.variant {
            VariantArg::A => vec![Variant::A],
            VariantArg::B => vec![Variant::B],
            VariantArg::Both => vec![Variant::A, Variant::B],
        };
        let raw = if args.raw_duration.is_zero() {
            None
        } else {
            let raw = raw_limits(&ctx).await?;
            print_raw(&raw, &variants);
            Some(raw)
        };
        let _template = match args.preload {
            Some(n) if n > 0 => {
                let env = prepare_preload(&ctx, n).await?;
                ctx.template = Some(env.name.clone());
                Some(env)
            }
            _ => None,
        };

        let mut scenarios: Vec<Scenario> = variants
            .iter()
            .map(|&v| Scenario {
                label: format!(
                    "{}{}",
                    v.name(),
                    match args.rate {
                        Some(r) => format!("-open{r}"),
                        None => format!("-c{}", args.in_flight),
                    }
                ),
                variant: v,
                sagas: args.sagas,
                in_flight: args.in_flight,
                rate: args.rate,
                warmup: args.warmup,
            })
            .collect();
        if args.single > 0 && (args.in_flight != 1 || args.rate.is_some()) {
            scenarios.push(Scenario {
                label: "A-single".into(),
                variant: Variant::A,
                sagas: args.single,
                in_flight: 1,
                rate: None,
                warmup: args.warmup.min(20),
            });
        }
        let mut results = Vec::new();
        for sc in &scenarios {
            let r = run_scenario(&ctx, sc).await?;
            eprintln!(
                "   {}: {} ok, {} failed, {:.0} sagas/s, p50 {:.1} ms, p99 {:.1} ms",
                sc.label,
                r.load.ok,
                r.load.failed,
                r.per_s(),
                r.load.ms(0.5),
                r.load.ms(0.99)
            );
            results.push(r);
        }
        print_table(&results, raw.as_ref());
        if let Some(raw) = &raw {
            report["raw_limits"] = json!({
                "rabbitmq_round_trips_per_s": round(raw.rabbit_rt_per_s, 1),
                "rabbitmq_round_trips_per_s_one_in_flight": round(raw.rabbit_rt_per_s_serial, 1),
                "single_saga_floor_ms": {
                    "A": raw.serial_floor_ms(Variant::A).map(|f| round(f, 2)),
                    "B": raw.serial_floor_ms(Variant::B).map(|f| round(f, 2)),
                },
                "pg_commits_per_s": raw.pg_commits.iter()
                    .map(|(c, r)| json!({"connections": c, "commits_per_s": round(*r, 1)}))
                    .collect::<Vec<_>>(),
                "synchronous_commit": raw.synchronous_commit,
                "fsync": raw.fsync,
                "formula": "limit = min(rabbitmq_round_trips_per_s / commands_per_saga, max(pg_commits_per_s) / commits_per_saga); commits_per_saga = (1 start + 1 per reply) sagad transitions + 1 participant commit per command",
                "commands_per_saga": {"A": Variant::A.commands(), "B": Variant::B.commands()},
                "commits_per_saga": {"A": Variant::A.commits(), "B": Variant::B.commits()},
            });
        }
        report["scenarios"] = results
            .iter()
            .map(|r| scenario_json(r, raw.as_ref()))
            .collect();
        let ok = results.iter().all(|r| r.load.failed == 0);
        Ok((report, ok))
    }
    .await;

    let (report, ok) = match outcome {
        Ok(v) => v,
        Err(e) => {
            eprintln!("logs kept in {}", logs.display());
            return Err(e);
        }
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if ok && !args.keep_logs {
        let _ = std::fs::remove_dir_all(&logs);
    } else {
        eprintln!("logs kept in {}", logs.display());
    }
    if !ok {
        eprintln!("saga_bench: some sagas did not end as expected");
    }
    Ok(ok)
}
