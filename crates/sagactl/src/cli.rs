//! The pure half of `sagactl`: enum names, timestamps, JSON handling, the conversion of flags
//! into requests, and the rendering of API responses as text tables or JSON documents. Nothing
//! here does I/O, so all of it is unit-tested without a server; the binary only parses flags,
//! calls the API and prints what these return.

use std::borrow::Cow;
use std::error::Error;
use std::fmt::Write as _;

use comfy_table::{ContentArrangement, Table, presets};
use prost_types::Timestamp;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use saga_proto::v1::{
    CircuitState, CommandKind, CountSagasResponse, Definition, DefinitionStep, HistoryEvent,
    ListSagasRequest, Outcome, Participant, RedriveProgress, RedriveRequest, Saga, SagaStatus,
    SagaSummary, StartSagaResponse, StepAttempt, StepState,
};

/// Longest JSON rendering put in a table cell; `--output json` has the full value.
const CELL_JSON_MAX: usize = 60;
/// Shown in table cells that have no value, so columns stay visibly aligned.
const NONE: &str = "-";

/// `running`, `needs_operator`, ...; an unknown number (a newer server) is shown, not hidden.
pub fn saga_status_name(raw: i32) -> Cow<'static, str> {
    match SagaStatus::try_from(raw) {
        Ok(SagaStatus::Unspecified) => "unspecified".into(),
        Ok(SagaStatus::Running) => "running".into(),
        Ok(SagaStatus::Compensating) => "compensating".into(),
        Ok(SagaStatus::Completed) => "completed".into(),
        Ok(SagaStatus::Compensated) => "compensated".into(),
        Ok(SagaStatus::NeedsOperator) => "needs_operator".into(),
        Ok(SagaStatus::Resolved) => "resolved".into(),
        Err(_) => format!("unknown({raw})").into(),
    }
}

/// `action` or `compensation`.
pub fn command_kind_name(raw: i32) -> Cow<'static, str> {
    match CommandKind::try_from(raw) {
        Ok(CommandKind::Unspecified) => "unspecified".into(),
        Ok(CommandKind::Action) => "action".into(),
        Ok(CommandKind::Compensation) => "compensation".into(),
        Err(_) => format!("unknown({raw})").into(),
    }
}

/// `success` or `failure`; `None` while an attempt has no outcome.
pub fn outcome_name(raw: i32) -> Option<Cow<'static, str>> {
    match Outcome::try_from(raw) {
        Ok(Outcome::Unspecified) => None,
        Ok(Outcome::Success) => Some("success".into()),
        Ok(Outcome::Failure) => Some("failure".into()),
        Err(_) => Some(format!("unknown({raw})").into()),
    }
}

/// `closed`, `open` or `half_open`.
pub fn circuit_name(raw: i32) -> Cow<'static, str> {
    match CircuitState::try_from(raw) {
        Ok(CircuitState::Unspecified) => "unspecified".into(),
        Ok(CircuitState::Closed) => "closed".into(),
        Ok(CircuitState::Open) => "open".into(),
        Ok(CircuitState::HalfOpen) => "half_open".into(),
        Err(_) => format!("unknown({raw})").into(),
    }
}

/// The canonical gRPC spelling (`NOT_FOUND`), which is what people search for; tonic's
/// `Display` gives an English sentence instead.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `CODE: message` on one line, because errors are printed as a single `error: ...` line.
pub fn describe_status(status: &tonic::Status) -> String {
    let message = one_line(status.message());
    if message.is_empty() {
        grpc_code_name(status.code()).to_owned()
    } else {
        format!("{}: {message}", grpc_code_name(status.code()))
    }
}

