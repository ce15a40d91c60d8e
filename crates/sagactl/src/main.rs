//! `sagactl`: the command-line client for sagad's gRPC API.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::error::Error as _;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use saga_proto::v1::admin_service_client::AdminServiceClient;
use saga_proto::v1::saga_service_client::SagaServiceClient;
use saga_proto::v1::{
    CountSagasRequest, GetDefinitionRequest, GetSagaRequest, ListDefinitionsRequest,
    ListParticipantsRequest, ParticipantRequest, RedriveRequest, RepairRequest, Saga,
    SkipStepRequest, StartSagaRequest, WatchSagaRequest,
};
use sagactl::cli::{self, FilterArgs, RedriveOutcome};
use serde_json::Value;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Start, inspect, list and repair sagas on a sagad server.
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
    token: Option<Token>,

    /// Output format: human-readable tables, or JSON (one document; `watch`: one object per
    /// line).
    #[arg(long, global = true, help_heading = GLOBAL, value_enum, default_value_t = Output::Table)]
    output: Output,

    /// Deadline for connecting and for each call (for `watch` and `redrive`: until the stream
    /// starts), e.g. 500ms, 10s, 1m.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        default_value = "10s",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    timeout: Duration,

    /// PEM certificate (or CA) to trust for an https:// --server, e.g. sagad's self-signed one;
    /// without it the system's roots are not consulted and https needs this flag.
    #[arg(long, global = true, help_heading = GLOBAL, env = "SAGA_CA_CERT", value_name = "PATH")]
    ca_cert: Option<PathBuf>,
}

/// The bearer token; `Debug` does not show it.
#[derive(Clone)]
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Token(s.to_owned()))
    }
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
    /// Follow a saga's history as it happens, until the saga ends.
    Watch(WatchArgs),
    /// Re-send a current step's command (or compensation) now, as a new attempt.
    Retry(RepairArgs),
    /// Mark a current step done by hand and let the saga continue.
    Skip(SkipArgs),
    /// Abort a running saga (at or before its pivot) and compensate what it completed.
    Compensate(RepairArgs),
    /// Close a saga in needs_operator after fixing it by hand (status resolved).
    Resolve(RepairArgs),
    /// Retry the current step of every saga matching a filter, after a dry run and confirmation.
    Redrive(RedriveArgs),
    /// List participants: paused or not, circuit breaker, held commands.
    Participants,
    /// Hold every command to a participant (nothing fails; they wait) until resumed.
    Pause(PauseArgs),
    /// Let commands flow to a paused participant again.
    Resume(ResumeArgs),
    /// Count sagas by status, and unfinished ones by step with how long they have waited.
    Counts(CountsArgs),
    /// List every definition version sagad knows, with its unfinished sagas.
    Definitions(DefinitionsArgs),
    /// Show a definition's steps as a graph: who does what, after which steps, on which
    /// condition, with which input.
    // `--version` picks the definition's version here, not sagactl's.
    #[command(disable_version_flag = true)]
    Definition(DefinitionArgs),
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
    #[command(flatten)]
    filter: FilterArgs,

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

#[derive(Debug, Args)]
struct WatchArgs {
    /// The saga's id.
    saga_id: String,

    /// Only events after this sequence number (to resume an interrupted watch).
    #[arg(long, value_name = "N", default_value_t = 0)]
    after_seq: i64,
}

#[derive(Debug, Args)]
struct RepairArgs {
    /// The saga's id.
    saga_id: String,

    /// Why: recorded in the saga's history with your token's name.
    #[arg(long, value_name = "TEXT", value_parser = cli::parse_reason)]
    reason: String,

    /// The step to act on, when the saga has several current steps (parallel branches).
    /// Ignored by `compensate`.
    #[arg(long, value_name = "NAME", default_value = "")]
    step: String,
}

#[derive(Debug, Args)]
struct SkipArgs {
    #[command(flatten)]
    repair: RepairArgs,

    /// The output the step would have produced, any JSON value [default: null]. Ignored when
    /// the current step is a compensation.
    #[arg(long, value_name = "JSON")]
    step_output: Option<String>,
}

