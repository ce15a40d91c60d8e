//! The console's pages. Each handler calls the gRPC service methods in-process with the
//! session's caller (or, for what the API has no call for, the store's read-only queries) and
//! renders HTML with `maud`, which escapes every value it interpolates.
// A handler's error is the page that explains it, as axum handlers return it; boxing it would
// only add a step to every `?`.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures::{Stream, StreamExt};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::Request;
use uuid::Uuid;

use super::Console;
use super::graph::{self, Node};
use super::session::{self, Session};
use crate::api::auth::Scope;
use crate::proto::v1 as pb;
use pb::admin_service_server::AdminService;
use pb::saga_service_server::SagaService;

type Page = Result<Response, Response>;

// ---------------------------------------------------------------------------------------------
// Plumbing: calls, errors, layout.

/// A request to the in-process API, made as the session's operator.
fn call<T>(session: &Session, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(session.caller.clone());
    r
}

fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted | FailedPrecondition => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn api_error(s: tonic::Status) -> Response {
    error_page(http_status(s.code()), s.message())
}

fn store_error(e: crate::store::StoreError) -> Response {
    api_error(crate::api::status_of(e))
}

/// A page that says what went wrong, without the navigation (the session may be what failed).
pub fn error_page(code: StatusCode, message: &str) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "sagad console: " (code.as_u16()) } link rel="stylesheet" href="/assets/console.css"; }
            body { main class="narrow" {
                h1 { (code.canonical_reason().unwrap_or("error")) }
                p class="error" id="error" { (message) }
                p { a href="/" { "Back to the inbox" } }
            } }
        }
    };
    (code, body).into_response()
}

/// A full page: navigation, then `body`; `live` is the event stream that tells the page to
/// refresh itself (see console.js).
fn layout(s: &Session, title: &str, live: Option<&str>, body: Markup) -> Response {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sagad" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header class="top" {
                    a class="brand" href="/" { "sagad" }
                    nav {
                        a href="/" { "Inbox" }
                        a href="/sagas" { "Sagas" }
                        a href="/participants" { "Participants" }
                        a href="/definitions" { "Definitions" }
                        a href="/redrive" { "Redrive" }
                    }
                    form class="search" method="get" action="/search" {
                        input type="search" name="q" placeholder="saga id, command id, key, or field=value" aria-label="search";
                    }
                    form class="logout" method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(s.csrf);
                        span class="who" { (s.caller.name) }
                        button type="submit" { "Log out" }
                    }
                }
                main id="live" data-live=[live] { (body) }
            }
        }
    }
    .into_response()
}

fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

fn ago(t: Option<&prost_types::Timestamp>, now: OffsetDateTime) -> String {
    let Some(t) = t else { return String::new() };
    let secs = (now.unix_timestamp() - t.seconds).max(0) as u64;
    if secs == 0 {
        return "just now".into();
    }
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn since(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (now - t).whole_seconds().max(0) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_default()
}

fn status_name(code: i32) -> &'static str {
    match pb::SagaStatus::try_from(code).unwrap_or(pb::SagaStatus::Unspecified) {
        pb::SagaStatus::Running => "running",
        pb::SagaStatus::Compensating => "compensating",
        pb::SagaStatus::Completed => "completed",
        pb::SagaStatus::Compensated => "compensated",
        pb::SagaStatus::NeedsOperator => "needs_operator",
        pb::SagaStatus::Resolved => "resolved",
        pb::SagaStatus::Unspecified => "unknown",
    }
}

fn badge(status: &str) -> Markup {
    html! { span class={"badge s-" (status)} { (status) } }
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_string())
}

/// A JSON value, pretty-printed in a block with a copy button.
fn json_block(id: &str, json: &str) -> Markup {
    html! {
        div class="json" {
            button type="button" class="copy" data-copy=(id) { "Copy" }
            pre id=(id) { (pretty(json)) }
        }
    }
}

fn bounded(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}…")
    }
}

// ---------------------------------------------------------------------------------------------
// Login.

pub async fn login_form(State(c): State<Console>, headers: axum::http::HeaderMap) -> Response {
    if c.tokens.is_empty() {
        return Redirect::to("/").into_response();
    }
    login_page(&c, &headers, StatusCode::OK, None)
}

/// The login form's CSRF token the browser already holds, if any.
fn login_nonce(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| session::cookie(h, session::LOGIN_COOKIE))
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The login form with its CSRF token: the one the browser holds (so two tabs, or a reload,
/// keep working), else a new one set in the cookie.
fn login_page(
    c: &Console,
    headers: &axum::http::HeaderMap,
    code: StatusCode,
    problem: Option<&str>,
) -> Response {
    let held = login_nonce(headers);
    let nonce = held.map_or_else(session::random_token, str::to_owned);
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Log in · sagad" } link rel="stylesheet" href="/assets/console.css"; }
            body { main class="narrow" {
                h1 { "sagad console" }
                @if let Some(p) = problem { p class="error" id="error" { (p) } }
                form method="post" action="/login" {
                    input type="hidden" name="csrf" value=(nonce);
                    label { "Operator token" input type="password" name="token" autocomplete="current-password" required autofocus; }
                    button type="submit" { "Log in" }
                }
            } }
        }
    };
    let mut resp = (code, body).into_response();
    if held.is_none()
        && let Ok(v) = HeaderValue::from_str(&session::set_login_cookie(&nonce, c.secure))
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

pub async fn login(
    State(c): State<Console>,
    headers: axum::http::HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if c.tokens.is_empty() {
        return Redirect::to("/").into_response();
    }
    if !session::same_token(&f.csrf, login_nonce(&headers).unwrap_or_default()) {
        return login_page(
            &c,
            &headers,
            StatusCode::FORBIDDEN,
            Some("the login form expired or did not come from this console: try again"),
        );
    }
    let Some(caller) = c.tokens.authenticate(f.token.trim()).cloned() else {
        return login_page(
            &c,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some("unknown token"),
        );
    };
    if caller.scope != Scope::Operator {
        return login_page(
            &c,
            &headers,
            StatusCode::FORBIDDEN,
            Some("this is a participant token: the console is for operator tokens only"),
        );
    }
    tracing::info!(actor = %caller.name, "console login");
    let (id, _) = c.sessions.open(caller);
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(Some(&id), c.secure)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

pub async fn logout(State(c): State<Console>, headers: axum::http::HeaderMap) -> Response {
    if let Some(id) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| session::cookie(h, session::COOKIE))
    {
        c.sessions.close(id);
    }
    let mut resp = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(None, c.secure)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Static assets, embedded in the binary.

pub async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

pub async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Filters shared by the saga list and the redrive.

/// A saga filter as it travels in a URL or a form; every field optional text.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Filter {
    status: String,
    definition: String,
    version: String,
    step: String,
    participant: String,
    stuck_for: String,
    error: String,
    created_after: String,
    created_before: String,
}

