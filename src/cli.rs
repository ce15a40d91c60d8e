//! The pure half of `sagactl`: enum names, timestamps, JSON handling and the rendering of API
//! responses as text tables or JSON documents. Nothing here does I/O, so all of it is unit-tested
//! without a server; the binary only parses flags, calls the API and prints what these return.

use std::borrow::Cow;
use std::error::Error;
use std::fmt::Write as _;

use comfy_table::{ContentArrangement, Table, presets};
use prost_types::Timestamp;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::proto::v1::{
    CommandKind, HistoryEvent, Outcome, Saga, SagaStatus, SagaSummary, StartSagaResponse,
    StepAttempt,
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
        "output": json_value(&a.output_json),
        "reason": opt_string(&a.reason),
    })
}

fn event_json(e: &HistoryEvent) -> Value {
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
    field("current step", or_none(&saga.current_step));
    if !saga.idempotency_key.is_empty() {
        field("idempotency key", &saga.idempotency_key);
    }
    field("created", &timestamp_cell(saga.created_at.as_ref()));
    field("updated", &timestamp_cell(saga.updated_at.as_ref()));
    if !saga.error.is_empty() {
        field("error", &one_line(&saga.error));
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
            "CURRENT STEP",
            "UPDATED",
            "ERROR",
        ]);
        for s in sagas {
            table.add_row(vec![
                s.id.clone(),
                format!("{}@{}", s.definition, s.definition_version),
                saga_status_name(s.status).into_owned(),
                or_none(&s.current_step).to_owned(),
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
        assert!(text.contains("current step:    -\n"), "{text}");
        assert!(text.contains("error:           charge failed: card declined\n"));
        assert!(
            text.contains("input:\n  {\n    \"order_id\": 7\n  }\n"),
            "{text}"
        );
        assert!(!text.contains("idempotency key"));
        let reserve = text.lines().find(|l| l.starts_with("reserve ")).unwrap();
        for cell in [
            "action",
            "inventory",
            "000000a1",
            "success",
            r#"{"hold":"h1"}"#,
        ] {
            assert!(reserve.contains(cell), "{reserve}");
        }
        let charge = text.lines().find(|l| l.contains("payments")).unwrap();
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
}
