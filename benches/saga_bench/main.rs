//! `saga_bench`: end-to-end figures for sagad on this machine's PostgreSQL and RabbitMQ.
//!
//! `cargo bench --bench saga_bench -- [--quick] [--json PATH] ...` (see `--help` and
//! `docs/benchmarks.md`). Cargo builds `sagad` with the bench profile (release optimisations)
//! for this target, the program builds `saga-demo` likewise, and it runs them as separate
//! processes, each scenario in a fresh database and a fresh RabbitMQ vhost (the testkit's
//! `TestEnv`), removed afterwards.
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
use std::path::{Path, PathBuf};
use std::process::Command;
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
use saga_testkit::env::{Options, PG, TestEnv};
use saga_testkit::process::{Proc, free_addr};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection as _, Row};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

mod args;
mod events;
mod load;
mod measure;
mod output;
mod processes;
mod raw;
mod scale;
mod scenario;
mod workload;

use args::*;
use events::*;
use load::*;
use measure::*;
use output::*;
use processes::*;
use raw::*;
use scale::*;
use scenario::*;
use workload::*;

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
    let profile_dir = saga_testkit::bins::profile_dir();
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
        "saga_bench {run_id}: sagad {}, demo {} ({:?} participants), logs in {}",
        sagad_bin.display(),
        demo_bin.display(),
        args.participants,
        logs.display()
    );
    eprintln!("machine: {machine}");
    let mut ctx = Ctx {
        args: args.clone(),
        sagad_bin,
        demo_bin,
        definitions: args
            .definitions
            .clone()
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas")),
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
                "hold": args.hold, "sagad_args": args.sagad_args,
                "participants": format!("{:?}", args.participants).to_lowercase(), "demo_args": args.demo_args,
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
            VariantArg::F => vec![Variant::F],
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
                "commands_per_saga": {"A": Variant::A.commands(), "B": Variant::B.commands(), "F": Variant::F.commands()},
                "commits_per_saga": {"A": Variant::A.commits(), "B": Variant::B.commits(), "F": Variant::F.commits()},
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