#[derive(Debug, Args)]
struct RedriveArgs {
    #[command(flatten)]
    filter: FilterArgs,

    /// Why: recorded in each retried saga's history with your token's name.
    #[arg(long, value_name = "TEXT", value_parser = cli::parse_reason)]
    reason: String,

    /// Only show which sagas would be retried.
    #[arg(long)]
    dry_run: bool,

    /// Sagas retried per transaction, 1 to 1000 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch_size: Option<u32>,

    /// Retry at most this many sagas (the oldest matching ones).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,

    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(Debug, Args)]
struct PauseArgs {
    /// The participant's name, as in the definitions.
    participant: String,

    /// Why: shown by `sagactl participants`.
    #[arg(long, value_name = "TEXT", value_parser = cli::parse_reason)]
    reason: String,
}

#[derive(Debug, Args)]
struct ResumeArgs {
    /// The participant's name, as in the definitions.
    participant: String,

    /// Why [default: resumed].
    #[arg(long, value_name = "TEXT", value_parser = cli::parse_reason)]
    reason: Option<String>,
}

#[derive(Debug, Args)]
struct CountsArgs {
    /// Only sagas of this definition.
    #[arg(long, value_name = "NAME")]
    definition: Option<String>,
}

#[derive(Debug, Args)]
struct DefinitionsArgs {
    /// Only the versions of this definition.
    name: Option<String>,
}

#[derive(Debug, Args)]
struct DefinitionArgs {
    /// The definition's name, e.g. order_fulfillment.
    name: String,

    /// Which version [default: the one new sagas start on, or the newest if all are retired].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    version: Option<u32>,
}

/// A connection to sagad that authenticates every call; both services' clients wrap it.
type Api = InterceptedService<Channel, Auth>;

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
        Command::Watch(cmd) => watch(global, cmd).await,
        Command::Retry(cmd) => retry(global, cmd).await,
        Command::Skip(cmd) => skip(global, cmd).await,
        Command::Compensate(cmd) => compensate(global, cmd).await,
        Command::Resolve(cmd) => resolve(global, cmd).await,
        Command::Redrive(cmd) => redrive(global, cmd).await,
        Command::Participants => participants(global).await,
        Command::Pause(cmd) => pause(global, cmd).await,
        Command::Resume(cmd) => resume(global, cmd).await,
        Command::Counts(cmd) => counts(global, cmd).await,
        Command::Definitions(cmd) => definitions(global, cmd).await,
        Command::Definition(cmd) => definition(global, cmd).await,
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
async fn connect(global: &Global) -> anyhow::Result<Api> {
    let server = global.server.as_str();
    let https = server.starts_with("https://");
    if !https && !server.starts_with("http://") {
        bail!("invalid --server URL {server:?}: expected http://HOST:PORT or https://HOST:PORT");
    }
    let auth = match &global.token {
        None => Auth(None),
        Some(Token(token)) => {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| anyhow!("--token contains characters not allowed in a header"))?;
            Auth(Some(value))
        }
    };
    let endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|e| anyhow!("invalid --server URL {server:?}: {}", cli::error_chain(&e)))?
        .connect_timeout(global.timeout)
        .timeout(global.timeout);
    let endpoint = match (https, &global.ca_cert) {
        (false, _) => endpoint,
        (true, None) => {
            bail!("an https:// --server needs --ca-cert PATH (the certificate to trust)")
        }
        (true, Some(path)) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            endpoint
                .tls_config(tls)
                .map_err(|e| anyhow!("TLS configuration: {}", cli::error_chain(&e)))?
        }
    };
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
    Ok(InterceptedService::new(channel, auth))
}

/// Largest answer accepted. A saga carries its input (up to 256 KiB) and every reply's output
/// (up to 1 MiB each) in its attempts and again in its history, so a few large steps already
/// exceed tonic's default of 4 MiB; repairs answer with the saga too.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

