//! `sagactl`: the command-line client for sagad's gRPC API.

use std::error::Error as _;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use saga::cli;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use saga::proto::v1::{GetSagaRequest, ListSagasRequest, SagaStatus, StartSagaRequest};
use serde_json::Value;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Start, inspect and list sagas on a sagad server.
#[derive(Debug, Parser)]
#[command(name = "sagactl", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Command,
}

const GLOBAL: &str = "Global options";

/// Flags every subcommand accepts.
#[derive(Debug, Args)]
struct Global {
    /// sagad's gRPC address.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "SAGA_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    server: String,

    /// Bearer token sent with every call.
    // The value is never echoed: not in --help, not in errors.
    #[arg(long, global = true, help_heading = GLOBAL, env = "SAGA_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Output format: human-readable tables, or one JSON document.
    #[arg(long, global = true, help_heading = GLOBAL, value_enum, default_value_t = Output::Table)]
    output: Output,

    /// Deadline for connecting and for each call, e.g. 500ms, 10s, 1m.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        default_value = "10s",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a saga from the newest loaded version of a definition.
    Start(StartArgs),
    /// Show a saga: its state, every step attempt and its history.
    Show(ShowArgs),
    /// List sagas, newest first.
    List(ListArgs),
}

#[derive(Debug, Args)]
struct StartArgs {
    /// Definition name, e.g. order_fulfillment.
    definition: String,

    /// The saga's input, a JSON object [default: {}].
    #[arg(long, value_name = "JSON", conflicts_with = "input_file")]
    input: Option<String>,

    /// Read the input JSON object from a file ("-" for stdin).
    #[arg(long, value_name = "PATH")]
    input_file: Option<PathBuf>,

    /// Makes retries safe: the same key always yields the same saga.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The saga's id.
    saga_id: String,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only sagas in this status; repeat or separate with commas for several.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STATUS")]
    status: Vec<StatusFilter>,

    /// Only sagas of this definition.
    #[arg(long, value_name = "NAME")]
    definition: Option<String>,

    /// Page size, 1 to 500 [server default: 50].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=500))]
    limit: Option<u32>,

    /// Continue from a previous page ("next page: --page-token ...").
    #[arg(long, value_name = "TOKEN")]
    page_token: Option<String>,

    /// Fetch every page, not just one.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatusFilter {
    Running,
    Compensating,
    Completed,
    Compensated,
    #[value(name = "needs_operator", alias = "needs-operator")]
    NeedsOperator,
}

impl From<StatusFilter> for SagaStatus {
    fn from(status: StatusFilter) -> Self {
        match status {
            StatusFilter::Running => SagaStatus::Running,
            StatusFilter::Compensating => SagaStatus::Compensating,
            StatusFilter::Completed => SagaStatus::Completed,
            StatusFilter::Compensated => SagaStatus::Compensated,
            StatusFilter::NeedsOperator => SagaStatus::NeedsOperator,
        }
    }
}

