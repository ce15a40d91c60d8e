//! `sagad`: the saga orchestrator server.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use saga::app::{Application, StartupError};
use saga::config::{Settings, redact_url};
use saga::store::Store;
use saga::telemetry::Telemetry;
use saga::{definition, explore};
use tokio_util::sync::CancellationToken;

// glibc's allocator spent about a seventh of sagad's CPU under load (every reply and command is
// a burst of short-lived JSON values and buffers); mimalloc's thread-local free lists cost less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "The saga orchestrator: gRPC API, PostgreSQL state, RabbitMQ commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
    /// Log format.
    #[arg(long, env = "SAGA_LOG_FORMAT", default_value = "text", global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the definition files, prove every failure of each ends consistent, and exit.
    ///
    /// The proof drives the real engine, without I/O, through every order in which replies,
    /// failures and timeouts can arrive, and fails if any path leaves a completed step
    /// uncompensated, compensates out of order, sends a skipped step's command or never ends.
    Check {
        /// Also print, per failure point, what is compensated in which order and how it ends.
        #[arg(long)]
        explain: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = Telemetry::init("sagad", matches!(cli.log_format, LogFormat::Json));
    let settings = cli.settings;
    let result: anyhow::Result<()> = async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let shutdown = CancellationToken::new();
                saga::app::cancel_on_signal(shutdown.clone());
                let app = Application::build(settings, shutdown).await?;
                app.run_until_stopped().await;
            }
            Command::Migrate => {
                settings.validate_database()?;
                tracing::info!(database = %redact_url(&settings.database_url), "migrating");
                let store = Store::connect(&settings.database_url, 1).await?;
                store.migrate().await?;
                tracing::info!("database is up to date");
            }
            Command::Check { explain } => check(&settings.definitions, explain)?,
        }
        Ok(())
    }
    .await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on stderr: the log lines go to stdout, and the same error in both read as
            // two failures.
            eprintln!("sagad: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

fn check(dir: &std::path::Path, explain: bool) -> anyhow::Result<()> {
    let defs = definition::load_dir(dir)?;
    // `serve` would refuse an empty directory: so does the check that precedes it.
    if defs.is_empty() {
        return Err(StartupError::NoDefinitions(dir.display().to_string()).into());
    }
    let mut failed = Vec::new();
    for d in &defs {
        let report = explore::check(d);
        let verdict = if report.ok() {
            "every failure ends consistent"
        } else {
            "FAILED"
        };
        println!(
            "{} v{}: {} steps, pivot {}: {verdict} ({} states, {} ends explored)",
            d.name,
            d.version,
            d.steps.len(),
            d.steps.get(d.pivot).map_or("?", |s| s.name.as_str()),
            report.states,
            report.ends
        );
        if explain || !report.ok() {
            // The report's own first line repeats the verdict above.
            for line in report.to_string().lines().skip(1) {
                println!("{line}");
            }
        }
        if !report.ok() {
            failed.push(format!("{} v{}", d.name, d.version));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "not every failure of {} ends consistent (see above)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The error and its causes, each said once: most errors here quote their source in their own
/// message, which `{:#}` would then repeat.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
