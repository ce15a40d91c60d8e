//! The command line: every option, and the tiny smoke run `cargo test` gets.

use super::*;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "saga_bench",
    about = "End-to-end benchmark of sagad with the demo participants on the local PostgreSQL and RabbitMQ",
    after_help = "Run through cargo: cargo bench --bench saga_bench -- [OPTIONS]. See docs/benchmarks.md."
)]
pub(crate) struct Args {
    /// Sagas measured per scenario (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    pub(crate) sagas: usize,
    /// Sagas in flight (closed loop: a new saga starts when one ends). Also the concurrency of
    /// the raw-limit probes.
    #[arg(long, default_value_t = 64)]
    pub(crate) in_flight: usize,
    /// Sagas run before each measured phase, not counted.
    #[arg(long, default_value_t = 200)]
    pub(crate) warmup: usize,
    /// Which workload: a (all steps succeed), b (delivery fails: refund, cancel), or both (a and
    /// b); f runs food_delivery instead (parallel branches, a coupon on half of the sagas),
    /// which needs a sagad that runs graph definitions.
    #[arg(long, value_enum, default_value = "both")]
    pub(crate) variant: VariantArg,
    /// Who answers the commands: the demo services (each command one PostgreSQL transaction
    /// with its de-duplication record), or noop (a success at once, no database work: the
    /// no-op steps other engines are benchmarked with). Replies are confirmed either way.
    #[arg(long, value_enum, default_value = "demo")]
    pub(crate) participants: ParticipantsArg,
    /// Store the run's classic queues in this format (1: RabbitMQ 3.10's default, 2: the newer
    /// one), by a `queue-version` policy on the run's vhost set before anything declares them.
    #[arg(long)]
    pub(crate) queue_type: Option<String>,
    /// Open loop: start sagas at this fixed rate (per second) instead of keeping --in-flight
    /// going; latency counts from each saga's scheduled start (no coordinated omission).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Sagas of the single-saga latency scenario (variant A, one in flight); 0 skips it.
    #[arg(long, default_value_t = 200)]
    pub(crate) single: usize,
    /// Duration of each raw-limit probe (RabbitMQ round trips, PostgreSQL commits); 0s skips them.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) raw_duration: Duration,
    /// The smallest scenario, for CI: 200 sagas, 16 in flight, 50 warm-up, 50 single, 1s probes
    /// (options given explicitly still win).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub(crate) json: Option<PathBuf>,
    /// Before each scenario, store this many finished sagas (rows in sagas, step_attempts and
    /// saga_history, inserted with SQL) in its database.
    #[arg(long, value_name = "N")]
    pub(crate) preload: Option<u64>,
    /// Instead of the throughput scenarios: start N sagas with no participant running (and reply
    /// timeouts of 24h) and sample sagad's RSS at 100, 1,000, 10,000, 100,000 and N in flight.
    #[arg(long, value_name = "N")]
    pub(crate) hold: Option<usize>,
    /// gRPC connections the starting tasks share.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// A saga not ended after this long counts as failed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// The sagad executable (default: the one cargo built for this bench).
    #[arg(long)]
    pub(crate) sagad_bin: Option<PathBuf>,
    /// The saga-demo executable (default: the one cargo built for this bench).
    #[arg(long)]
    pub(crate) demo_bin: Option<PathBuf>,
    /// The saga definitions sagad loads (default: the repository's sagas/). A build that predates
    /// a definition there needs a directory without it to be compared.
    #[arg(long, value_name = "DIR")]
    pub(crate) definitions: Option<PathBuf>,
    /// Extra argument for sagad, repeatable, e.g. --sagad-arg=--db-max-connections=32.
    #[arg(long = "sagad-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) sagad_args: Vec<String>,
    /// Extra argument for saga-demo, repeatable, e.g. --demo-arg=--prefetch=128.
    #[arg(long = "demo-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) demo_args: Vec<String>,
    /// Keep the process logs (always kept when something fails).
    #[arg(long)]
    pub(crate) keep_logs: bool,
    /// Keep the databases and vhosts (for inspection); they are named in the output.
    #[arg(long)]
    pub(crate) keep_env: bool,
    /// Passed by `cargo bench`; without it (as under `cargo test`) a smoke run is made.
    #[arg(long, hide = true)]
    pub(crate) bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ParticipantsArg {
    Demo,
    Noop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum VariantArg {
    A,
    B,
    Both,
    F,
}

/// Parses the arguments; `--quick` changes the defaults of the options not given explicitly.
pub(crate) fn parse_args() -> Args {
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
pub(crate) fn smoke_args() -> Args {
    let mut args = Args::parse_from(["saga_bench"]);
    args.sagas = 40;
    args.in_flight = 8;
    args.warmup = 8;
    args.single = 5;
    args.raw_duration = Duration::from_millis(300);
    args.timeout = Duration::from_secs(60);
    args
}