type Client = SagaServiceClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Cli::parse();
    let result = match run(args).await {
        Ok(text) => write_stdout(&text),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` puts the whole context chain on the one line scripts expect.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand and returns what to print, so nothing half-written reaches stdout on
/// failure.
async fn run(args: Cli) -> anyhow::Result<String> {
    let global = &args.global;
    match args.command {
        Command::Start(cmd) => start(global, cmd).await,
        Command::Show(cmd) => show(global, cmd).await,
        Command::List(cmd) => list(global, cmd).await,
    }
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // The reader went away (`sagactl list | head`): not an error worth reporting.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// Subcommands call this only after their local checks, so a bad flag is reported as such
/// even when the server is down.
async fn connect(global: &Global) -> anyhow::Result<Client> {
    let server = global.server.as_str();
    if server.starts_with("https://") {
        bail!("TLS is not supported yet: use an http:// --server URL");
    }
    if !server.starts_with("http://") {
        bail!("invalid --server URL {server:?}: expected http://HOST:PORT");
    }
    let auth = match &global.token {
        None => Auth(None),
        Some(token) => {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| anyhow!("--token contains characters not allowed in a header"))?;
            Auth(Some(value))
        }
    };
    let endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|e| anyhow!("invalid --server URL {server:?}: {}", cli::error_chain(&e)))?
        .connect_timeout(global.timeout)
        .timeout(global.timeout);
    // Connecting eagerly turns "nothing listens there" into one clear message instead of an
    // UNAVAILABLE status from the first call.
    let channel = endpoint.connect().await.map_err(|e| {
        // The outermost error only says "transport error"; the cause is in its sources.
        let cause = e.source().unwrap_or(&e);
        anyhow!(
            "cannot reach sagad at {server}: {}",
            cli::error_chain(cause)
        )
    })?;
    Ok(SagaServiceClient::with_interceptor(channel, auth))
}

impl Global {
    /// Turns a failed call into the one-line error the user sees.
    fn api_error(&self, status: tonic::Status) -> anyhow::Error {
        if cli::is_client_timeout(&status) {
            anyhow!(
                "no answer from sagad at {} within {} (see --timeout)",
                self.server,
                humantime::format_duration(self.timeout)
            )
        } else {
            anyhow!(cli::describe_status(&status))
        }
    }
}

fn render_json(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

async fn start(global: &Global, cmd: StartArgs) -> anyhow::Result<String> {
    let (input_json, label) = match (&cmd.input, &cmd.input_file) {
        (Some(text), _) => (text.clone(), "--input".to_owned()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            (read_input_file(path)?, "the input on stdin".to_owned())
        }
        (None, Some(path)) => (
            read_input_file(path)?,
            format!("the input file {}", path.display()),
        ),
        (None, None) => ("{}".to_owned(), "the input".to_owned()),
    };
    cli::check_input_object(&input_json).map_err(|e| anyhow!("{label} {e}"))?;

    let resp = connect(global)
        .await?
        .start_saga(StartSagaRequest {
            definition: cmd.definition,
            input_json,
            idempotency_key: cmd.idempotency_key.unwrap_or_default(),
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::start_table(&resp),
        Output::Json => render_json(&cli::start_json(&resp)),
    })
}

fn read_input_file(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the input from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the input file {}", path.display()))
}

async fn show(global: &Global, cmd: ShowArgs) -> anyhow::Result<String> {
    let saga = connect(global)
        .await?
        .get_saga(GetSagaRequest {
            saga_id: cmd.saga_id,
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::saga_table(&saga),
        Output::Json => render_json(&cli::saga_json(&saga)),
    })
}

async fn list(global: &Global, cmd: ListArgs) -> anyhow::Result<String> {
    let mut request = ListSagasRequest {
        statuses: cmd
            .status
            .iter()
            .map(|&s| SagaStatus::from(s) as i32)
            .collect(),
        definition: cmd.definition.unwrap_or_default(),
        page_size: cmd.limit.unwrap_or(0),
        page_token: cmd.page_token.unwrap_or_default(),
        ..Default::default()
    };
    let mut client = connect(global).await?;
    let mut sagas = Vec::new();
    let next_page_token = loop {
        let page = client
            .list_sagas(request.clone())
            .await
            .map_err(|e| global.api_error(e))?
            .into_inner();
        sagas.extend(page.sagas);
        if !cmd.all || page.next_page_token.is_empty() {
            break page.next_page_token;
        }
        // A server handing back the token it was given would make --all loop forever.
        if page.next_page_token == request.page_token {
            bail!("the server returned the same page token twice; stopping --all");
        }
        request.page_token = page.next_page_token;
    };
    Ok(match global.output {
        Output::Table => cli::list_table(&sagas, &next_page_token),
        Output::Json => render_json(&cli::list_json(&sagas, &next_page_token)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn status_filter_accepts_repeats_and_commas() {
        let cli = Cli::try_parse_from([
            "sagactl",
            "list",
            "--status",
            "running,needs_operator",
            "--status",
            "compensated",
        ])
        .unwrap();
        let Command::List(list) = cli.command else {
            panic!("expected list");
        };
        assert_eq!(
            list.status,
            [
                StatusFilter::Running,
                StatusFilter::NeedsOperator,
                StatusFilter::Compensated
            ]
        );
    }

    #[test]
    fn input_and_input_file_conflict() {
        let err = Cli::try_parse_from([
            "sagactl",
            "start",
            "order",
            "--input",
            "{}",
            "--input-file",
            "x.json",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