async fn sagas(global: &Global) -> anyhow::Result<SagaServiceClient<Api>> {
    Ok(
        SagaServiceClient::new(connect(global).await?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
    )
}

async fn admin(global: &Global) -> anyhow::Result<AdminServiceClient<Api>> {
    Ok(AdminServiceClient::new(connect(global).await?)
        .max_decoding_message_size(MAX_RESPONSE_BYTES))
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

    let resp = sagas(global)
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
    let saga = sagas(global)
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
    let mut request = cmd.filter.to_request().map_err(|e| anyhow!(e))?;
    request.page_size = cmd.limit.unwrap_or(0);
    request.page_token = cmd.page_token.unwrap_or_default();
    let mut client = sagas(global).await?;
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

/// Prints each event as it arrives, so unlike the other subcommands it writes to stdout as it
/// goes; a reader that hangs up (`| head`) ends the watch quietly.
async fn watch(global: &Global, cmd: WatchArgs) -> anyhow::Result<String> {
    let mut stream = sagas(global)
        .await?
        .watch_saga(WatchSagaRequest {
            saga_id: cmd.saga_id,
            after_seq: cmd.after_seq,
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    let stdout = io::stdout();
    while let Some(event) = stream.message().await.map_err(|e| global.api_error(e))? {
        let mut line = match global.output {
            Output::Table => cli::event_line(&event),
            Output::Json => cli::event_json(&event).to_string(),
        };
        line.push('\n');
        let mut out = stdout.lock();
        match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(String::new()),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    // The server closes the stream once the saga has ended.
    Ok(String::new())
}

fn render_repair(global: &Global, done: &str, saga: Option<Saga>) -> anyhow::Result<String> {
    let saga = saga.ok_or_else(|| anyhow!("the server did not return the repaired saga"))?;
    Ok(match global.output {
        Output::Table => cli::repair_table(done, &saga),
        Output::Json => render_json(&cli::saga_json(&saga)),
    })
}

async fn retry(global: &Global, cmd: RepairArgs) -> anyhow::Result<String> {
    let resp = admin(global)
        .await?
        .retry_step(RepairRequest {
            saga_id: cmd.saga_id,
            reason: cmd.reason,
            step: cmd.step,
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    render_repair(global, "retried the current step", resp.saga)
}

async fn skip(global: &Global, cmd: SkipArgs) -> anyhow::Result<String> {
    let output_json = match cmd.step_output {
        None => String::new(),
        Some(text) => {
            serde_json::from_str::<Value>(&text)
                .map_err(|e| anyhow!("--step-output is not valid JSON: {e}"))?;
            text
        }
    };
    let resp = admin(global)
        .await?
        .skip_step(SkipStepRequest {
            saga_id: cmd.repair.saga_id,
            reason: cmd.repair.reason,
            output_json,
            step: cmd.repair.step,
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    render_repair(global, "skipped the current step", resp.saga)
}

async fn compensate(global: &Global, cmd: RepairArgs) -> anyhow::Result<String> {
    let resp = admin(global)
        .await?
        .compensate_saga(RepairRequest {
            saga_id: cmd.saga_id,
            reason: cmd.reason,
            step: String::new(),
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    render_repair(global, "compensating", resp.saga)
}

async fn resolve(global: &Global, cmd: RepairArgs) -> anyhow::Result<String> {
    let resp = admin(global)
        .await?
        .resolve_saga(RepairRequest {
            saga_id: cmd.saga_id,
            reason: cmd.reason,
            step: cmd.step,
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    render_repair(global, "resolved", resp.saga)
}

/// Runs one Redrive call to its end, moving `bar` (if any) as batches complete.
async fn run_redrive(
    global: &Global,
    client: &mut AdminServiceClient<Api>,
    request: RedriveRequest,
    bar: Option<&ProgressBar>,
) -> anyhow::Result<RedriveOutcome> {
    let mut outcome = RedriveOutcome::new(request.dry_run);
    let mut stream = client
        .redrive(request)
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    while let Some(progress) = stream.message().await.map_err(|e| {
        let done = if outcome.retried > 0 {
            format!(" (after retrying {} sagas)", outcome.retried)
        } else {
            String::new()
        };
        anyhow!("{}{done}", global.api_error(e))
    })? {
        outcome.absorb(progress);
        if let Some(bar) = bar {
            bar.set_length(outcome.matched);
            bar.set_position(outcome.handled());
            bar.set_message(format!(
                "retried {}, skipped {}",
                outcome.retried, outcome.skipped
            ));
        }
    }
    Ok(outcome)
}

/// Always a dry run first, so the operator sees what would move; then, once confirmed, the
/// real run with a progress bar on stderr. stdout gets only the result.
async fn redrive(global: &Global, cmd: RedriveArgs) -> anyhow::Result<String> {
    let filter = cmd.filter.to_request().map_err(|e| anyhow!(e))?;
    if !cmd.filter.is_narrowed() {
        bail!(
            "redrive needs a filter that narrows the selection: --status, --definition, \
             --stuck-for, --participant, --step, a time range or --error"
        );
    }
    let request = |dry_run| {
        cli::redrive_request(
            filter.clone(),
            &cmd.reason,
            dry_run,
            cmd.batch_size,
            cmd.limit,
        )
    };
    let render = |outcome: &RedriveOutcome| match global.output {
        Output::Table => cli::redrive_summary(outcome),
        Output::Json => render_json(&cli::redrive_json(outcome)),
    };
    let mut client = admin(global).await?;
    let preview = run_redrive(global, &mut client, request(true), None).await?;
    if cmd.dry_run {
        return Ok(render(&preview));
    }
    if preview.matched == 0 {
        let mut nothing = RedriveOutcome::new(false);
        nothing.done = true;
        return Ok(match global.output {
            Output::Table => cli::redrive_preview(&preview),
            Output::Json => render_json(&cli::redrive_json(&nothing)),
        });
    }
    if !cmd.yes {
        if !io::stdin().is_terminal() {
            bail!(
                "{} match; refusing to retry them without confirmation because stdin is not a \
                 terminal: pass --yes (or --dry-run to only look)",
                match preview.matched {
                    1 => "1 saga".to_owned(),
                    n => format!("{n} sagas"),
                }
            );
        }
        eprint!("{}", cli::redrive_preview(&preview));
        eprint!("{}", cli::redrive_prompt(preview.matched));
        io::stderr().flush().ok();
        let mut answer = String::new();
        io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("cannot read the answer")?;
        if !cli::confirmed(&answer) {
            bail!("aborted: no saga was retried");
        }
    } else if global.output == Output::Table {
        eprint!("{}", cli::redrive_preview(&preview));
    }

    let bar = (global.output == Output::Table).then(|| {
        let bar =
            ProgressBar::with_draw_target(Some(preview.matched), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} sagas  {msg}  [{elapsed}]")
        {
            bar.set_style(style);
        }
        bar
    });
    let outcome = run_redrive(global, &mut client, request(false), bar.as_ref()).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    Ok(render(&outcome?))
}

async fn participants(global: &Global) -> anyhow::Result<String> {
    let resp = admin(global)
        .await?
        .list_participants(ListParticipantsRequest {})
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::participants_table(&resp.participants),
        Output::Json => render_json(&cli::participants_json(&resp.participants)),
    })
}

async fn pause(global: &Global, cmd: PauseArgs) -> anyhow::Result<String> {
    let p = admin(global)
        .await?
        .pause_participant(ParticipantRequest {
            participant: cmd.participant,
            reason: cmd.reason,
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::participant_line(&p),
        Output::Json => render_json(&cli::participant_json(&p)),
    })
}

async fn resume(global: &Global, cmd: ResumeArgs) -> anyhow::Result<String> {
    let p = admin(global)
        .await?
        .resume_participant(ParticipantRequest {
            participant: cmd.participant,
            reason: cmd.reason.unwrap_or_default(),
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::participant_line(&p),
        Output::Json => render_json(&cli::participant_json(&p)),
    })
}

async fn counts(global: &Global, cmd: CountsArgs) -> anyhow::Result<String> {
    let resp = admin(global)
        .await?
        .count_sagas(CountSagasRequest {
            definition: cmd.definition.unwrap_or_default(),
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::counts_table(&resp, time::OffsetDateTime::now_utc()),
        Output::Json => render_json(&cli::counts_json(&resp)),
    })
}

async fn definitions(global: &Global, cmd: DefinitionsArgs) -> anyhow::Result<String> {
    let resp = admin(global)
        .await?
        .list_definitions(ListDefinitionsRequest {
            name: cmd.name.unwrap_or_default(),
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::definitions_table(&resp.definitions),
        Output::Json => render_json(&cli::definitions_json(&resp.definitions)),
    })
}

async fn definition(global: &Global, cmd: DefinitionArgs) -> anyhow::Result<String> {
    let def = admin(global)
        .await?
        .get_definition(GetDefinitionRequest {
            name: cmd.name,
            version: cmd.version.unwrap_or(0),
        })
        .await
        .map_err(|e| global.api_error(e))?
        .into_inner();
    Ok(match global.output {
        Output::Table => cli::definition_text(&def),
        Output::Json => render_json(&cli::definition_json(&def)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use sagactl::cli::StatusFilter;

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
            list.filter.status,
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

    #[test]
    fn repairs_need_a_reason() {
        for cmd in ["retry", "skip", "compensate", "resolve"] {
            let err = Cli::try_parse_from(["sagactl", cmd, "id"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{cmd}"
            );
            assert!(err.to_string().contains("--reason"), "{cmd}");
        }
        let err = Cli::try_parse_from(["sagactl", "redrive", "--step", "s"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = Cli::try_parse_from(["sagactl", "pause", "order"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        // Resuming needs no reason.
        Cli::try_parse_from(["sagactl", "resume", "order"]).unwrap();
    }

    #[test]
    fn step_output_is_not_the_output_format() {
        let cli = Cli::try_parse_from([
            "sagactl",
            "skip",
            "id",
            "--reason",
            "done by hand",
            "--step-output",
            r#"{"order_id": 7}"#,
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Output::Json);
        let Command::Skip(skip) = cli.command else {
            panic!("expected skip");
        };
        assert_eq!(skip.step_output.as_deref(), Some(r#"{"order_id": 7}"#));
        assert_eq!(skip.repair.reason, "done by hand");
    }

    #[test]
    fn redrive_takes_the_list_filters() {
        let cli = Cli::try_parse_from([
            "sagactl",
            "redrive",
            "--step",
            "create_order",
            "--stuck-for",
            "10m",
            "--reason",
            "order service is back",
            "--batch-size",
            "50",
            "--limit",
            "200",
            "--yes",
        ])
        .unwrap();
        let Command::Redrive(r) = cli.command else {
            panic!("expected redrive");
        };
        assert!(r.yes && !r.dry_run);
        assert_eq!((r.batch_size, r.limit), (Some(50), Some(200)));
        assert_eq!(r.filter.step.as_deref(), Some("create_order"));
        assert!(r.filter.is_narrowed());
        let err = Cli::try_parse_from([
            "sagactl",
            "redrive",
            "--step",
            "s",
            "--reason",
            "r",
            "--batch-size",
            "5000",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn definition_takes_its_version_as_a_flag() {
        let cli = Cli::try_parse_from([
            "sagactl",
            "definition",
            "order_fulfillment",
            "--version",
            "3",
        ])
        .unwrap();
        let Command::Definition(d) = cli.command else {
            panic!("expected definition");
        };
        assert_eq!((d.name.as_str(), d.version), ("order_fulfillment", Some(3)));
        let err =
            Cli::try_parse_from(["sagactl", "definition", "x", "--version", "0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        // Elsewhere --version is still sagactl's.
        let err = Cli::try_parse_from(["sagactl", "definitions", "--version"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
    }

    #[test]
    fn the_token_does_not_print() {
        let cli =
            Cli::try_parse_from(["sagactl", "--token", "s3cret-token-value", "list"]).unwrap();
        assert!(!format!("{cli:?}").contains("s3cret"));
    }
}