const STATUS_CHOICES: [(&str, &str); 8] = [
    ("", "any status"),
    ("unfinished", "unfinished"),
    ("running", "running"),
    ("compensating", "compensating"),
    ("needs_operator", "needs operator"),
    ("completed", "completed"),
    ("compensated", "compensated"),
    ("resolved", "resolved"),
];

fn parse_time(field: &str, text: &str) -> Result<Option<prost_types::Timestamp>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let rfc = time::format_description::well_known::Rfc3339;
    // What a datetime-local input sends: no seconds, no zone (taken as UTC).
    let local = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    let t = OffsetDateTime::parse(text, &rfc)
        .or_else(|_| time::PrimitiveDateTime::parse(text, &local).map(|t| t.assume_utc()))
        .map_err(|_| format!("{field}: {text:?} is not a time (2026-12-03T18:00 or RFC 3339)"))?;
    Ok(Some(crate::api::convert::timestamp(t)))
}

impl Filter {
    fn to_pb(&self) -> Result<pb::ListSagasRequest, String> {
        let statuses = match self.status.trim() {
            "" => vec![],
            "unfinished" => vec![
                pb::SagaStatus::Running as i32,
                pb::SagaStatus::Compensating as i32,
                pb::SagaStatus::NeedsOperator as i32,
            ],
            s => vec![
                pb::SagaStatus::from_str_name(&format!("SAGA_STATUS_{}", s.to_ascii_uppercase()))
                    .ok_or_else(|| format!("status: {s:?} is not a saga status"))?
                    as i32,
            ],
        };
        let version = match self.version.trim() {
            "" => 0,
            v => v
                .parse::<u32>()
                .map_err(|_| format!("version: {v:?} is not a number"))?,
        };
        let stuck_for = match self.stuck_for.trim() {
            "" => None,
            d => Some(
                humantime::parse_duration(d)
                    .map_err(|e| format!("stuck for: {d:?}: {e}"))
                    .and_then(|d| {
                        prost_types::Duration::try_from(d)
                            .map_err(|_| format!("stuck for: {d:?} is too long"))
                    })?,
            ),
        };
        Ok(pb::ListSagasRequest {
            statuses,
            definition: self.definition.trim().to_string(),
            definition_version: version,
            stuck_for,
            participant: self.participant.trim().to_string(),
            step: self.step.trim().to_string(),
            error_contains: self.error.trim().to_string(),
            created_after: parse_time("created after", &self.created_after)?,
            created_before: parse_time("created before", &self.created_before)?,
            ..Default::default()
        })
    }

    fn pairs(&self) -> [(&'static str, &str); 9] {
        [
            ("status", &self.status),
            ("definition", &self.definition),
            ("version", &self.version),
            ("step", &self.step),
            ("participant", &self.participant),
            ("stuck_for", &self.stuck_for),
            ("error", &self.error),
            ("created_after", &self.created_after),
            ("created_before", &self.created_before),
        ]
    }

    /// The filter as a query string (only the fields set).
    fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.pairs() {
            if !v.trim().is_empty() {
                q.append_pair(k, v.trim());
            }
        }
        q.finish()
    }

    fn hidden(&self) -> Markup {
        html! {
            @for (k, v) in self.pairs() {
                @if !v.trim().is_empty() { input type="hidden" name=(k) value=(v.trim()); }
            }
        }
    }

