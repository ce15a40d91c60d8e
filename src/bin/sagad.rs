//! `sagad`: the saga orchestrator server.
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use saga::app::Application;
use saga::config::{Settings, redact_url};
use saga::definition;
use saga::store::Store;
use tokio_util::sync::CancellationToken;

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
    /// Validate the definition files and exit.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn,h2=warn,tower=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// SIGINT or SIGTERM cancels the token; a second signal is left to the default handler.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        token.cancel();
    });
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let settings = cli.settings;
    let result: anyhow::Result<()> = async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let shutdown = CancellationToken::new();
                cancel_on_signal(shutdown.clone());
                let app = Application::build(settings, shutdown).await?;
                app.run_until_stopped().await;
            }
            Command::Migrate => {
                tracing::info!(database = %redact_url(&settings.database_url), "migrating");
                let store = Store::connect(&settings.database_url, 1).await?;
                store.migrate().await?;
                tracing::info!("database is up to date");
            }
            Command::Check => {
                let defs = definition::load_dir(&settings.definitions)?;
                for d in defs {
                    println!(
                        "{} v{}: {} steps, pivot {}",
                        d.name,
                        d.version,
                        d.steps.len(),
                        d.steps[d.pivot].name
                    );
                }
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sagad: {e:#}");
            ExitCode::FAILURE
        }
    }
}