/// Whether a call failed because the client's own deadline passed. tonic reports that as a
/// generic CANCELLED status, which would send people looking for who cancelled the call.
pub fn is_client_timeout(status: &tonic::Status) -> bool {
    let mut next = status.source();
    while let Some(e) = next {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// An error and its sources joined with `: `. Transport errors nest the useful part
/// ("Connection refused") several levels down under generic wrappers, and some layers repeat
/// their source's text, so repeated messages are dropped.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = one_line(&e.to_string());
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn to_datetime(ts: &Timestamp) -> Option<OffsetDateTime> {
    let mut ts = *ts;
    ts.normalize();
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// RFC 3339 in UTC with full precision, for JSON output; `None` when unset.
pub fn timestamp_rfc3339(ts: Option<&Timestamp>) -> Option<String> {
    let ts = ts?;
    Some(
        to_datetime(ts)
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| invalid_timestamp(ts)),
    )
}

/// RFC 3339 in UTC with milliseconds, a fixed width that keeps table columns aligned; `-` when
/// unset.
pub fn timestamp_cell(ts: Option<&Timestamp>) -> String {
    let Some(ts) = ts else {
        return NONE.to_owned();
    };
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    to_datetime(ts)
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| invalid_timestamp(ts))
}

fn invalid_timestamp(ts: &Timestamp) -> String {
    format!("invalid timestamp ({}s {}ns)", ts.seconds, ts.nanos)
}

/// Why `sagactl start` refuses an input before sending it.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("is not valid JSON: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("must be a JSON object, not {0}")]
    NotObject(&'static str),
}

/// Checks that a saga input is a JSON object. The text itself is what gets sent, untouched, so
/// numbers keep the exact spelling the user wrote.
pub fn check_input_object(text: &str) -> Result<(), InputError> {
    match serde_json::from_str::<Value>(text)? {
        Value::Object(_) => Ok(()),
        other => Err(InputError::NotObject(json_type_name(&other))),
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON payload from the API as a value: empty means null, and text that is not JSON (which
/// the server should never send) is kept as a string rather than lost.
pub fn json_value(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

/// Compact JSON for a table cell; a bare string is shown without quotes.
pub fn inline_json(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An event's details as `key=value` pairs, easier to scan in a timeline than an object;
/// anything but an object is shown as compact JSON.
pub fn render_details(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", detail_value(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => inline_json(other),
    }
}

/// Strings that would blur the `key=value` layout (spaces, `=`, quotes, empty) stay quoted.
fn detail_value(value: &Value) -> String {
    match value {
        Value::String(s)
            if !s.is_empty()
                && !s.contains(|c: char| c.is_whitespace() || c == '=' || c == '"') =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

/// At most `max` characters, ending in `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The tail of an id. Command ids are UUIDv7, whose leading digits are a timestamp shared by
/// every command of a saga; the trailing ones are random and tell them apart.
pub fn short_id(id: &str) -> &str {
    let start = id.char_indices().rev().nth(7).map_or(0, |(i, _)| i);
    &id[start..]
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { NONE } else { text }
}

fn opt_string(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    // Borderless, kubectl-style: easy to read and to grep/awk.
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    // No left padding, so rows start at column 0 like the rest of the output.
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// Trims the trailing spaces comfy-table pads the last column with.
fn table_text(table: &Table) -> String {
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn start_table(resp: &StartSagaResponse) -> String {
    let status = saga_status_name(resp.status);
    if resp.created {
        format!("started saga {} (status {status})\n", resp.saga_id)
    } else {
        format!(
            "saga {} already exists for this idempotency key (status {status})\n",
            resp.saga_id
        )
    }
}

pub fn start_json(resp: &StartSagaResponse) -> Value {
    json!({
        "saga_id": resp.saga_id,
        "created": resp.created,
        "status": saga_status_name(resp.status),
    })
}

pub fn saga_json(saga: &Saga) -> Value {
    json!({
        "id": saga.id,
        "definition": saga.definition,
        "definition_version": saga.definition_version,
        "status": saga_status_name(saga.status),
        "current_step": opt_string(&saga.current_step),
        "current_steps": saga.current_steps,
        "steps": saga.steps.iter().map(step_json).collect::<Vec<_>>(),
        "idempotency_key": opt_string(&saga.idempotency_key),
        "created_at": timestamp_rfc3339(saga.created_at.as_ref()),
        "updated_at": timestamp_rfc3339(saga.updated_at.as_ref()),
        "error": opt_string(&saga.error),
        "input": json_value(&saga.input_json),
        "outputs": json_value(&saga.outputs_json),
        "attempts": saga.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
        "history": saga.history.iter().map(event_json).collect::<Vec<_>>(),
    })
}

fn step_json(s: &StepState) -> Value {
    json!({
        "name": s.name,
        "participant": s.participant,
        "state": s.state,
        "attempt": s.attempt,
        "command_id": opt_string(&s.command_id),
        "wake_at": timestamp_rfc3339(s.wake_at.as_ref()),
        "reason": opt_string(&s.reason),
        "after": s.after,
        "pivot": s.pivot,
    })
}

fn attempt_json(a: &StepAttempt) -> Value {
    json!({
        "command_id": a.command_id,
        "step": a.step,
        "participant": a.participant,
        "kind": command_kind_name(a.kind),
        "attempt": a.attempt,
        "sent_at": timestamp_rfc3339(a.sent_at.as_ref()),
        "replied_at": timestamp_rfc3339(a.replied_at.as_ref()),
        "outcome": outcome_name(a.outcome),
        "timed_out": a.timed_out,
        "superseded": a.superseded,
        "output": json_value(&a.output_json),
        "reason": opt_string(&a.reason),
    })
}

/// One history event; `sagactl watch --output json` prints these one per line.
pub fn event_json(e: &HistoryEvent) -> Value {
    json!({
        "seq": e.seq,
        "at": timestamp_rfc3339(e.at.as_ref()),
        "kind": e.kind,
        "step": opt_string(&e.step),
        "command_id": opt_string(&e.command_id),
        "detail": json_value(&e.detail_json),
    })
}

pub fn saga_table(saga: &Saga) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        // 17 = the longest label, "idempotency key:", plus one space.
        let _ = writeln!(out, "{:<17}{value}", format!("{name}:"));
    };
    field("id", &saga.id);
    field(
        "definition",
        &format!("{}@{}", saga.definition, saga.definition_version),
    );
    field("status", &saga_status_name(saga.status));
    let current = saga.current_steps.join(", ");
    field("current steps", or_none(&current));
    if !saga.idempotency_key.is_empty() {
        field("idempotency key", &saga.idempotency_key);
    }
    field("created", &timestamp_cell(saga.created_at.as_ref()));
    field("updated", &timestamp_cell(saga.updated_at.as_ref()));
    if !saga.error.is_empty() {
        field("error", &one_line(&saga.error));
    }
    if !saga.steps.is_empty() {
        out.push_str("steps:\n");
        out.push_str(&table_text(&steps_table(&saga.steps)));
    }
    push_json_block(&mut out, "input", &saga.input_json);
    push_json_block(&mut out, "outputs", &saga.outputs_json);

    out.push_str("\nstep attempts:\n");
    if saga.attempts.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut table = new_table(&[
            "STEP",
            "KIND",
            "ATTEMPT",
            "PARTICIPANT",
            "COMMAND",
            "SENT",
            "REPLIED",
            "RESULT",
            "REASON/OUTPUT",
        ]);
        for a in &saga.attempts {
            table.add_row(attempt_row(a));
        }
        out.push_str(&table_text(&table));
    }

    out.push_str("\nhistory:\n");
    if saga.history.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut table = new_table(&["SEQ", "TIME", "KIND", "STEP", "COMMAND", "DETAILS"]);
        for e in &saga.history {
            let details = render_details(&json_value(&e.detail_json));
            table.add_row(vec![
                e.seq.to_string(),
                timestamp_cell(e.at.as_ref()),
                e.kind.clone(),
                or_none(&e.step).to_owned(),
                or_none(short_id(&e.command_id)).to_owned(),
                or_none(&details).to_owned(),
            ]);
        }
        out.push_str(&table_text(&table));
    }
    out
}

/// The saga's steps as its graph, one row each in definition order: a step is indented by its
/// depth (the longest chain of `after` above it), so steps that run in parallel line up and a
/// join sits below all its branches.
fn steps_table(steps: &[StepState]) -> Table {
    let depths =
        saga_proto::graph::depths(steps.iter().map(|s| (s.name.as_str(), s.after.as_slice())));
    let mut table = new_table(&[
        "STEP",
        "AFTER",
        "PARTICIPANT",
        "STATE",
        "ATTEMPT",
        "WHEN/WHY",
    ]);
    for (s, depth) in steps.iter().zip(depths) {
        let name = format!(
            "{}{}{}",
            "  ".repeat(depth),
            s.name,
            if s.pivot { " (pivot)" } else { "" }
        );
        let when = match (&s.wake_at, s.reason.is_empty()) {
            (_, false) => one_line(&s.reason),
            (Some(t), true) => timestamp_cell(Some(t)),
            (None, true) => String::new(),
        };
        table.add_row(vec![
            name,
            s.after.join(", "),
            s.participant.clone(),
            s.state.clone(),
            if s.attempt == 0 {
                String::new()
            } else {
                s.attempt.to_string()
            },
            when,
        ]);
    }
    table
}

fn push_json_block(out: &mut String, name: &str, raw: &str) {
    let value = json_value(raw);
    let pretty = serde_json::to_string_pretty(&value).unwrap_or_else(|_| raw.to_owned());
    let _ = writeln!(out, "{name}:");
    for line in pretty.lines() {
        let _ = writeln!(out, "  {line}");
    }
}

fn attempt_row(a: &StepAttempt) -> Vec<String> {
    let outcome = outcome_name(a.outcome);
    let result = match (&outcome, a.timed_out) {
        // An operator moved the saga on while it was in flight; a reply that still came is
        // recorded but changed nothing.
        _ if a.superseded => match &outcome {
            Some(o) => format!("superseded (late {o})"),
            None => "superseded".to_owned(),
        },
        (_, true) => "timed out".to_owned(),
        (Some(o), false) => o.to_string(),
        (None, false) => "pending".to_owned(),
    };
    let detail = if !a.reason.is_empty() {
        one_line(&a.reason)
    } else {
        match json_value(&a.output_json) {
            Value::Null => String::new(),
            output => truncate(&inline_json(&output), CELL_JSON_MAX),
        }
    };
    vec![
        a.step.clone(),
        command_kind_name(a.kind).into_owned(),
        a.attempt.to_string(),
        a.participant.clone(),
        or_none(short_id(&a.command_id)).to_owned(),
        timestamp_cell(a.sent_at.as_ref()),
        timestamp_cell(a.replied_at.as_ref()),
        result,
        or_none(&detail).to_owned(),
    ]
}

pub fn summary_json(s: &SagaSummary) -> Value {
    json!({
        "id": s.id,
        "definition": s.definition,
        "definition_version": s.definition_version,
        "status": saga_status_name(s.status),
        "current_step": opt_string(&s.current_step),
        "current_steps": s.current_steps,
        "created_at": timestamp_rfc3339(s.created_at.as_ref()),
        "updated_at": timestamp_rfc3339(s.updated_at.as_ref()),
        "error": opt_string(&s.error),
    })
}

/// `next_page_token` is null, not `""`, when there are no more pages.
pub fn list_json(sagas: &[SagaSummary], next_page_token: &str) -> Value {
    json!({
        "sagas": sagas.iter().map(summary_json).collect::<Vec<_>>(),
        "next_page_token": opt_string(next_page_token),
    })
}

pub fn list_table(sagas: &[SagaSummary], next_page_token: &str) -> String {
    let mut out = if sagas.is_empty() {
        "no sagas found\n".to_owned()
    } else {
        let mut table = new_table(&[
            "ID",
            "DEFINITION",
            "STATUS",
            "CURRENT STEPS",
            "UPDATED",
            "ERROR",
        ]);
        for s in sagas {
            table.add_row(vec![
                s.id.clone(),
                format!("{}@{}", s.definition, s.definition_version),
                saga_status_name(s.status).into_owned(),
                or_none(&s.current_steps.join(", ")).to_owned(),
                timestamp_cell(s.updated_at.as_ref()),
                or_none(&truncate(&one_line(&s.error), CELL_JSON_MAX)).to_owned(),
            ]);
        }
        table_text(&table)
    };
    if !next_page_token.is_empty() {
        let _ = writeln!(out, "next page: --page-token {next_page_token}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Flags → requests

/// A saga status as a `--status` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFilter {
    Running,
    Compensating,
    Completed,
    Compensated,
    #[value(name = "needs_operator", alias = "needs-operator")]
    NeedsOperator,
    Resolved,
}

impl From<StatusFilter> for SagaStatus {
    fn from(status: StatusFilter) -> Self {
        match status {
            StatusFilter::Running => SagaStatus::Running,
            StatusFilter::Compensating => SagaStatus::Compensating,
            StatusFilter::Completed => SagaStatus::Completed,
            StatusFilter::Compensated => SagaStatus::Compensated,
            StatusFilter::NeedsOperator => SagaStatus::NeedsOperator,
            StatusFilter::Resolved => SagaStatus::Resolved,
        }
    }
}

const FILTERS: &str = "Filters";

/// Which sagas `list` shows and `redrive` retries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only sagas in this status; repeat or separate with commas for several.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        value_name = "STATUS",
        help_heading = FILTERS
    )]
    pub status: Vec<StatusFilter>,

    /// Only sagas of this definition.
    #[arg(long, value_name = "NAME", help_heading = FILTERS)]
    pub definition: Option<String>,

    /// Only sagas of this version of the definition (needs --definition).
    #[arg(
        long,
        value_name = "N",
        requires = "definition",
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = FILTERS
    )]
    pub definition_version: Option<u32>,

    /// Only unfinished sagas that made no progress for this long, e.g. 10m, 2h.
    #[arg(long, value_name = "DURATION", value_parser = parse_stuck_for, help_heading = FILTERS)]
    pub stuck_for: Option<prost_types::Duration>,

    /// Only unfinished sagas whose current step runs on this participant.
    #[arg(long, value_name = "NAME", help_heading = FILTERS)]
    pub participant: Option<String>,

    /// Only unfinished sagas whose current step is this one.
    #[arg(long, value_name = "NAME", help_heading = FILTERS)]
    pub step: Option<String>,

    /// Only sagas created at or after this time (RFC 3339, e.g. 2026-11-25T08:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time, help_heading = FILTERS)]
    pub created_after: Option<Timestamp>,

    /// Only sagas created before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time, help_heading = FILTERS)]
    pub created_before: Option<Timestamp>,

    /// Only sagas last updated at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time, help_heading = FILTERS)]
    pub updated_after: Option<Timestamp>,

    /// Only sagas last updated before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time, help_heading = FILTERS)]
    pub updated_before: Option<Timestamp>,

    /// Only sagas whose error contains this text (case-insensitive).
    #[arg(long = "error", value_name = "TEXT", help_heading = FILTERS)]
    pub error_contains: Option<String>,
}

impl FilterArgs {
    /// The filter part of a ListSagas (or Redrive) request; paging is the caller's.
    pub fn to_request(&self) -> Result<ListSagasRequest, String> {
        check_range(
            "--created-after",
            self.created_after.as_ref(),
            "--created-before",
            self.created_before.as_ref(),
        )?;
        check_range(
            "--updated-after",
            self.updated_after.as_ref(),
            "--updated-before",
            self.updated_before.as_ref(),
        )?;
        let text = |t: &Option<String>| t.as_deref().map(str::trim).unwrap_or("").to_owned();
        Ok(ListSagasRequest {
            statuses: self
                .status
                .iter()
                .map(|&s| SagaStatus::from(s) as i32)
                .collect(),
            definition: text(&self.definition),
            definition_version: self.definition_version.unwrap_or(0),
            stuck_for: self.stuck_for,
            participant: text(&self.participant),
            step: text(&self.step),
            created_after: self.created_after,
            created_before: self.created_before,
            updated_after: self.updated_after,
            updated_before: self.updated_before,
            error_contains: text(&self.error_contains),
            page_size: 0,
            page_token: String::new(),
        })
    }

    /// Whether the filter narrows the selection, which a bulk repair requires: a slip of the
    /// finger must not retry every saga.
    pub fn is_narrowed(&self) -> bool {
        let given = |t: &Option<String>| t.as_deref().is_some_and(|t| !t.trim().is_empty());
        !self.status.is_empty()
            || given(&self.definition)
            || self.stuck_for.is_some()
            || given(&self.participant)
            || given(&self.step)
            || self.created_after.is_some()
            || self.created_before.is_some()
            || self.updated_after.is_some()
            || self.updated_before.is_some()
            || given(&self.error_contains)
    }
}

fn check_range(
    after_flag: &str,
    after: Option<&Timestamp>,
    before_flag: &str,
    before: Option<&Timestamp>,
) -> Result<(), String> {
    if let (Some(a), Some(b)) = (after, before)
        && (a.seconds, a.nanos) >= (b.seconds, b.nanos)
    {
        return Err(format!(
            "{after_flag} ({}) must be earlier than {before_flag} ({}): no saga could match",
            timestamp_rfc3339(Some(a)).unwrap_or_default(),
            timestamp_rfc3339(Some(b)).unwrap_or_default(),
        ));
    }
    Ok(())
}

/// An RFC 3339 time (`2026-11-25T08:00:00Z`, `2026-11-25T09:00:00+01:00`) as a timestamp.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    let t = OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| {
        "expected an RFC 3339 time with a zone, e.g. 2026-11-25T08:00:00Z".to_owned()
    })?;
    Ok(Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

/// A duration such as `10m` or `1h 30m`, longer than zero.
pub fn parse_stuck_for(text: &str) -> Result<prost_types::Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| format!("{e} (e.g. 10m, 2h)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    prost_types::Duration::try_from(d).map_err(|_| "is too long".to_owned())
}

/// A repair's reason: recorded in the saga's history, so it may not be blank.
pub fn parse_reason(text: &str) -> Result<String, String> {
    let reason = text.trim();
    if reason.is_empty() {
        return Err("must say why (it is recorded in the saga's history)".to_owned());
    }
    Ok(reason.to_owned())
}

/// The redrive of `filter`; `batch_size` and `limit` of `None` leave the server's defaults
/// (100 per batch, no limit).
pub fn redrive_request(
    filter: ListSagasRequest,
    reason: &str,
    dry_run: bool,
    batch_size: Option<u32>,
    limit: Option<u32>,
) -> RedriveRequest {
    RedriveRequest {
        filter: Some(filter),
        reason: reason.to_owned(),
        dry_run,
        batch_size: batch_size.unwrap_or(0),
        limit: limit.unwrap_or(0),
    }
}

// ---------------------------------------------------------------------------------------------
// watch

/// One history event as a line of `sagactl watch`: sequence, time, kind, step, command and
/// details, with fixed-width leading columns so consecutive lines line up.
pub fn event_line(e: &HistoryEvent) -> String {
    let details = render_details(&json_value(&e.detail_json));
    let line = format!(
        "{:>4}  {}  {:<22}  {:<18}  {:<8}  {}",
        e.seq,
        timestamp_cell(e.at.as_ref()),
        e.kind,
        or_none(&e.step),
        or_none(short_id(&e.command_id)),
        details,
    );
    line.trim_end().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Repairs

/// What `retry`, `skip`, `compensate` and `resolve` print: what was done, then the saga as
/// `show` renders it.
pub fn repair_table(done: &str, saga: &Saga) -> String {
    format!("{done} (saga {})\n\n{}", saga.id, saga_table(saga))
}

/// How many saga ids a redrive preview lists before summarising the rest.
pub const PREVIEW_IDS: usize = 20;

/// A redrive as the client saw it: the last progress counters and every saga id reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveOutcome {
    pub dry_run: bool,
    pub matched: u64,
    pub retried: u64,
    pub skipped: u64,
    /// With dry_run: the sagas that would be retried; otherwise those retried.
    pub saga_ids: Vec<String>,
    pub done: bool,
}

impl RedriveOutcome {
    pub fn new(dry_run: bool) -> Self {
        RedriveOutcome {
            dry_run,
            ..Default::default()
        }
    }

    /// Takes in one progress message: the counters are running totals, the ids per batch.
    pub fn absorb(&mut self, p: RedriveProgress) {
        self.matched = p.matched;
        self.retried = p.retried;
        self.skipped = p.skipped;
        self.saga_ids.extend(p.saga_ids);
        self.done |= p.done;
    }

    /// Sagas handled so far, for a progress bar whose length is `matched`.
    pub fn handled(&self) -> u64 {
        self.retried + self.skipped
    }
}

fn sagas(n: u64) -> String {
    if n == 1 {
        "1 saga".to_owned()
    } else {
        format!("{n} sagas")
    }
}

/// What a dry run found: how many sagas match and the first [`PREVIEW_IDS`] of them.
pub fn redrive_preview(outcome: &RedriveOutcome) -> String {
    if outcome.matched == 0 {
        return "no saga matches the filter\n".to_owned();
    }
    let verb = if outcome.matched == 1 {
        "matches"
    } else {
        "match"
    };
    let mut out = format!("{} {verb} the filter:\n", sagas(outcome.matched));
    for id in outcome.saga_ids.iter().take(PREVIEW_IDS) {
        let _ = writeln!(out, "  {id}");
    }
    let listed = outcome.saga_ids.len().min(PREVIEW_IDS) as u64;
    if outcome.matched > listed {
        let _ = writeln!(out, "  … and {} more", outcome.matched - listed);
    }
    out
}

/// The confirmation question, without a newline (the answer goes on the same line).
pub fn redrive_prompt(matched: u64) -> String {
    format!("Retry {}? [y/N] ", sagas(matched))
}

/// Whether an answer to a `[y/N]` question is yes; anything else, including nothing, is no.
pub fn confirmed(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// The last line of a redrive.
pub fn redrive_summary(outcome: &RedriveOutcome) -> String {
    if outcome.dry_run {
        return format!("{}dry run: nothing was retried\n", redrive_preview(outcome));
    }
    let mut out = format!(
        "matched {}, retried {}, skipped {}",
        outcome.matched, outcome.retried, outcome.skipped
    );
    if outcome.skipped > 0 {
        out.push_str(" (finished or changed since they matched)");
    }
    if !outcome.done {
        out.push_str("; the server ended the stream early, some sagas may not have been tried");
    }
    out.push('\n');
    out
}

pub fn redrive_json(outcome: &RedriveOutcome) -> Value {
    json!({
        "dry_run": outcome.dry_run,
        "matched": outcome.matched,
        "retried": outcome.retried,
        "skipped": outcome.skipped,
        "saga_ids": outcome.saga_ids,
        "done": outcome.done,
    })
}

// ---------------------------------------------------------------------------------------------
// Participants

pub fn participant_json(p: &Participant) -> Value {
    json!({
        "name": p.name,
        "paused": p.paused,
        "paused_by": opt_string(&p.paused_by),
        "paused_reason": opt_string(&p.paused_reason),
        "paused_at": timestamp_rfc3339(p.paused_at.as_ref()),
        "circuit": circuit_name(p.circuit),
        "consecutive_failures": p.consecutive_failures,
        "circuit_changed_at": timestamp_rfc3339(p.circuit_changed_at.as_ref()),
        "held_commands": p.held_commands,
    })
}

pub fn participants_json(participants: &[Participant]) -> Value {
    json!({
        "participants": participants.iter().map(participant_json).collect::<Vec<_>>(),
    })
}

pub fn participants_table(participants: &[Participant]) -> String {
    if participants.is_empty() {
        return "no participants\n".to_owned();
    }
    let mut table = new_table(&[
        "NAME",
        "DISPATCH",
        "PAUSED BY",
        "PAUSED SINCE",
        "REASON",
        "CIRCUIT",
        "FAILURES",
        "HELD",
    ]);
    for p in participants {
        let (dispatch, by, since, reason) = if p.paused {
            (
                "paused",
                or_none(&p.paused_by).to_owned(),
                timestamp_cell(p.paused_at.as_ref()),
                or_none(&truncate(&one_line(&p.paused_reason), CELL_JSON_MAX)).to_owned(),
            )
        } else {
            ("active", NONE.into(), NONE.into(), NONE.into())
        };
        table.add_row(vec![
            p.name.clone(),
            dispatch.to_owned(),
            by,
            since,
            reason,
            circuit_name(p.circuit).into_owned(),
            p.consecutive_failures.to_string(),
            p.held_commands.to_string(),
        ]);
    }
    table_text(&table)
}

/// What `pause` and `resume` print: the participant's state afterwards.
pub fn participant_line(p: &Participant) -> String {
    let mut out = if p.paused {
        format!(
            "participant {} is paused by {}: {}",
            p.name,
            or_none(&p.paused_by),
            one_line(&p.paused_reason)
        )
    } else {
        format!("participant {} is active", p.name)
    };
    let _ = write!(
        out,
        " (circuit {}, {} held command{})",
        circuit_name(p.circuit),
        p.held_commands,
        if p.held_commands == 1 { "" } else { "s" }
    );
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------------
// Counts

/// A coarse age such as `45s`, `12m`, `3h05m` or `2d04h`: enough to see what waits longest.
pub fn age(since: Option<&Timestamp>, now: OffsetDateTime) -> String {
    let Some(then) = since.and_then(to_datetime) else {
        return NONE.to_owned();
    };
    let secs = (now - then).whole_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

pub fn counts_json(resp: &CountSagasResponse) -> Value {
    json!({
        "by_status": resp.by_status.iter().map(|c| json!({
            "status": saga_status_name(c.status),
            "count": c.count,
        })).collect::<Vec<_>>(),
        "by_step": resp.by_step.iter().map(|c| json!({
            "definition": c.definition,
            "step": opt_string(&c.step),
            "participant": opt_string(&c.participant),
            "status": saga_status_name(c.status),
            "count": c.count,
            "oldest_updated_at": timestamp_rfc3339(c.oldest_updated_at.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

/// Sagas per status, then the unfinished ones per step with how long the longest-waiting one
/// has made no progress.
pub fn counts_table(resp: &CountSagasResponse, now: OffsetDateTime) -> String {
    if resp.by_status.is_empty() {
        return "no sagas\n".to_owned();
    }
    let mut table = new_table(&["STATUS", "SAGAS"]);
    for c in &resp.by_status {
        table.add_row(vec![
            saga_status_name(c.status).into_owned(),
            c.count.to_string(),
        ]);
    }
    let total: u64 = resp.by_status.iter().map(|c| c.count).sum();
    table.add_row(vec!["total".to_owned(), total.to_string()]);
    let mut out = table_text(&table);

    out.push_str("\nunfinished sagas by step:\n");
    if resp.by_step.is_empty() {
        out.push_str("  (none)\n");
        return out;
    }
    let mut table = new_table(&[
        "DEFINITION",
        "STEP",
        "PARTICIPANT",
        "STATUS",
        "SAGAS",
        "WAITING SINCE",
        "FOR",
    ]);
    for c in &resp.by_step {
        table.add_row(vec![
            c.definition.clone(),
            or_none(&c.step).to_owned(),
            or_none(&c.participant).to_owned(),
            saga_status_name(c.status).into_owned(),
            c.count.to_string(),
            timestamp_cell(c.oldest_updated_at.as_ref()),
            age(c.oldest_updated_at.as_ref(), now),
        ]);
    }
    out.push_str(&table_text(&table));
    out
}

// ---------------------------------------------------------------------------------------------
// Definitions

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// A protobuf duration as `200ms`, `1m 30s`; `-` when unset or negative.
fn duration_text(d: Option<&prost_types::Duration>) -> String {
    d.and_then(|d| std::time::Duration::try_from(*d).ok())
        .map_or_else(
            || NONE.to_owned(),
            |d| humantime::format_duration(d).to_string(),
        )
}

fn duration_ms(d: Option<&prost_types::Duration>) -> Option<u128> {
    d.and_then(|d| std::time::Duration::try_from(*d).ok())
        .map(|d| d.as_millis())
}

pub fn definition_json(d: &Definition) -> Value {
    let steps: Vec<Value> = d
        .steps
        .iter()
        .map(|s| {
            let retry = s.retry.as_ref();
            json!({
                "name": s.name,
                "participant": s.participant,
                "action": s.action,
                "compensation": opt_string(&s.compensation),
                "after": s.after,
                "when": opt_string(&s.when),
                "input": json_value(&s.input_json),
                "compensation_input": json_value(&s.compensation_input_json),
                "pivot": s.pivot,
                "after_pivot": s.after_pivot,
                "timeout_ms": duration_ms(s.timeout.as_ref()),
                "retry": retry.map(|r| json!({
                    "max_attempts": r.max_attempts,
                    "initial_backoff_ms": duration_ms(r.initial_backoff.as_ref()),
                    "max_backoff_ms": duration_ms(r.max_backoff.as_ref()),
                    "multiplier": r.multiplier,
                })),
            })
        })
        .collect();
    json!({
        "name": d.name,
        "version": d.version,
        "description": opt_string(&d.description),
        "current": d.current,
        "retired": d.retired,
        "pivot_step": opt_string(&d.pivot_step),
        "compensation_max_attempts": d.compensation_max_attempts,
        "active_sagas": d.active_sagas,
        "steps": steps,
    })
}

pub fn definitions_json(defs: &[Definition]) -> Value {
    json!({
        "definitions": defs.iter().map(definition_json).collect::<Vec<_>>(),
    })
}

pub fn definitions_table(defs: &[Definition]) -> String {
    if defs.is_empty() {
        return "no definitions\n".to_owned();
    }
    let mut table = new_table(&[
        "NAME",
        "VERSION",
        "STEPS",
        "ACTIVE SAGAS",
        "RETIRED",
        "CURRENT",
        "DESCRIPTION",
    ]);
    for d in defs {
        table.add_row(vec![
            d.name.clone(),
            d.version.to_string(),
            d.steps.len().to_string(),
            d.active_sagas.to_string(),
            yes_no(d.retired).to_owned(),
            yes_no(d.current).to_owned(),
            or_none(&truncate(&one_line(&d.description), CELL_JSON_MAX)).to_owned(),
        ]);
    }
    table_text(&table)
}

/// Where each step sits in the drawing of the graph.
struct Layout {
    /// Indices into the steps, resolved from `after`: known steps only, not the step itself.
    deps: Vec<Vec<usize>>,
    /// The steps drawn under each node; the last node (one past the steps) is the saga's start.
    children: Vec<Vec<usize>>,
}

impl Layout {
    /// Each step is drawn under the nearest step that every one of its `after` steps is, or
    /// descends from, in the drawing: under its only `after` step, and a join under the step
    /// its branches forked from, after the branches. Steps the server sent in a cycle (which no
    /// loader lets through) hang from the start, their `after` shown.
    fn of(def: &Definition) -> Layout {
        let n = def.steps.len();
        let start = n;
        let deps = saga_proto::graph::resolve_after(
            def.steps
                .iter()
                .map(|s| (s.name.as_str(), s.after.as_slice())),
        );
        // Topological order, file order among the steps ready together; quadratic, and
        // definitions are small.
        let mut placed = vec![false; n];
        let mut order = Vec::with_capacity(n);
        while let Some(i) = (0..n).find(|&i| {
            !placed.get(i).copied().unwrap_or(true)
                && deps
                    .get(i)
                    .is_some_and(|ds| ds.iter().all(|&d| placed.get(d) == Some(&true)))
        }) {
            if let Some(p) = placed.get_mut(i) {
                *p = true;
            }
            order.push(i);
        }
        let mut parent = vec![start; n];
        let mut children = vec![Vec::new(); n + 1];
        let chain = |parent: &[usize], from: usize| {
            let mut chain = vec![from];
            let mut at = from;
            while let Some(&p) = parent.get(at) {
                chain.push(p);
                at = p;
            }
            chain
        };
        for &i in &order {
            let p = match deps.get(i).map(Vec::as_slice) {
                Some([first, rest @ ..]) => {
                    let others: Vec<Vec<usize>> = rest.iter().map(|&d| chain(&parent, d)).collect();
                    chain(&parent, *first)
                        .into_iter()
                        .find(|a| others.iter().all(|c| c.contains(a)))
                        .unwrap_or(start)
                }
                _ => start,
            };
            if let Some(slot) = parent.get_mut(i) {
                *slot = p;
            }
            if let Some(c) = children.get_mut(p) {
                c.push(i);
            }
        }
        if let Some(c) = children.get_mut(start) {
            c.extend((0..n).filter(|&i| placed.get(i) == Some(&false)));
        }
        Layout { deps, children }
    }
}

/// The lines drawn under a step's name.
fn step_details(step: &DefinitionStep, shown_after: bool) -> Vec<String> {
    let mut lines = Vec::new();
    if shown_after {
        let after = if step.after.is_empty() {
            "(nothing: starts with the saga)".to_owned()
        } else {
            step.after.join(", ")
        };
        lines.push(format!("after: {after}"));
    }
    if !step.when.is_empty() {
        lines.push(format!("when: {}", one_line(&step.when)));
    }
    for (label, raw) in [
        ("input", &step.input_json),
        ("compensation input", &step.compensation_input_json),
    ] {
        if !raw.is_empty() {
            lines.push(format!("{label}: {}", render_details(&json_value(raw))));
        }
    }
    let mut timing = format!("timeout {}", duration_text(step.timeout.as_ref()));
    if let Some(r) = &step.retry {
        let attempts = if step.after_pivot {
            "retried until it succeeds".to_owned()
        } else {
            format!("{} attempts", r.max_attempts)
        };
        let _ = write!(
            timing,
            "; {attempts}, back-off {} to {} ×{}",
            duration_text(r.initial_backoff.as_ref()),
            duration_text(r.max_backoff.as_ref()),
            r.multiplier
        );
    }
    lines.push(timing);
    lines
}

/// A definition version and its steps drawn as the graph of their `after` edges: a step under
/// the one it waits for, branches as `├──` / `└──`, a step with a single successor followed by
/// it at the same depth, and every wait the drawing does not show written out as `after:`.
pub fn definition_text(d: &Definition) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        // 15 = the longest label, "active sagas:", plus two spaces.
        let _ = writeln!(out, "{:<15}{value}", format!("{name}:"));
    };
    field("definition", &format!("{}@{}", d.name, d.version));
    if !d.description.is_empty() {
        field("description", &one_line(&d.description));
    }
    let state = if d.retired {
        "retired: known from the database only; its running sagas finish, none start"
    } else if d.current {
        "current: new sagas start on it"
    } else {
        "superseded: new sagas start on a newer version"
    };
    field("state", state);
    field("pivot", or_none(&d.pivot_step));
    field(
        "compensation",
        &format!(
            "an operator is needed after {} failed attempts",
            d.compensation_max_attempts
        ),
    );
    field("active sagas", &d.active_sagas.to_string());
    out.push_str("\nsteps:\n");
    if d.steps.is_empty() {
        out.push_str("  (none)\n");
        return out;
    }

    let layout = Layout::of(d);
    let start = d.steps.len();
    let roots = layout.children.get(start).cloned().unwrap_or_default();
    // (node, text before its name, prefix of the lines below it, the node it hangs from)
    let mut stack: Vec<(usize, String, String, usize)> = Vec::new();
    if let [root] = roots.as_slice() {
        stack.push((*root, String::new(), String::new(), start));
    } else {
        // Several roots: the saga's start is drawn as the node they fork from.
        out.push_str("(start)\n");
        push_children(&mut stack, &layout, start, "");
    }
    while let Some((i, head, body, parent)) = stack.pop() {
        let Some(step) = d.steps.get(i) else { continue };
        let pivot = if step.pivot { " (pivot)" } else { "" };
        let undo = if step.compensation.is_empty() {
            String::new()
        } else {
            format!(", undo: {}", step.compensation)
        };
        let _ = writeln!(
            out,
            "{head}{}{pivot}  {}: {}{undo}",
            step.name, step.participant, step.action
        );
        let deps = layout.deps.get(i).map(Vec::as_slice).unwrap_or_default();
        let drawn = if parent == start {
            deps.is_empty()
        } else {
            deps == [parent]
        };
        // The drawing says which steps this one waits for only through its parent; the
        // server's list is checked too, in case it names a step that is not there.
        let shown_after = !drawn || step.after.len() != deps.len();
        let kids = layout.children.get(i).map(Vec::len).unwrap_or(0);
        let bar = if kids > 0 { "│   " } else { "    " };
        for line in step_details(step, shown_after) {
            let _ = writeln!(out, "{body}{bar}{line}");
        }
        push_children(&mut stack, &layout, i, &body);
    }
    out
}

/// Pushes the steps drawn under `node` (prefix `body`) so that they pop in order.
fn push_children(
    stack: &mut Vec<(usize, String, String, usize)>,
    layout: &Layout,
    node: usize,
    body: &str,
) {
    let Some(kids) = layout.children.get(node) else {
        return;
    };
    if let [only] = kids.as_slice()
        && layout.deps.get(*only).map(Vec::as_slice) == Some([node].as_slice())
    {
        // A plain sequence continues at the same depth, so a corridor does not drift right.
        stack.push((*only, body.to_owned(), body.to_owned(), node));
        return;
    }
    for (k, &kid) in kids.iter().enumerate().rev() {
        let last = k + 1 == kids.len();
        let (head, next) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        stack.push((kid, format!("{body}{head}"), format!("{body}{next}"), node));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn enum_names_are_lower_case_words() {
        assert_eq!(saga_status_name(SagaStatus::Running as i32), "running");
        assert_eq!(
            saga_status_name(SagaStatus::NeedsOperator as i32),
            "needs_operator"
        );
        assert_eq!(
            saga_status_name(SagaStatus::Compensated as i32),
            "compensated"
        );
        assert_eq!(saga_status_name(42), "unknown(42)");
        assert_eq!(command_kind_name(CommandKind::Action as i32), "action");
        assert_eq!(
            command_kind_name(CommandKind::Compensation as i32),
            "compensation"
        );
        assert_eq!(
            outcome_name(Outcome::Success as i32).as_deref(),
            Some("success")
        );
        assert_eq!(
            outcome_name(Outcome::Failure as i32).as_deref(),
            Some("failure")
        );
        assert_eq!(outcome_name(Outcome::Unspecified as i32), None);
    }

    #[test]
    fn grpc_statuses_read_as_code_and_message() {
        let status = tonic::Status::not_found("saga 123 not found");
        assert_eq!(describe_status(&status), "NOT_FOUND: saga 123 not found");
        let bare = tonic::Status::new(tonic::Code::Unauthenticated, "");
        assert_eq!(describe_status(&bare), "UNAUTHENTICATED");
        let multi = tonic::Status::internal("line one\n  line two");
        assert_eq!(describe_status(&multi), "INTERNAL: line one line two");
    }

    #[test]
    fn client_timeouts_are_recognised() {
        let timeout = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(is_client_timeout(&timeout));
        assert!(!is_client_timeout(&tonic::Status::cancelled(
            "Timeout expired"
        )));
    }

    #[test]
    fn error_chain_joins_sources_and_drops_repeats() {
        #[derive(Debug)]
        struct Wrap(&'static str, Option<Box<dyn Error + 'static>>);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl Error for Wrap {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                self.1.as_deref()
            }
        }
        let err = Wrap(
            "transport error",
            Some(Box::new(Wrap(
                "tcp connect error: Connection refused",
                Some(Box::new(Wrap("Connection refused", None))),
            ))),
        );
        assert_eq!(
            error_chain(&err),
            "transport error: tcp connect error: Connection refused"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = ts(1_700_000_000, 123_456_000);
        assert_eq!(
            timestamp_rfc3339(Some(&t)).as_deref(),
            Some("2023-11-14T22:13:20.123456Z")
        );
        assert_eq!(timestamp_cell(Some(&t)), "2023-11-14T22:13:20.123Z");
        assert_eq!(timestamp_cell(Some(&ts(0, 0))), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp_rfc3339(None), None);
        assert_eq!(timestamp_cell(None), "-");
    }

    #[test]
    fn unnormalized_and_out_of_range_timestamps_do_not_panic() {
        // -1s + 1.5s = 0.5s after the epoch.
        assert_eq!(
            timestamp_cell(Some(&ts(-1, 1_500_000_000))),
            "1970-01-01T00:00:00.500Z"
        );
        let huge = ts(i64::MAX, 0);
        assert!(timestamp_cell(Some(&huge)).starts_with("invalid timestamp"));
        assert!(
            timestamp_rfc3339(Some(&huge))
                .unwrap()
                .starts_with("invalid timestamp")
        );
    }

    #[test]
    fn input_must_be_a_json_object() {
        assert!(check_input_object(r#"{"order_id": 7}"#).is_ok());
        assert!(check_input_object(" {} ").is_ok());
        assert_eq!(
            check_input_object("[1, 2]").unwrap_err().to_string(),
            "must be a JSON object, not an array"
        );
        assert_eq!(
            check_input_object("null").unwrap_err().to_string(),
            "must be a JSON object, not null"
        );
        let invalid = check_input_object("{order_id: 7}").unwrap_err().to_string();
        assert!(invalid.starts_with("is not valid JSON: "), "{invalid}");
        assert!(check_input_object("").is_err());
    }

    #[test]
    fn json_payloads_become_values() {
        assert_eq!(json_value(""), Value::Null);
        assert_eq!(json_value(r#"{"a":[1,2]}"#), json!({"a": [1, 2]}));
        assert_eq!(json_value("not json"), json!("not json"));
        assert_eq!(inline_json(&json!("plain")), "plain");
        assert_eq!(inline_json(&json!({"a": 1})), r#"{"a":1}"#);
        assert_eq!(
            render_details(&json!({"attempt": 2, "step": "charge", "reason": "card declined"})),
            r#"attempt=2 reason="card declined" step=charge"#
        );
        assert_eq!(
            render_details(&json!({"a": "", "b": "x=y", "c": null, "d": {"e": 1}})),
            r#"a="" b="x=y" c=null d={"e":1}"#
        );
        assert_eq!(render_details(&Value::Null), "");
        assert_eq!(render_details(&json!([1])), "[1]");
    }

    #[test]
    fn truncation_and_short_ids_respect_characters() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdefghij", 5), "abcd…");
        assert_eq!(truncate("ééééé", 3), "éé…");
        assert_eq!(short_id("0196a3c4-7b1e-7c3d-9f00-3a5b2c1d0e9f"), "2c1d0e9f");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id(""), "");
    }

    #[test]
    fn start_messages() {
        let mut resp = StartSagaResponse {
            saga_id: "s1".into(),
            created: true,
            status: SagaStatus::Running as i32,
        };
        assert_eq!(start_table(&resp), "started saga s1 (status running)\n");
        assert_eq!(
            start_json(&resp),
            json!({"saga_id": "s1", "created": true, "status": "running"})
        );
        resp.created = false;
        resp.status = SagaStatus::Completed as i32;
        assert_eq!(
            start_table(&resp),
            "saga s1 already exists for this idempotency key (status completed)\n"
        );
    }

    fn sample_saga() -> Saga {
        Saga {
            id: "saga-1".into(),
            definition: "order_fulfillment".into(),
            definition_version: 2,
            status: SagaStatus::Compensated as i32,
            current_step: String::new(),
            input_json: r#"{"order_id":7}"#.into(),
            outputs_json: r#"{"reserve":{"hold":"h1"}}"#.into(),
            idempotency_key: String::new(),
            created_at: Some(ts(1_700_000_000, 0)),
            updated_at: Some(ts(1_700_000_005, 0)),
            error: "charge failed: card declined".into(),
            attempts: vec![
                StepAttempt {
                    command_id: "00000000-0000-7000-8000-0000000000a1".into(),
                    step: "reserve".into(),
                    participant: "inventory".into(),
                    kind: CommandKind::Action as i32,
                    attempt: 1,
                    sent_at: Some(ts(1_700_000_001, 0)),
                    replied_at: Some(ts(1_700_000_002, 0)),
                    outcome: Outcome::Success as i32,
                    output_json: r#"{"hold":"h1"}"#.into(),
                    reason: String::new(),
                    timed_out: false,
                    superseded: false,
                },
                StepAttempt {
                    command_id: "00000000-0000-7000-8000-0000000000b2".into(),
                    step: "charge".into(),
                    participant: "payments".into(),
                    kind: CommandKind::Action as i32,
                    attempt: 1,
                    sent_at: Some(ts(1_700_000_003, 0)),
                    replied_at: None,
                    outcome: Outcome::Unspecified as i32,
                    output_json: String::new(),
                    reason: String::new(),
                    timed_out: true,
                    superseded: false,
                },
            ],
            current_steps: Vec::new(),
            steps: vec![
                StepState {
                    name: "reserve".into(),
                    participant: "inventory".into(),
                    state: "compensated".into(),
                    ..Default::default()
                },
                StepState {
                    name: "charge".into(),
                    participant: "payments".into(),
                    state: "failed".into(),
                    attempt: 3,
                    after: vec!["reserve".into()],
                    pivot: true,
                    ..Default::default()
                },
            ],
            history: vec![HistoryEvent {
                seq: 1,
                at: Some(ts(1_700_000_000, 0)),
                kind: "saga_started".into(),
                step: String::new(),
                command_id: String::new(),
                detail_json: r#"{"version":2}"#.into(),
            }],
        }
    }

    #[test]
    fn saga_json_has_parsed_payloads_and_nulls_for_absent_fields() {
        let v = saga_json(&sample_saga());
        assert_eq!(v["status"], "compensated");
        assert_eq!(v["current_step"], Value::Null);
        assert_eq!(v["idempotency_key"], Value::Null);
        assert_eq!(v["input"], json!({"order_id": 7}));
        assert_eq!(v["outputs"]["reserve"]["hold"], "h1");
        assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["attempts"][0]["kind"], "action");
        assert_eq!(v["attempts"][0]["outcome"], "success");
        assert_eq!(v["attempts"][0]["output"], json!({"hold": "h1"}));
        assert_eq!(v["attempts"][1]["outcome"], Value::Null);
        assert_eq!(v["attempts"][1]["replied_at"], Value::Null);
        assert_eq!(v["attempts"][1]["timed_out"], true);
        assert_eq!(v["history"][0]["detail"], json!({"version": 2}));
        assert_eq!(v["history"][0]["step"], Value::Null);
    }

    #[test]
    fn saga_table_shows_header_attempts_and_history() {
        let text = saga_table(&sample_saga());
        assert!(
            text.contains("definition:      order_fulfillment@2\n"),
            "{text}"
        );
        assert!(text.contains("status:          compensated\n"), "{text}");
        assert!(text.contains("current steps:   -\n"), "{text}");
        assert!(text.contains("error:           charge failed: card declined\n"));
        assert!(
            text.contains("input:\n  {\n    \"order_id\": 7\n  }\n"),
            "{text}"
        );
        assert!(!text.contains("idempotency key"));
        // The graph: a step below the one it waits for, indented by its depth.
        let (graph, rest) = text.split_once("step attempts:").unwrap();
        let reserve = graph.lines().find(|l| l.starts_with("reserve ")).unwrap();
        assert!(reserve.contains("compensated"), "{reserve}");
        let charge = graph.lines().find(|l| l.contains("payments")).unwrap();
        assert!(charge.starts_with("  charge (pivot)"), "{charge}");
        for cell in ["reserve", "failed", "3"] {
            assert!(charge.contains(cell), "{charge}");
        }
        let reserve = rest.lines().find(|l| l.starts_with("reserve ")).unwrap();
        for cell in [
            "action",
            "inventory",
            "000000a1",
            "success",
            r#"{"hold":"h1"}"#,
        ] {
            assert!(reserve.contains(cell), "{reserve}");
        }
        let charge = rest.lines().find(|l| l.contains("payments")).unwrap();
        assert!(charge.contains("timed out"), "{charge}");
        let started = text.lines().find(|l| l.contains("saga_started")).unwrap();
        assert!(started.contains("2023-11-14T22:13:20.000Z"), "{started}");
        assert!(started.contains("version=2"), "{started}");
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn list_output_mentions_the_next_page() {
        let summary = SagaSummary {
            id: "saga-1".into(),
            definition: "order_fulfillment".into(),
            definition_version: 1,
            status: SagaStatus::Running as i32,
            current_step: "charge".into(),
            created_at: Some(ts(1_700_000_000, 0)),
            updated_at: Some(ts(1_700_000_000, 0)),
            error: String::new(),
            current_steps: vec!["charge".into()],
        };
        let text = list_table(std::slice::from_ref(&summary), "tok");
        assert!(text.starts_with("ID"), "{text}");
        assert!(text.contains("order_fulfillment@1"));
        assert!(text.ends_with("next page: --page-token tok\n"), "{text}");
        assert_eq!(list_table(&[], ""), "no sagas found\n");

        let v = list_json(&[summary], "");
        assert_eq!(v["next_page_token"], Value::Null);
        assert_eq!(v["sagas"][0]["status"], "running");
        assert_eq!(v["sagas"][0]["error"], Value::Null);
        assert_eq!(list_json(&[], "tok")["next_page_token"], "tok");
    }

    #[test]
    fn superseded_attempts_say_so() {
        let mut saga = sample_saga();
        saga.attempts[1].timed_out = false;
        saga.attempts[1].superseded = true;
        let text = saga_table(&saga);
        let (_, attempts) = text.split_once("step attempts:").unwrap();
        let charge = attempts.lines().find(|l| l.contains("payments")).unwrap();
        assert!(charge.contains("superseded"), "{charge}");
        assert!(!charge.contains("pending"), "{charge}");
        assert_eq!(saga_json(&saga)["attempts"][1]["superseded"], true);
        assert_eq!(saga_json(&saga)["attempts"][0]["superseded"], false);

        // A reply that arrived after the operator moved on is shown, but as late.
        saga.attempts[1].outcome = Outcome::Success as i32;
        let text = saga_table(&saga);
        let (_, attempts) = text.split_once("step attempts:").unwrap();
        let charge = attempts.lines().find(|l| l.contains("payments")).unwrap();
        assert!(charge.contains("superseded (late success)"), "{charge}");
    }

    #[test]
    fn resolved_is_a_status_and_a_filter() {
        assert_eq!(saga_status_name(SagaStatus::Resolved as i32), "resolved");
        assert_eq!(
            SagaStatus::from(StatusFilter::Resolved),
            SagaStatus::Resolved
        );
        let f = filters(&["--status", "resolved,needs-operator"]).unwrap();
        assert_eq!(
            f.to_request().unwrap().statuses,
            [
                SagaStatus::Resolved as i32,
                SagaStatus::NeedsOperator as i32
            ]
        );
    }

    /// Parses filter flags the way `sagactl list` does.
    fn filters(args: &[&str]) -> Result<FilterArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            filter: FilterArgs,
        }
        let argv = std::iter::once("sagactl").chain(args.iter().copied());
        <Wrap as clap::Parser>::try_parse_from(argv).map(|w| w.filter)
    }

    #[test]
    fn filter_flags_become_a_list_request() {
        let f = filters(&[
            "--definition",
            " order_fulfillment ",
            "--definition-version",
            "2",
            "--stuck-for",
            "10m",
            "--participant",
            "payment",
            "--step",
            "authorize_payment",
            "--created-after",
            "2026-11-25T08:00:00Z",
            "--created-before",
            "2026-11-25T10:00:00+01:00",
            "--updated-after",
            "2026-11-25T08:30:00.5Z",
            "--error",
            "declined",
        ])
        .unwrap();
        assert!(f.is_narrowed());
        let r = f.to_request().unwrap();
        assert_eq!(r.definition, "order_fulfillment");
        assert_eq!(r.definition_version, 2);
        assert_eq!(
            r.stuck_for,
            Some(prost_types::Duration {
                seconds: 600,
                nanos: 0
            })
        );
        assert_eq!(
            (r.participant.as_str(), r.step.as_str()),
            ("payment", "authorize_payment")
        );
        // 2026-11-25T08:00:00Z
        assert_eq!(r.created_after, Some(ts(1_795_593_600, 0)));
        // 10:00 at +01:00 is 09:00 UTC.
        assert_eq!(r.created_before, Some(ts(1_795_597_200, 0)));
        assert_eq!(r.updated_after, Some(ts(1_795_595_400, 500_000_000)));
        assert_eq!(r.updated_before, None);
        assert_eq!(r.error_contains, "declined");
        assert!(r.statuses.is_empty());
        assert_eq!((r.page_size, r.page_token.as_str()), (0, ""));

        let empty = filters(&[]).unwrap();
        assert!(!empty.is_narrowed());
        assert_eq!(empty.to_request().unwrap(), ListSagasRequest::default());
        // Blank text narrows nothing.
        assert!(!filters(&["--step", " "]).unwrap().is_narrowed());
    }

    #[test]
    fn bad_filter_flags_are_refused_before_any_call() {
        use clap::error::ErrorKind;
        assert_eq!(
            filters(&["--definition-version", "2"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            filters(&["--definition", "d", "--definition-version", "0"])
                .unwrap_err()
                .kind(),
            ErrorKind::ValueValidation
        );
        for bad in [
            ["--stuck-for", "0s"],
            ["--stuck-for", "soon"],
            ["--created-after", "yesterday"],
            ["--updated-before", "2026-11-25 08:00"],
            ["--status", "done"],
        ] {
            assert!(filters(&bad).is_err(), "{bad:?}");
        }
        let inverted = filters(&[
            "--updated-after",
            "2026-11-25T09:00:00Z",
            "--updated-before",
            "2026-11-25T08:00:00Z",
        ])
        .unwrap()
        .to_request()
        .unwrap_err();
        assert_eq!(
            inverted,
            "--updated-after (2026-11-25T09:00:00Z) must be earlier than --updated-before \
             (2026-11-25T08:00:00Z): no saga could match"
        );
    }

    #[test]
    fn times_durations_and_reasons_parse() {
        assert_eq!(
            parse_time("1970-01-01T00:00:01.25Z"),
            Ok(ts(1, 250_000_000))
        );
        assert_eq!(parse_time(" 1970-01-01T01:00:00+01:00 "), Ok(ts(0, 0)));
        let e = parse_time("2026-11-25").unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
        assert_eq!(
            parse_stuck_for("1h 30m").unwrap(),
            prost_types::Duration {
                seconds: 5400,
                nanos: 0
            }
        );
        assert_eq!(
            parse_stuck_for("0ms").unwrap_err(),
            "must be longer than zero"
        );
        assert_eq!(parse_reason("  disk full  ").unwrap(), "disk full");
        assert!(parse_reason(" \t").is_err());
    }

    #[test]
    fn redrive_requests_carry_filter_reason_and_batching() {
        let filter = filters(&["--step", "create_order"])
            .unwrap()
            .to_request()
            .unwrap();
        let r = redrive_request(filter.clone(), "broker was down", true, None, Some(7));
        assert_eq!(r.filter.as_ref(), Some(&filter));
        assert_eq!(r.reason, "broker was down");
        assert!(r.dry_run);
        assert_eq!((r.batch_size, r.limit), (0, 7));
        let r = redrive_request(filter, "x", false, Some(10), None);
        assert_eq!((r.dry_run, r.batch_size, r.limit), (false, 10, 0));
    }

    #[test]
    fn watch_lines_are_one_event_each() {
        let e = HistoryEvent {
            seq: 7,
            at: Some(ts(1_700_000_000, 0)),
            kind: "step_succeeded".into(),
            step: "create_order".into(),
            command_id: "00000000-0000-7000-8000-0000000000a1".into(),
            detail_json: r#"{"attempt":1}"#.into(),
        };
        let line = event_line(&e);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("   7  2023-11-14T22:13:20.000Z  step_succeeded "),
            "{line}"
        );
        assert!(line.contains(" create_order "), "{line}");
        assert!(line.contains("000000a1"), "{line}");
        assert!(line.ends_with("attempt=1"), "{line}");
        let bare = HistoryEvent {
            seq: 1,
            kind: "saga_started".into(),
            ..Default::default()
        };
        assert_eq!(
            event_line(&bare),
            format!(
                "   1  -  saga_started{}  -{}  -",
                " ".repeat(10),
                " ".repeat(17)
            )
        );
        assert_eq!(event_json(&e)["kind"], "step_succeeded");
        assert_eq!(event_json(&e)["detail"], json!({"attempt": 1}));
    }

    #[test]
    fn repairs_print_what_was_done_then_the_saga() {
        let text = repair_table("retried the current step", &sample_saga());
        assert!(
            text.starts_with("retried the current step (saga saga-1)\n\nid:"),
            "{text}"
        );
        assert!(text.contains("step attempts:"));
    }

    fn progress(
        matched: u64,
        retried: u64,
        skipped: u64,
        ids: &[&str],
        done: bool,
    ) -> RedriveProgress {
        RedriveProgress {
            matched,
            retried,
            skipped,
            saga_ids: ids.iter().map(|s| s.to_string()).collect(),
            done,
            skipped_ids: Vec::new(),
        }
    }

    #[test]
    fn redrive_progress_accumulates() {
        let mut o = RedriveOutcome::new(false);
        o.absorb(progress(5, 2, 0, &["a", "b"], false));
        assert_eq!(o.handled(), 2);
        assert!(!o.done);
        o.absorb(progress(5, 4, 1, &["c", "d"], true));
        assert_eq!((o.matched, o.retried, o.skipped, o.handled()), (5, 4, 1, 5));
        assert_eq!(o.saga_ids, ["a", "b", "c", "d"]);
        assert!(o.done);
        assert_eq!(
            redrive_summary(&o),
            "matched 5, retried 4, skipped 1 (finished or changed since they matched)\n"
        );
        assert_eq!(
            redrive_json(&o),
            json!({"dry_run": false, "matched": 5, "retried": 4, "skipped": 1,
                   "saga_ids": ["a", "b", "c", "d"], "done": true})
        );
        let mut cut = RedriveOutcome::new(false);
        cut.absorb(progress(5, 2, 0, &["a", "b"], false));
        assert!(redrive_summary(&cut).contains("ended the stream early"));
    }

    #[test]
    fn redrive_previews_list_the_first_ids() {
        let ids: Vec<String> = (0..25).map(|i| format!("id-{i:02}")).collect();
        let mut o = RedriveOutcome::new(true);
        o.absorb(RedriveProgress {
            matched: 25,
            retried: 25,
            skipped: 0,
            saga_ids: ids,
            done: true,
            skipped_ids: Vec::new(),
        });
        let text = redrive_preview(&o);
        assert!(
            text.starts_with("25 sagas match the filter:\n  id-00\n"),
            "{text}"
        );
        assert!(
            text.contains("  id-19\n") && !text.contains("id-20"),
            "{text}"
        );
        assert!(text.ends_with("  … and 5 more\n"), "{text}");
        assert!(redrive_summary(&o).ends_with("dry run: nothing was retried\n"));

        let mut one = RedriveOutcome::new(true);
        one.absorb(progress(1, 1, 0, &["only"], true));
        assert_eq!(
            redrive_preview(&one),
            "1 saga matches the filter:\n  only\n"
        );
        assert_eq!(
            redrive_preview(&RedriveOutcome::new(true)),
            "no saga matches the filter\n"
        );
        assert_eq!(redrive_prompt(3), "Retry 3 sagas? [y/N] ");
        assert_eq!(redrive_prompt(1), "Retry 1 saga? [y/N] ");
        for yes in ["y", "Y\n", " yes ", "YES"] {
            assert!(confirmed(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yep", "y y"] {
            assert!(!confirmed(no), "{no:?}");
        }
    }

    fn participant(name: &str, paused: bool) -> Participant {
        Participant {
            name: name.into(),
            paused,
            paused_by: if paused {
                "alice".into()
            } else {
                String::new()
            },
            paused_reason: if paused {
                "payment provider maintenance".into()
            } else {
                String::new()
            },
            paused_at: paused.then(|| ts(1_700_000_000, 0)),
            circuit: if paused {
                CircuitState::Closed as i32
            } else {
                CircuitState::HalfOpen as i32
            },
            consecutive_failures: if paused { 0 } else { 5 },
            circuit_changed_at: None,
            held_commands: if paused { 12 } else { 1 },
        }
    }

    #[test]
    fn participants_render_pause_and_circuit() {
        let ps = [participant("payment", true), participant("order", false)];
        let text = participants_table(&ps);
        assert!(text.starts_with("NAME"), "{text}");
        let payment = text.lines().find(|l| l.starts_with("payment")).unwrap();
        for cell in [
            "paused",
            "alice",
            "2023-11-14T22:13:20.000Z",
            "payment provider maintenance",
            "closed",
            "12",
        ] {
            assert!(payment.contains(cell), "{payment}");
        }
        let order = text.lines().find(|l| l.starts_with("order")).unwrap();
        for cell in ["active", "half_open", "5", "1"] {
            assert!(order.contains(cell), "{order}");
        }
        assert_eq!(participants_table(&[]), "no participants\n");
        assert_eq!(
            participant_line(&ps[0]),
            "participant payment is paused by alice: payment provider maintenance \
             (circuit closed, 12 held commands)\n"
        );
        assert_eq!(
            participant_line(&ps[1]),
            "participant order is active (circuit half_open, 1 held command)\n"
        );
        let v = participants_json(&ps);
        assert_eq!(v["participants"][0]["paused_by"], "alice");
        assert_eq!(v["participants"][0]["held_commands"], 12);
        assert_eq!(v["participants"][1]["paused_by"], Value::Null);
        assert_eq!(v["participants"][1]["circuit"], "half_open");
        assert_eq!(circuit_name(CircuitState::Open as i32), "open");
        assert_eq!(circuit_name(9), "unknown(9)");
    }

    #[test]
    fn ages_are_coarse() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let ago = |s: i64| age(Some(&ts(1_700_000_000 - s, 0)), now);
        assert_eq!(ago(0), "0s");
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(600), "10m");
        assert_eq!(ago(3 * 3600 + 5 * 60 + 9), "3h05m");
        assert_eq!(ago(2 * 86_400 + 4 * 3600), "2d04h");
        // A clock ahead of ours is not a negative age.
        assert_eq!(ago(-30), "0s");
        assert_eq!(age(None, now), "-");
    }

    #[test]
    fn counts_by_status_then_by_step() {
        use saga_proto::v1::{StatusCount, StepCount};
        let resp = CountSagasResponse {
            by_status: vec![
                StatusCount {
                    status: SagaStatus::Running as i32,
                    count: 3,
                },
                StatusCount {
                    status: SagaStatus::Completed as i32,
                    count: 40,
                },
            ],
            by_step: vec![StepCount {
                definition: "order_fulfillment".into(),
                step: "create_order".into(),
                participant: "order".into(),
                status: SagaStatus::Running as i32,
                count: 3,
                oldest_updated_at: Some(ts(1_700_000_000, 0)),
            }],
        };
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_600).unwrap();
        let text = counts_table(&resp, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("STATUS"), "{text}");
        assert!(
            lines[1].starts_with("running") && lines[1].ends_with('3'),
            "{text}"
        );
        assert!(
            lines[3].starts_with("total") && lines[3].ends_with("43"),
            "{text}"
        );
        assert_eq!(lines[5], "unfinished sagas by step:");
        let row = lines
            .iter()
            .find(|l| l.starts_with("order_fulfillment"))
            .unwrap();
        for cell in [
            "create_order",
            "order",
            "running",
            "2023-11-14T22:13:20.000Z",
            "10m",
        ] {
            assert!(row.contains(cell), "{row}");
        }
        let v = counts_json(&resp);
        assert_eq!(
            v["by_status"][1],
            json!({"status": "completed", "count": 40})
        );
        assert_eq!(v["by_step"][0]["oldest_updated_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["by_step"][0]["participant"], "order");

        let idle = CountSagasResponse {
            by_status: resp.by_status.clone(),
            by_step: vec![],
        };
        assert!(counts_table(&idle, now).ends_with("unfinished sagas by step:\n  (none)\n"));
        assert_eq!(
            counts_table(&CountSagasResponse::default(), now),
            "no sagas\n"
        );
    }

    fn step(name: &str, after: &[&str]) -> DefinitionStep {
        DefinitionStep {
            name: name.into(),
            participant: "p".into(),
            action: format!("do_{name}"),
            after: after.iter().map(|a| a.to_string()).collect(),
            timeout: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    fn def(steps: Vec<DefinitionStep>) -> Definition {
        Definition {
            name: "d".into(),
            version: 2,
            current: true,
            compensation_max_attempts: 10,
            steps,
            ..Default::default()
        }
    }

    /// The drawn lines that name a step, without its details.
    fn step_lines(text: &str) -> Vec<&str> {
        text.split_once("steps:\n")
            .unwrap()
            .1
            .lines()
            .filter(|l| l.contains(": do_") || l.ends_with("(start)"))
            .collect()
    }

    #[test]
    fn a_corridor_is_drawn_as_a_column_not_a_staircase() {
        let mut steps = vec![step("a", &[]), step("b", &["a"]), step("c", &["b"])];
        steps[1].pivot = true;
        steps[0].compensation = "undo_a".into();
        let mut d = def(steps);
        d.pivot_step = "b".into();
        let text = definition_text(&d);
        assert_eq!(
            text.split_once("steps:\n").unwrap().1,
            "a  p: do_a, undo: undo_a\n\
             │   timeout 10s\n\
             b (pivot)  p: do_b\n\
             │   timeout 10s\n\
             c  p: do_c\n    timeout 10s\n"
        );
        assert!(text.starts_with("definition:    d@2\nstate:         current"));
        assert!(text.contains("pivot:         b\n"), "{text}");
    }

    #[test]
    fn several_roots_fork_from_the_start_and_a_join_says_what_it_waits_for() {
        let d = def(vec![
            step("x", &[]),
            step("y", &[]),
            step("x2", &["x"]),
            step("z", &["x2", "y"]),
        ]);
        let text = definition_text(&d);
        assert_eq!(
            step_lines(&text),
            [
                "(start)",
                "├── x  p: do_x",
                "│   x2  p: do_x2",
                "├── y  p: do_y",
                "└── z  p: do_z",
            ],
            "{text}"
        );
        assert!(
            text.contains("└── z  p: do_z\n        after: x2, y\n"),
            "{text}"
        );
    }

    #[test]
    fn a_graph_the_server_should_never_send_is_still_drawn_whole() {
        // A cycle, an unknown step, a step waiting for itself, a duplicate name.
        let d = def(vec![
            step("a", &["b"]),
            step("b", &["a"]),
            step("c", &["nowhere", "c"]),
            step("c", &[]),
        ]);
        let text = definition_text(&d);
        let lines = step_lines(&text);
        assert_eq!(lines.len(), 5, "{text}");
        for name in ["a", "b", "c"] {
            assert!(
                lines.iter().any(|l| l.contains(&format!("{name}  p:"))),
                "{text}"
            );
        }
        assert!(
            text.contains("after: b\n") && text.contains("after: nowhere, c\n"),
            "{text}"
        );
        assert_eq!(
            definition_text(&def(vec![]))
                .split_once("steps:\n")
                .unwrap()
                .1,
            "  (none)\n"
        );
    }

    #[test]
    fn definitions_list_as_a_table_and_json() {
        let mut old = def(vec![step("a", &[])]);
        old.version = 1;
        old.current = false;
        old.retired = true;
        old.active_sagas = 3;
        let mut new = def(vec![step("a", &[]), step("b", &["a"])]);
        new.description = "two steps".into();
        new.steps[1].input_json = r#"{"id": "${input.id}", "n": 1}"#.into();
        let table = definitions_table(&[new.clone(), old.clone()]);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            [
                vec![
                    "NAME",
                    "VERSION",
                    "STEPS",
                    "ACTIVE",
                    "SAGAS",
                    "RETIRED",
                    "CURRENT",
                    "DESCRIPTION"
                ],
                vec!["d", "2", "2", "0", "no", "yes", "two", "steps"],
                vec!["d", "1", "1", "3", "yes", "no", "-"],
            ]
        );
        assert_eq!(definitions_table(&[]), "no definitions\n");
        let v = definitions_json(&[new]);
        let b = &v["definitions"][0]["steps"][1];
        assert_eq!(b["input"], json!({"id": "${input.id}", "n": 1}));
        assert_eq!(
            (
                &b["after"],
                &b["when"],
                &b["compensation"],
                &b["timeout_ms"]
            ),
            (&json!(["a"]), &Value::Null, &Value::Null, &json!(10_000))
        );
        let text = definition_text(&old);
        assert!(text.contains("state:         retired"), "{text}");
        assert!(text.contains("active sagas:  3\n"), "{text}");
    }
}