    fn fields(&self) -> Markup {
        html! {
            div class="filters" {
                label { "Status" select name="status" {
                    @for (value, text) in STATUS_CHOICES {
                        option value=(value) selected[self.status == value] { (text) }
                    }
                } }
                label { "Definition" input name="definition" value=(self.definition); }
                label { "Version" input name="version" size="4" value=(self.version); }
                label { "Current step" input name="step" value=(self.step); }
                label { "Participant" input name="participant" value=(self.participant); }
                label { "Stuck for" input name="stuck_for" size="6" placeholder="10m" value=(self.stuck_for); }
                label { "Error contains" input name="error" value=(self.error); }
                label { "Created after" input name="created_after" placeholder="2026-12-03T18:00" value=(self.created_after); }
                label { "Created before" input name="created_before" placeholder="2026-12-03T19:00" value=(self.created_before); }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The inbox.

/// Error groups shown on the inbox.
const ERROR_GROUPS: i64 = 50;

async fn participant_states(c: &Console, s: &Session) -> HashMap<String, pb::Participant> {
    match c
        .admin
        .list_participants(call(s, pb::ListParticipantsRequest {}))
        .await
    {
        Ok(r) => r
            .into_inner()
            .participants
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect(),
        Err(_) => HashMap::new(),
    }
}

fn participant_flags(p: Option<&pb::Participant>) -> Markup {
    html! {
        @if let Some(p) = p {
            @if p.paused { span class="flag paused" title=(format!("paused by {}: {}", p.paused_by, p.paused_reason)) { "paused" } }
            @match pb::CircuitState::try_from(p.circuit).unwrap_or(pb::CircuitState::Unspecified) {
                pb::CircuitState::Open => span class="flag open" { "circuit open" },
                pb::CircuitState::HalfOpen => span class="flag open" { "circuit half-open" },
                _ => {},
            }
        }
    }
}

pub async fn inbox(State(c): State<Console>, Extension(s): Extension<Session>) -> Page {
    let store = c.driver.store();
    let waiting = store.waiting_by_step().await.map_err(store_error)?;
    let errors = store
        .failing_by_error(ERROR_GROUPS)
        .await
        .map_err(store_error)?;
    let participants = participant_states(&c, &s).await;
    let now = c.driver.clock().now();
    let link = |f: Filter| format!("/sagas?{}", f.query());
    let redrive = |f: Filter| format!("/redrive?{}", f.query());
    let body = html! {
        h1 { "Stuck-saga inbox" }
        p class="hint" { "Unfinished sagas, oldest first. A saga with parallel steps counts at each current step." }
        @if waiting.is_empty() {
            p class="empty" { "No unfinished sagas." }
        } @else {
            table id="waiting" {
                thead { tr { th { "Definition" } th { "Version" } th { "Step" } th { "Participant" } th { "Status" } th class="num" { "Sagas" } th { "Oldest waiting" } th {} } }
                tbody { @for w in &waiting {
                    @let f = Filter {
                        status: w.status.as_str().into(), definition: w.definition.clone(),
                        version: w.version.to_string(), step: w.step.clone(), ..Filter::default()
                    };
                    tr {
                        td { (w.definition) } td { (w.version) }
                        td { (w.step) }
                        td { (w.participant) " " (participant_flags(participants.get(&w.participant))) }
                        td { (badge(w.status.as_str())) }
                        td class="num" { a href=(link(f.clone())) { (w.count) } }
                        td { (since(w.oldest_updated_at, now)) }
                        td { a href=(redrive(f)) { "redrive…" } }
                    }
                } }
            }
        }
        h2 { "Failing, by error" }
        @if errors.is_empty() {
            p class="empty" { "No unfinished saga has an error." }
        } @else {
            table id="errors" {
                thead { tr { th { "Error" } th { "Definition" } th class="num" { "Sagas" } th { "Oldest" } th {} } }
                tbody { @for g in &errors {
                    // The list filters on a substring: the start of the text finds the group.
                    @let f = Filter {
                        status: "unfinished".into(), definition: g.definition.clone(),
                        error: bounded(&g.error, 200).trim_end_matches('…').to_string(), ..Filter::default()
                    };
                    tr {
                        td class="errtext" title=(g.error) { (bounded(&g.error, 300)) }
                        td { (g.definition) }
                        td class="num" { a href=(link(f.clone())) { (g.count) } }
                        td { (since(g.oldest_updated_at, now)) }
                        td { a href=(redrive(f)) { "redrive…" } }
                    }
                } }
            }
        }
    };
    Ok(layout(&s, "Inbox", None, body))
}

// ---------------------------------------------------------------------------------------------
// Saga list and search.

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ListQuery {
    #[serde(flatten)]
    filter: Filter,
    page: String,
}

fn summaries_table(sagas: &[pb::SagaSummary], now: OffsetDateTime) -> Markup {
    html! {
        table id="sagas" {
            thead { tr { th { "Saga" } th { "Definition" } th { "Status" } th { "Current steps" } th { "Updated" } th { "Error" } } }
            tbody { @for x in sagas {
                tr {
                    td class="id" { a href={"/sagas/" (x.id)} { (x.id) } }
                    td { (x.definition) " v" (x.definition_version) }
                    td { (badge(status_name(x.status))) }
                    td { (x.current_steps.join(", ")) }
                    td { (ago(x.updated_at.as_ref(), now)) }
                    td class="errtext" title=(x.error) { (bounded(&x.error, 120)) }
                }
            } }
        }
    }
}

pub async fn saga_list(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Query(q): Query<ListQuery>,
) -> Page {
    let mut req = q
        .filter
        .to_pb()
        .map_err(|e| error_page(StatusCode::BAD_REQUEST, &e))?;
    req.page_size = 50;
    req.page_token = q.page.clone();
    let list = c
        .sagas
        .list_sagas(call(&s, req))
        .await
        .map_err(api_error)?
        .into_inner();
    let now = c.driver.clock().now();
    let next = (!list.next_page_token.is_empty()).then(|| {
        let mut query = q.filter.query();
        if !query.is_empty() {
            query.push('&');
        }
        format!(
            "/sagas?{query}page={}",
            url::form_urlencoded::byte_serialize(list.next_page_token.as_bytes())
                .collect::<String>()
        )
    });
    let body = html! {
        h1 { "Sagas" }
        form method="get" action="/sagas" class="filterform" {
            (q.filter.fields())
            button type="submit" { "Filter" }
            " " a href={"/redrive?" (q.filter.query())} { "Redrive what this filter selects…" }
        }
        @if list.sagas.is_empty() { p class="empty" { "No saga matches." } }
        @else { (summaries_table(&list.sagas, now)) }
        @if let Some(next) = next { p { a href=(next) rel="next" { "Next page →" } } }
    };
    Ok(layout(&s, "Sagas", None, body))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SearchQuery {
    q: String,
}

/// `a.b=value` as `{"a": {"b": value}}`, the value as JSON when it parses (numbers, booleans),
/// else as a string.
fn containment(path: &str, value: &str) -> Option<Value> {
    let value = value.trim();
    let leaf = serde_json::from_str::<Value>(value)
        .ok()
        .filter(|v| !v.is_object() && !v.is_array())
        .unwrap_or_else(|| Value::String(value.to_string()));
    let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return None;
    }
    Some(keys.iter().rev().fold(leaf, |acc, k| {
        let mut m = serde_json::Map::new();
        m.insert((*k).to_string(), acc);
        Value::Object(m)
    }))
}

pub async fn search(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Query(q): Query<SearchQuery>,
) -> Page {
    let text = q.q.trim();
    let store = c.driver.store();
    let found = |id: Uuid| Ok(Redirect::to(&format!("/sagas/{id}")).into_response());
    if let Ok(id) = Uuid::parse_str(text) {
        if store.saga_status(id).await.map_err(store_error)?.is_some() {
            return found(id);
        }
        if let Some(saga) = store.saga_of_command(id).await.map_err(store_error)? {
            return found(saga);
        }
    }
    if !text.is_empty()
        && let Some(saga) = store.saga_of_key(text).await.map_err(store_error)?
    {
        return found(saga);
    }
    let mut results = Vec::new();
    let mut searched_input = None;
    if let Some((path, value)) = text.split_once('=')
        && let Some(v) = containment(path, value)
    {
        results = store
            .sagas_with_input(&v, 50)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(crate::api::convert::summary_to_pb)
            .collect();
        searched_input = Some(v.to_string());
    }
    let now = c.driver.clock().now();
    let body = html! {
        h1 { "Search" }
        form method="get" action="/search" class="filterform" {
            input type="search" name="q" value=(text) size="60";
            button type="submit" { "Search" }
        }
        @if let Some(v) = &searched_input {
            p { "Sagas whose input contains " code { (v) } " (newest first, at most 50):" }
            @if results.is_empty() { p class="empty" { "None." } } @else { (summaries_table(&results, now)) }
        } @else if !text.is_empty() {
            p class="empty" { "No saga has the id, a command with the id, or the idempotency key " code { (text) } "." }
        }
        p class="hint" { "Search by saga id, command id, idempotency key, or a value in the input: "
            code { "order_id=A-1001" } ", " code { "customer.id=42" } "." }
    };
    Ok(layout(&s, "Search", None, body))
}

// ---------------------------------------------------------------------------------------------
// One saga.

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SagaQuery {
    /// Timeline filters.
    step: String,
    kind: String,
    problems: String,
    /// The action just applied (Post/Redirect/Get), shown once as a banner.
    done: String,
}

/// History kinds that say something went wrong or needed a person.
const PROBLEMS: [&str; 7] = [
    "step_failed",
    "step_timed_out",
    "compensation_failed",
    "late_reply",
    "needs_operator",
    "operator_action",
    "retry_scheduled",
];

fn unfinished(status: &str) -> bool {
    matches!(status, "running" | "compensating" | "needs_operator")
}

/// What a wait time means for a step in this state.
fn wait_label(state: &str) -> &'static str {
    match state {
        "running" | "compensating" => "reply due by",
        "retry_wait" | "comp_retry_wait" => "next attempt at",
        _ => "until",
    }
}

async fn get_saga(c: &Console, s: &Session, id: &str) -> Result<pb::Saga, Response> {
    c.sagas
        .get_saga(call(
            s,
            pb::GetSagaRequest {
                saga_id: id.to_string(),
            },
        ))
        .await
        .map(|r| r.into_inner())
        .map_err(api_error)
}

/// The command input of each mapped step of the saga, by (step, kind): what the mapping gives on
/// the saga's data, which is what was sent (inputs and saved outputs do not change). Steps that
/// do not map their input are sent the saga's input and outputs, shown on the page already.
fn mapped_inputs(c: &Console, saga: &pb::Saga) -> HashMap<(String, i32), String> {
    use crate::engine::Kind;
    use crate::graph::Facts;
    let Some(def) = c
        .driver
        .registry()
        .get(&saga.definition, saga.definition_version)
    else {
        return HashMap::new();
    };
    let input: Value = serde_json::from_str(&saga.input_json).unwrap_or(Value::Null);
    let stored: Value = serde_json::from_str(&saga.outputs_json).unwrap_or(Value::Null);
    let outputs: Vec<Option<Value>> = def
        .steps
        .iter()
        .map(|st| stored.get(&st.name).cloned())
        .collect();
    let facts = crate::graph::DataFacts {
        def: &def,
        data: crate::expr::Data {
            input: &input,
            saga_id: saga.id.parse().unwrap_or_default(),
            outputs: &outputs,
        },
    };
    let mut inputs = HashMap::new();
    for (i, st) in def.steps.iter().enumerate() {
        for (kind, pb_kind) in [
            (Kind::Action, pb::CommandKind::Action),
            (Kind::Compensation, pb::CommandKind::Compensation),
        ] {
            let text = match facts.command_input(i, kind, &[]) {
                Ok(Some(v)) => v.to_string(),
                Ok(None) => continue,
                Err(e) => format!("\"cannot be rendered now: {e}\""),
            };
            inputs.insert((st.name.clone(), pb_kind as i32), text);
        }
    }
    inputs
}

pub async fn saga_page(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<SagaQuery>,
) -> Page {
    let saga = get_saga(&c, &s, &id).await?;
    let participants = participant_states(&c, &s).await;
    let definition = c
        .admin
        .get_definition(call(
            &s,
            pb::GetDefinitionRequest {
                name: saga.definition.clone(),
                version: saga.definition_version,
            },
        ))
        .await
        .ok()
        .map(|r| r.into_inner());
    let conditions: HashMap<&str, &str> = definition
        .iter()
        .flat_map(|d| &d.steps)
        .filter(|st| !st.when.is_empty())
        .map(|st| (st.name.as_str(), st.when.as_str()))
        .collect();
    let inputs = mapped_inputs(&c, &saga);
    let now = c.driver.clock().now();
    let status = status_name(saga.status);
    let current: Vec<&pb::StepState> = saga
        .steps
        .iter()
        .filter(|st| saga.current_steps.contains(&st.name))
        .collect();
    let nodes: Vec<Node<'_>> = saga
        .steps
        .iter()
        .map(|st| Node {
            name: &st.name,
            participant: &st.participant,
            state: Some(&st.state),
            after: &st.after,
            pivot: st.pivot,
            when: conditions.get(st.name.as_str()).copied(),
        })
        .collect();
    let step_names: Vec<&str> = {
        let mut v: Vec<&str> = saga
            .history
            .iter()
            .map(|h| h.step.as_str())
            .filter(|x| !x.is_empty())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let kinds: Vec<&str> = {
        let mut v: Vec<&str> = saga.history.iter().map(|h| h.kind.as_str()).collect();
        v.sort();
        v.dedup();
        v
    };
    let events: Vec<&pb::HistoryEvent> = saga
        .history
        .iter()
        .filter(|h| q.step.is_empty() || h.step == q.step)
        .filter(|h| q.kind.is_empty() || h.kind == q.kind)
        .filter(|h| q.problems.is_empty() || PROBLEMS.contains(&h.kind.as_str()))
        .collect();
    let action_link = |action: &str, step: &str| {
        if step.is_empty() {
            format!("/sagas/{}/actions/{action}", saga.id)
        } else {
            format!(
                "/sagas/{}/actions/{action}?step={}",
                saga.id,
                url::form_urlencoded::byte_serialize(step.as_bytes()).collect::<String>()
            )
        }
    };
    let body = html! {
        @if !q.done.is_empty() {
            p class="done" id="done" { "Done: " (q.done) ". It is in the timeline below." }
        }
        section class="why" id="why" {
            h1 { "Saga " span class="id" { (saga.id) } }
            p {
                (badge(status)) " "
                a href={"/definitions/" (saga.definition) "/" (saga.definition_version)} { (saga.definition) " v" (saga.definition_version) }
                " · started " (ago(saga.created_at.as_ref(), now))
                " · last progress " (ago(saga.updated_at.as_ref(), now))
                @if !saga.idempotency_key.is_empty() { " · key " code { (saga.idempotency_key) } }
            }
            ul class="reasons" id="reasons" {
                @for st in &current {
                    @if let Some(p) = participants.get(&st.participant) {
                        @if p.paused {
                            li {
                                "Commands to " b { (p.name) } " are held: paused by " (p.paused_by) " "
                                (ago(p.paused_at.as_ref(), now)) " — " (p.paused_reason) ". "
                                form method="post" action={"/participants/" (p.name) "/resume"} class="inline" {
                                    (csrf(&s))
                                    input type="hidden" name="back" value={"/sagas/" (saga.id)};
                                    input name="reason" placeholder="reason" required size="18";
                                    button type="submit" { "Resume " (p.name) }
                                }
                            }
                        }
                        @if p.circuit == pb::CircuitState::Open as i32 || p.circuit == pb::CircuitState::HalfOpen as i32 {
                            li { "The circuit to " b { (p.name) } " is open after " (p.consecutive_failures)
                                " failures in a row: its commands wait for a probe to succeed." }
                        }
                    }
                    @if st.state == "retry_wait" || st.state == "comp_retry_wait" {
                        li { "Step " b { (st.name) } " failed attempt " (st.attempt) ": " (st.reason)
                            "; next attempt at " (when(st.wake_at.as_ref())) "." }
                    }
                }
                @if status == "needs_operator" {
                    li { "A compensation failed for good: sagad waits for an operator (retry it, skip it with an output, or resolve the saga)." }
                }
            }
            @if !saga.error.is_empty() {
                h2 { "Last error" }
                pre class="error" id="last-error" { (saga.error) }
            }
            @if !current.is_empty() {
                h2 { "Current steps" }
                table id="current" {
                    thead { tr { th { "Step" } th { "Participant" } th { "State" } th class="num" { "Attempt" } th { "Waiting" } th { "Reason" } th {} } }
                    tbody { @for st in &current {
                        tr {
                            td { (st.name) }
                            td { (st.participant) " " (participant_flags(participants.get(&st.participant))) }
                            td { span class={"state st-" (st.state)} { (st.state) } }
                            td class="num" { (st.attempt) }
                            td { @if st.wake_at.is_some() { (wait_label(&st.state)) " " (when(st.wake_at.as_ref())) } }
                            td class="errtext" { (st.reason) }
                            td class="actions" { @if unfinished(status) {
                                a href=(action_link("retry", &st.name)) { "Retry" } " "
                                a href=(action_link("skip", &st.name)) { "Skip" } " "
                                a href=(action_link("resolve", &st.name)) { "Resolve" }
                            } }
                        }
                    } }
                }
            }
            @if unfinished(status) {
                p class="actions" id="actions" {
                    "Act on the whole saga: "
                    a href=(action_link("compensate", "")) { "Compensate" } " "
                    a href=(action_link("resolve", "")) { "Resolve" }
                }
            }
        }
        @if !nodes.is_empty() {
            h2 { "Graph" }
            div class="graphbox" { (graph::svg(&nodes)) }
        }
        h2 { "Input" }
        (json_block("input", &saga.input_json))
        h2 { "Outputs" }
        (json_block("outputs", &saga.outputs_json))
        h2 { "Attempts" }
        table id="attempts" {
            thead { tr { th { "Step" } th { "Kind" } th class="num" { "#" } th { "Sent" } th { "Replied" } th { "Outcome" } th { "Input, output, reason" } } }
            tbody { @for (i, a) in saga.attempts.iter().enumerate() {
                tr {
                    td { (a.step) } td { (if a.kind == pb::CommandKind::Compensation as i32 { "compensation" } else { "action" }) }
                    td class="num" { (a.attempt) }
                    td { (when(a.sent_at.as_ref())) }
                    td { (when(a.replied_at.as_ref())) }
                    td {
                        @match pb::Outcome::try_from(a.outcome).unwrap_or(pb::Outcome::Unspecified) {
                            pb::Outcome::Success => span class="ok" { "success" },
                            pb::Outcome::Failure => span class="bad" { "failure" },
                            pb::Outcome::Unspecified => @if a.timed_out { span class="bad" { "timed out" } } @else if a.superseded { "superseded" } @else { "awaiting reply" },
                        }
                    }
                    td {
                        @if let Some(input) = inputs.get(&(a.step.clone(), a.kind)) {
                            details { summary { "input" } (json_block(&format!("in-{i}"), input)) }
                        } @else {
                            details { summary { "input" } p class="hint" { "The saga's input and the outputs before this step (above)." } }
                        }
                        @if !a.reason.is_empty() { pre class="error" { (a.reason) } }
                        @if !a.output_json.is_empty() { details { summary { "output" } (json_block(&format!("out-{i}"), &a.output_json)) } }
                    }
                }
            } }
        }
        h2 { "Timeline" }
        form method="get" action={"/sagas/" (saga.id)} class="filterform" id="timeline-filter" {
            label { "Step" select name="step" {
                option value="" { "all" }
                @for n in &step_names { option value=(n) selected[q.step == *n] { (n) } }
            } }
            label { "Kind" select name="kind" {
                option value="" { "all" }
                @for k in &kinds { option value=(k) selected[q.kind == *k] { (k) } }
            } }
            label { input type="checkbox" name="problems" value="1" checked[!q.problems.is_empty()]; " problems only" }
            button type="submit" { "Show" }
        }
        table id="timeline" {
            thead { tr { th class="num" { "#" } th { "At" } th { "Event" } th { "Step" } th { "Detail" } } }
            tbody { @for h in &events {
                tr class={"ev-" (h.kind)} {
                    td class="num" { (h.seq) }
                    td { (when(h.at.as_ref())) }
                    td { (h.kind) }
                    td { (h.step) }
                    td class="detail" { (detail(&h.detail_json)) }
                }
            } }
        }
        p class="hint" { (events.len()) " of " (saga.history.len()) " events." }
    };
    let last_seq = saga.history.iter().map(|h| h.seq).max().unwrap_or(0);
    let live = format!("/sagas/{}/events?after={last_seq}", saga.id);
    Ok(layout(&s, &format!("Saga {}", saga.id), Some(&live), body))
}

/// A history event's detail: its fields as text (an operator's reason reads as a sentence,
/// not as JSON).
fn detail(json: &str) -> Markup {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(json) else {
        return html! { (json) };
    };
    html! {
        @for (k, v) in &map {
            span class="field" { span class="k" { (k) ": " } (match v { Value::String(s) => s.clone(), other => other.to_string() }) }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct EventsQuery {
    /// The last history event the page showed.
    after: i64,
}

/// Server-sent events: `changed` each time a commit of this process changes the saga. The page
/// then fetches itself again (console.js); nothing polls the database per viewer. On connect,
/// one read of the history after the page's last event closes the gap between the page's read
/// and this subscription.
pub async fn saga_events(
    State(c): State<Console>,
    Path(id): Path<Uuid>,
    Query(q): Query<EventsQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = tokio_stream::wrappers::BroadcastStream::new(c.driver.saga_changes());
    let store = c.driver.store().clone();
    let missed = futures::stream::once(async move {
        let moved = store
            .history_after(id, q.after)
            .await
            .map_or(true, |events| !events.is_empty());
        Ok(moved.then_some(id))
    });
    let stream = missed
        .chain(changes.map(|r| r.map(Some)))
        .filter_map(move |r| async move {
            let ours = match r {
                Ok(changed) => changed == Some(id),
                // Lagged: some changes were missed, one of them may have been this saga's.
                Err(_) => true,
            };
            ours.then(|| Ok(Event::default().event("changed").data(id.to_string())))
        })
        .take_until(c.shutdown.clone().cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ---------------------------------------------------------------------------------------------
// Repairs: a preview that says what will happen, then the call, then the saga with the result.

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ActionQuery {
    step: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ActionForm {
    step: String,
    reason: String,
    output: String,
}

fn action_title(action: &str, step: &str) -> Option<String> {
    let on = if step.is_empty() {
        String::new()
    } else {
        format!(" step {step}")
    };
    Some(match action {
        "retry" => format!("Retry{on}"),
        "skip" => format!("Skip{on}"),
        "compensate" => "Compensate the saga".into(),
        "resolve" => {
            format!(
                "Resolve the saga{}",
                if step.is_empty() { "" } else { " at" }
            ) + &on
        }
        _ => return None,
    })
}

fn preview(
    saga: &pb::Saga,
    action: &str,
    step: &str,
    participants: &HashMap<String, pb::Participant>,
) -> Markup {
    let st = saga.steps.iter().find(|x| x.name == step);
    let done: Vec<&str> = saga
        .steps
        .iter()
        .filter(|x| x.state == "succeeded")
        .map(|x| x.name.as_str())
        .rev()
        .collect();
    html! {
        @match action {
            "retry" => {
                p { "Sends the command of step " b { (step) } " again now, as attempt "
                    (st.map_or(1, |x| x.attempt + 1)) ", without waiting for a back-off or a deadline. "
                    "An attempt still in flight is given up: its late reply is recorded but no longer moves the saga." }
                @if let Some(p) = st.and_then(|x| participants.get(&x.participant)).filter(|p| p.paused) {
                    p class="warn" { "Participant " b { (p.name) } " is paused: the command waits in the outbox until it is resumed." }
                }
            },
            "skip" => {
                p { "Marks step " b { (step) } " as succeeded without running it, with the output below "
                    "(JSON; empty means null). The saga then goes on to the steps after it. Use it only when "
                    "the step's effect was made by hand or is not needed." }
            },
            "compensate" => {
                p { "Stops going forward and compensates the steps that succeeded, in reverse order: "
                    @if done.is_empty() { "none has succeeded, so the saga ends compensated." }
                    @else { b { (done.join(" → ")) } "." } }
                p { "Refused once the saga has passed its pivot step: it can then only go forward." }
            },
            "resolve" => {
                p { "Marks the saga " b { "resolved" } ": sagad stops working on it and sends nothing more. "
                    "Use it when the system was made consistent by hand." }
            },
            _ => {},
        }
    }
}

async fn action_form(
    c: &Console,
    s: &Session,
    id: &str,
    action: &str,
    step: &str,
    problem: Option<(StatusCode, String)>,
    form: &ActionForm,
) -> Page {
    let title = action_title(action, step)
        .ok_or_else(|| error_page(StatusCode::NOT_FOUND, "no such action"))?;
    let saga = get_saga(c, s, id).await?;
    let participants = participant_states(c, s).await;
    let body = html! {
        h1 { (title) }
        p { "Saga " a href={"/sagas/" (saga.id)} { span class="id" { (saga.id) } } " " (badge(status_name(saga.status)))
            @if !saga.current_steps.is_empty() { " at " (saga.current_steps.join(", ")) } }
        @if let Some((_, message)) = &problem {
            p class="error" id="error" { "Refused: " (message) }
        }
        h2 { "What will happen" }
        (preview(&saga, action, step, &participants))
        form method="post" id="action-form" {
            (csrf(s))
            input type="hidden" name="step" value=(step);
            label { "Reason (recorded in the saga's history with your name)"
                textarea name="reason" rows="3" cols="70" required { (form.reason) } }
            @if action == "skip" {
                label { "Output (JSON)" textarea name="output" rows="4" cols="70" { (form.output) } }
            }
            button type="submit" class="danger" { (title) }
            " " a href={"/sagas/" (saga.id)} { "Cancel" }
        }
    };
    let code = problem.map_or(StatusCode::OK, |(c, _)| c);
    let mut resp = layout(s, &title, None, body);
    *resp.status_mut() = code;
    Ok(resp)
}

pub async fn action_preview(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
) -> Page {
    action_form(
        &c,
        &s,
        &id,
        &action,
        q.step.trim(),
        None,
        &ActionForm::default(),
    )
    .await
}

pub async fn action_apply(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<ActionForm>,
) -> Page {
    let step = f.step.trim().to_string();
    let repair = |saga_id: String| pb::RepairRequest {
        saga_id,
        reason: f.reason.clone(),
        step: step.clone(),
    };
    let result = match action.as_str() {
        "retry" => c.admin.retry_step(call(&s, repair(id.clone()))).await,
        "compensate" => c.admin.compensate_saga(call(&s, repair(id.clone()))).await,
        "resolve" => c.admin.resolve_saga(call(&s, repair(id.clone()))).await,
        "skip" => {
            let req = pb::SkipStepRequest {
                saga_id: id.clone(),
                reason: f.reason.clone(),
                output_json: f.output.clone(),
                step: step.clone(),
            };
            c.admin.skip_step(call(&s, req)).await
        }
        _ => return Err(error_page(StatusCode::NOT_FOUND, "no such action")),
    };
    match result {
        Ok(_) => {
            let title = action_title(&action, &step)
                .unwrap_or_default()
                .to_lowercase();
            let done: String = url::form_urlencoded::byte_serialize(title.as_bytes()).collect();
            Ok(Redirect::to(&format!("/sagas/{id}?done={done}")).into_response())
        }
        Err(status) => {
            let problem = Some((http_status(status.code()), status.message().to_string()));
            action_form(&c, &s, &id, &action, &step, problem, &f).await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Participants.

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DoneQuery {
    done: String,
}

/// Messages waiting and consumers of each participant's queue, by a passive declare (which
/// changes nothing); empty when the broker cannot be reached within two seconds.
async fn queue_stats(c: &Console, names: &[String]) -> HashMap<String, (u32, u32)> {
    let read = async {
        let conn = crate::broker::connect(&c.amqp_url, c.amqp_ca.as_deref()).await?;
        let ch = conn.create_channel().await?;
        let mut stats = HashMap::new();
        for n in names {
            let q = ch
                .queue_declare(
                    crate::contract::participant_queue(n).as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await?;
            stats.insert(n.clone(), (q.message_count(), q.consumer_count()));
        }
        let _ = ch.close(200, "read".into()).await;
        let _ = conn.close(200, "read".into()).await;
        Ok::<_, lapin::Error>(stats)
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(stats)) => stats,
        _ => HashMap::new(),
    }
}

pub async fn participants(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Query(q): Query<DoneQuery>,
) -> Page {
    let list = c
        .admin
        .list_participants(call(&s, pb::ListParticipantsRequest {}))
        .await
        .map_err(api_error)?
        .into_inner()
        .participants;
    let names: Vec<String> = list.iter().map(|p| p.name.clone()).collect();
    let queues = queue_stats(&c, &names).await;
    let now = c.driver.clock().now();
    let body = html! {
        h1 { "Participants" }
        @if !q.done.is_empty() { p class="done" id="done" { "Done: " (q.done) "." } }
        table id="participants" {
            thead { tr { th { "Participant" } th { "Dispatch" } th { "Circuit" } th class="num" { "Failures in a row" } th class="num" { "Held commands" } th class="num" { "Queue depth" } th class="num" { "Consumers" } th { "Pause / resume" } } }
            tbody { @for p in &list {
                @let circuit = match pb::CircuitState::try_from(p.circuit).unwrap_or(pb::CircuitState::Unspecified) {
                    pb::CircuitState::Open => "open", pb::CircuitState::HalfOpen => "half-open", _ => "closed",
                };
                tr data-participant=(p.name) {
                    td { (p.name) }
                    td { @if p.paused { span class="flag paused" { "paused" } " by " (p.paused_by) " " (ago(p.paused_at.as_ref(), now)) ": " (p.paused_reason) } @else { "flowing" } }
                    td { (circuit) @if p.circuit_changed_at.is_some() { " since " (ago(p.circuit_changed_at.as_ref(), now)) } }
                    td class="num" { (p.consecutive_failures) }
                    td class="num" { (p.held_commands) }
                    @match queues.get(&p.name) {
                        Some((depth, consumers)) => { td class="num" { (depth) } td class="num" { (consumers) } },
                        None => { td class="num" { "?" } td class="num" { "?" } },
                    }
                    td {
                        form method="post" action={"/participants/" (p.name) "/" (if p.paused { "resume" } else { "pause" })} class="inline" {
                            (csrf(&s))
                            input name="reason" placeholder="reason" required size="18";
                            button type="submit" { (if p.paused { "Resume" } else { "Pause" }) }
                        }
                    }
                }
            } }
        }
        @if queues.is_empty() && !names.is_empty() { p class="warn" { "The broker did not answer: queue figures unknown." } }
    };
    Ok(layout(&s, "Participants", None, body))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ReasonForm {
    reason: String,
    /// The saga page the action came from, to return to.
    back: String,
}

pub async fn participant_action(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((name, action)): Path<(String, String)>,
    Form(f): Form<ReasonForm>,
) -> Page {
    let req = pb::ParticipantRequest {
        participant: name.clone(),
        reason: f.reason,
    };
    let back = f.back.clone();
    let result = match action.as_str() {
        "pause" => c.admin.pause_participant(call(&s, req)).await,
        "resume" => c.admin.resume_participant(call(&s, req)).await,
        _ => return Err(error_page(StatusCode::NOT_FOUND, "no such action")),
    };
    result.map_err(api_error)?;
    let done: String =
        url::form_urlencoded::byte_serialize(format!("{action}d {name}").as_bytes()).collect();
    // Only back to a saga page of this console: never an open redirect.
    let to = match back.strip_prefix("/sagas/").map(Uuid::parse_str) {
        Some(Ok(id)) => format!("/sagas/{id}?done={done}"),
        _ => format!("/participants?done={done}"),
    };
    Ok(Redirect::to(&to).into_response())
}

// ---------------------------------------------------------------------------------------------
// Definitions.

pub async fn definitions(State(c): State<Console>, Extension(s): Extension<Session>) -> Page {
    let defs = c
        .admin
        .list_definitions(call(&s, pb::ListDefinitionsRequest::default()))
        .await
        .map_err(api_error)?
        .into_inner()
        .definitions;
    let body = html! {
        h1 { "Definitions" }
        table id="definitions" {
            thead { tr { th { "Definition" } th { "Version" } th {} th class="num" { "Steps" } th class="num" { "Unfinished sagas" } th { "Description" } } }
            tbody { @for d in &defs {
                tr {
                    td { a href={"/definitions/" (d.name) "/" (d.version)} { (d.name) } }
                    td { (d.version) }
                    td { @if d.current { "current" } @else if d.retired { "retired" } }
                    td class="num" { (d.steps.len()) }
                    td class="num" { a href={"/sagas?status=unfinished&definition=" (d.name) "&version=" (d.version)} { (d.active_sagas) } }
                    td { (d.description) }
                }
            } }
        }
    };
    Ok(layout(&s, "Definitions", None, body))
}

pub async fn definition_page(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path((name, version)): Path<(String, u32)>,
) -> Page {
    let d = c
        .admin
        .get_definition(call(&s, pb::GetDefinitionRequest { name, version }))
        .await
        .map_err(api_error)?
        .into_inner();
    let nodes: Vec<Node<'_>> = d
        .steps
        .iter()
        .map(|st| Node {
            name: &st.name,
            participant: &st.participant,
            state: None,
            after: &st.after,
            pivot: st.pivot,
            when: (!st.when.is_empty()).then_some(st.when.as_str()),
        })
        .collect();
    let dur = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| Duration::try_from(*d).ok())
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_default()
    };
    let body = html! {
        h1 { (d.name) " v" (d.version) }
        p { (d.description) }
        p { @if d.current { "Current version. " } @else if d.retired { "Retired. " }
            a href={"/sagas?status=unfinished&definition=" (d.name) "&version=" (d.version)} { (d.active_sagas) " unfinished sagas" }
            " run on this version. Pivot: " b { (d.pivot_step) } "." }
        div class="graphbox" { (graph::svg(&nodes)) }
        table id="steps" {
            thead { tr { th { "Step" } th { "Participant" } th { "Action" } th { "Compensation" } th { "After" } th { "When" } th { "Input" } th { "Timeout" } th { "Attempts" } } }
            tbody { @for st in &d.steps {
                tr {
                    td { (st.name) @if st.pivot { " (pivot)" } }
                    td { (st.participant) }
                    td { (st.action) }
                    td { (st.compensation) }
                    td { (st.after.join(", ")) }
                    td { code { (st.when) } }
                    td { @if !st.input_json.is_empty() { pre { (pretty(&st.input_json)) } } }
                    td { (dur(st.timeout.as_ref())) }
                    td { (st.retry.as_ref().map_or(0, |r| r.max_attempts)) }
                }
            } }
        }
    };
    Ok(layout(
        &s,
        &format!("{} v{}", d.name, d.version),
        None,
        body,
    ))
}

// ---------------------------------------------------------------------------------------------
// Bulk redrive: a dry run (count and sample) first, then the run as a job whose progress and
// per-saga results the page follows live.

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RedriveForm {
    #[serde(flatten)]
    filter: Filter,
    reason: String,
    limit: String,
}

/// Sample shown by a dry run.
const SAMPLE: usize = 20;
/// Finished jobs kept for their pages.
const KEPT_JOBS: usize = 50;

#[derive(Debug, Clone, Default)]
pub struct JobState {
    matched: u64,
    retried: Vec<String>,
    skipped: Vec<String>,
    done: bool,
    error: Option<String>,
    by: String,
    reason: String,
}

#[derive(Default)]
pub struct Jobs {
    next: std::sync::atomic::AtomicU64,
    jobs: Mutex<BTreeMap<u64, watch::Receiver<JobState>>>,
}

impl Jobs {
    fn add(&self, rx: watch::Receiver<JobState>) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.insert(id, rx);
        while jobs.len() > KEPT_JOBS {
            jobs.pop_first();
        }
        id
    }

    fn get(&self, id: u64) -> Option<watch::Receiver<JobState>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
}

pub async fn redrive_form(Extension(s): Extension<Session>, Query(f): Query<Filter>) -> Page {
    let body = html! {
        h1 { "Bulk redrive" }
        p { "Retries now the current step(s) of every unfinished saga the filter selects, in batches. "
            "A dry run comes first: how many match, and a sample." }
        form method="post" action="/redrive" id="redrive-form" {
            (csrf(&s))
            (f.fields())
            label { "At most" input name="limit" size="6" placeholder="all"; }
            label { "Reason" input name="reason" size="50" required; }
            button type="submit" { "Dry run" }
        }
    };
    Ok(layout(&s, "Redrive", None, body))
}

fn redrive_request(f: &RedriveForm, dry_run: bool) -> Result<pb::RedriveRequest, Response> {
    let filter = f
        .filter
        .to_pb()
        .map_err(|e| error_page(StatusCode::BAD_REQUEST, &e))?;
    let limit = match f.limit.trim() {
        "" => 0,
        l => l.parse().map_err(|_| {
            error_page(
                StatusCode::BAD_REQUEST,
                &format!("at most: {l:?} is not a number"),
            )
        })?,
    };
    Ok(pb::RedriveRequest {
        filter: Some(filter),
        reason: f.reason.clone(),
        dry_run,
        batch_size: 0,
        limit,
    })
}

/// The AdminService's redrive of what the form selects: its stream of progress.
async fn redrive(
    c: &Console,
    s: &Session,
    f: &RedriveForm,
    dry_run: bool,
) -> Result<<super::AdminApi as AdminService>::RedriveStream, Response> {
    let req = redrive_request(f, dry_run)?;
    Ok(c.admin
        .redrive(call(s, req))
        .await
        .map_err(api_error)?
        .into_inner())
}

pub async fn redrive_dry_run(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Form(f): Form<RedriveForm>,
) -> Page {
    let mut stream = redrive(&c, &s, &f, true).await?;
    let mut matched = 0;
    let mut ids = Vec::new();
    while let Some(p) = stream.next().await {
        let p = p.map_err(api_error)?;
        matched = p.matched;
        ids.extend(p.saga_ids);
    }
    let body = html! {
        h1 { "Bulk redrive: dry run" }
        p id="matched" { b { (matched) } " unfinished sagas match" @if !f.filter.query().is_empty() { " " code { (f.filter.query()) } } "." }
        @if !ids.is_empty() {
            p { "A sample:" }
            ul id="sample" { @for id in ids.iter().take(SAMPLE) { li { a href={"/sagas/" (id)} { (id) } } } }
            form method="post" action="/redrive/run" id="redrive-run" {
                (csrf(&s))
                (f.filter.hidden())
                input type="hidden" name="limit" value=(f.limit);
                input type="hidden" name="reason" value=(f.reason);
                p { "Reason: " (f.reason) }
                button type="submit" class="danger" { "Redrive " (matched) " sagas" }
                " " a href={"/redrive?" (f.filter.query())} { "Change the filter" }
            }
        }
    };
    Ok(layout(&s, "Redrive: dry run", None, body))
}

pub async fn redrive_run(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Form(f): Form<RedriveForm>,
) -> Page {
    let mut stream = redrive(&c, &s, &f, false).await?;
    let (tx, rx) = watch::channel(JobState {
        by: s.caller.name.clone(),
        reason: f.reason.clone(),
        ..JobState::default()
    });
    let job = c.jobs.add(rx);
    tokio::spawn(async move {
        while let Some(p) = stream.next().await {
            let last = match p {
                Ok(p) => {
                    tx.send_modify(|j| {
                        j.matched = p.matched;
                        j.retried.extend(p.saga_ids);
                        j.skipped.extend(p.skipped_ids);
                        j.done = p.done;
                    });
                    p.done
                }
                Err(e) => {
                    tx.send_modify(|j| {
                        j.error = Some(e.message().to_string());
                        j.done = true;
                    });
                    true
                }
            };
            if last {
                break;
            }
        }
        tx.send_modify(|j| j.done = true);
    });
    Ok(Redirect::to(&format!("/redrive/{job}")).into_response())
}

pub async fn redrive_job(
    State(c): State<Console>,
    Extension(s): Extension<Session>,
    Path(job): Path<u64>,
) -> Page {
    let state = c
        .jobs
        .get(job)
        .ok_or_else(|| {
            error_page(
                StatusCode::NOT_FOUND,
                "no such redrive (they are kept in memory until sagad restarts)",
            )
        })?
        .borrow()
        .clone();
    let body = html! {
        h1 { "Bulk redrive #" (job) }
        p { "By " (state.by) ": " (state.reason) }
        p id="progress" data-done=(state.done) {
            @if state.done { "Finished: " } @else { "Running: " }
            b { (state.retried.len()) } " retried, " b { (state.skipped.len()) } " skipped, of " (state.matched) " matched."
        }
        @if let Some(e) = &state.error { p class="error" { "Stopped: " (e) } }
        table id="results" {
            thead { tr { th { "Saga" } th { "Result" } } }
            tbody {
                @for id in &state.retried { tr { td class="id" { a href={"/sagas/" (id)} { (id) } } td class="ok" { "retried" } } }
                @for id in &state.skipped { tr { td class="id" { a href={"/sagas/" (id)} { (id) } } td class="bad" { "skipped: its state allowed no retry" } } }
            }
        }
    };
    let live = (!state.done).then(|| format!("/redrive/{job}/events"));
    Ok(layout(&s, "Redrive", live.as_deref(), body))
}

pub async fn redrive_events(
    State(c): State<Console>,
    Path(job): Path<u64>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let rx = c
        .jobs
        .get(job)
        .ok_or_else(|| error_page(StatusCode::NOT_FOUND, "no such redrive"))?;
    // The current state first: the job may have moved between the page and this stream.
    let stream = tokio_stream::wrappers::WatchStream::new(rx)
        .map(move |_| Ok(Event::default().event("changed").data(job.to_string())))
        .take_until(c.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
