//! The demo participants: the services of `sagas/order_fulfillment.toml` (`order`,
//! `payment`, `delivery`) and of `sagas/food_delivery.toml` (the same three plus `shop`,
//! `coupon` and `notification`), run against RabbitMQ exactly as `docs/participant-contract.md`
//! tells a participant to behave. One process plays all of them by default, so it serves both
//! definitions. They back the README quick start, the integration tests, the benchmark and the
//! fault tests, so they are meant to be a faithful (if tiny) participant rather than a stub.
//!
//! Each command runs one PostgreSQL transaction that de-duplicates by command id
//! (`demo_processed_commands`) and applies the business effect (`demo_effects`, keyed by saga id
//! and resource). The reply is published with publisher confirms, and only then is the command
//! acknowledged, so a crash anywhere leads to a redelivery that re-sends the stored reply.
//! Each redelivery recognised this way is counted in `demo_processed_commands.redeliveries`.
//!
//! | participant | command | effect on `demo_effects` (`resource` → `state`) | input read (besides `fail_at`) | output |
//! |---|---|---|---|---|
//! | `order` | `create_order` | `order` → `created` | – | `order_id`, `order_ref` |
//! | `order` | `approve_order` | `order` → `approved` | – | `order_ref` |
//! | `order` | `cancel_order` | `order` → `cancelled` | – | `undone` |
//! | `payment` | `authorize_payment` | `payment` → `authorized` | `amount_cents` | `authorization` |
//! | `payment` | `refund_payment` / `void_payment` | `payment` → `refunded` / `voided` | – | `undone` |
//! | `delivery` | `schedule_delivery` | `delivery` → `scheduled` | – | `tracking` |
//! | `delivery` | `cancel_delivery` | `delivery` → `cancelled` | – | `undone` |
//! | `delivery` | `dispatch_rider` | `delivery` → `dispatched` | – | `rider_name`, `eta_minutes` |
//! | `delivery` | `recall_rider` | `delivery` → `recalled` | – | `undone` |
//! | `shop` | `accept_order` | `shop` → `accepted` | `shop_id` | `ticket` |
//! | `shop` | `reject_order` | `shop` → `rejected` | – | `undone` |
//! | `coupon` | `redeem_coupon` | `coupon` → `redeemed` | `coupon` | `redemption_id` |
//! | `coupon` | `restore_coupon` | `coupon` → `restored` | – | `undone` |
//! | `notification` | `notify_customer` | `notification` → `sent` | – | `message_id` |
//!
//! Outputs derive from the saga id, so a retried attempt gets the same references as the first. A
//! compensation whose action never applied succeeds without recording an effect (`undone` is
//! then false), as the contract requires.
//!
//! # Making commands fail, or slow
//!
//! - Business rules on the command's own input, so they work whether the definition maps the
//!   input (`food_delivery`) or passes the saga's whole input along (`order_fulfillment`). Each
//!   is a final (non-retryable) failure:
//!
//!   | command | when | reason |
//!   |---|---|---|
//!   | `accept_order` | `shop_id` starts with `closed` | `shop is closed` |
//!   | `authorize_payment` | `amount_cents` > 1 000 000 | `card declined` |
//!   | `redeem_coupon` | `coupon` is `EXPIRED` | `coupon has expired` |
//!
//! - `accept_order` for a `shop_id` starting with `slow` takes [`SLOW_SHOP`] (2 s) before it is
//!   handled, so a saga can fail in one branch while another is still in flight.
//! - A command whose input has `"fail_at"`, a command name or an array of them, gets a final
//!   failure for those commands. A definition without input mappings passes the saga input on,
//!   so one running demo can serve sagas that succeed and sagas that fail, chosen by whoever
//!   starts them: `{"order_id": "A-1", "fail_at": "schedule_delivery"}`. A mapped input carries
//!   `fail_at` only if its mapping copies it.
//! - [`FailRule`]s (`--fail authorize_payment=0.3:transient`) fail a command at random, for load
//!   and fault tests.
//!
//! Injected failures are recorded like successes, so a redelivered command gets the same answer,
//! and they apply no effect.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection as _, Row};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};
use uuid::Uuid;

use saga::broker;
use saga::contract::{self, CommandBody, ReplyBody, ReplyOutcome};
use saga::telemetry;

/// The demo tables. Idempotent, so every demo process may run it at start.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS demo_processed_commands (
    command_id  uuid PRIMARY KEY,
    saga_id     uuid NOT NULL,
    participant text NOT NULL,
    command     text NOT NULL,
    kind        text NOT NULL,
    attempt     int  NOT NULL,
    reply       jsonb NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    -- Deliveries of this command recognised as duplicates (answered with the stored reply).
    redeliveries int NOT NULL DEFAULT 0
);
-- Databases created before the counter existed.
ALTER TABLE demo_processed_commands ADD COLUMN IF NOT EXISTS redeliveries int NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS demo_processed_commands_saga ON demo_processed_commands (saga_id);
CREATE TABLE IF NOT EXISTS demo_effects (
    saga_id    uuid,
    resource   text,
    state      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, resource)
);
-- One command's local transaction in one round trip (the call runs in autocommit, so it is the
-- transaction): de-duplicate by command id, apply the effect, record the reply. Returns the reply
-- to send and whether it is a stored one. Two concurrent deliveries of a new command both pass
-- the first check; the second one's INSERT then fails on the primary key (unique_violation)
-- and rolls its whole call back, effect included; the caller answers it with the stored reply.
CREATE OR REPLACE FUNCTION demo_handle(
    p_command_id uuid, p_saga_id uuid, p_participant text, p_command text, p_kind text,
    p_attempt int, p_resource text, p_state text, p_compensation boolean,
    p_compensated text[], p_reply jsonb, p_refusal jsonb)
RETURNS TABLE (reply jsonb, duplicate boolean) LANGUAGE plpgsql AS $fn$
DECLARE
    v_reply jsonb := p_reply;
    v_before text;
BEGIN
    RETURN QUERY UPDATE demo_processed_commands c SET redeliveries = c.redeliveries + 1
        WHERE c.command_id = p_command_id RETURNING c.reply, true;
    IF FOUND THEN
        RETURN;
    END IF;
    IF p_resource IS NOT NULL AND p_compensation THEN
        -- A compensation may overtake its action (a retried or abandoned attempt can still be
        -- queued, and commands are handled concurrently), so it is recorded even when there is
        -- nothing to undo: the row is a tombstone that makes the late action refuse below.
        SELECT e.state INTO v_before FROM demo_effects e
            WHERE e.saga_id = p_saga_id AND e.resource = p_resource FOR UPDATE;
        INSERT INTO demo_effects (saga_id, resource, state) VALUES (p_saga_id, p_resource, p_state)
            ON CONFLICT (saga_id, resource) DO UPDATE SET state = EXCLUDED.state, updated_at = now();
        v_reply := jsonb_set(v_reply, '{output}',
            jsonb_build_object('undone', COALESCE(v_before <> ALL(p_compensated), false)));
    ELSIF p_resource IS NOT NULL THEN
        INSERT INTO demo_effects (saga_id, resource, state) VALUES (p_saga_id, p_resource, p_state)
            ON CONFLICT (saga_id, resource) DO UPDATE SET state = EXCLUDED.state, updated_at = now()
            WHERE demo_effects.state <> ALL(p_compensated);
        IF NOT FOUND THEN
            v_reply := p_refusal;
        END IF;
    END IF;
    INSERT INTO demo_processed_commands (command_id, saga_id, participant, command, kind, attempt, reply)
        VALUES (p_command_id, p_saga_id, p_participant, p_command, p_kind, p_attempt, v_reply);
    RETURN QUERY SELECT v_reply, false;
END
$fn$;
"#;

/// The participants this demo can play, all run by default.
pub const PARTICIPANTS: [&str; 6] = [
    "order",
    "payment",
    "delivery",
    "shop",
    "coupon",
    "notification",
];

/// How long `accept_order` takes for a shop whose id starts with `slow`.
pub const SLOW_SHOP: Duration = Duration::from_secs(2);

/// The largest amount the demo's card issuer authorizes.
const CARD_LIMIT_CENTS: f64 = 1_000_000.0;

/// Delay before requeueing a command whose handling failed (database or broker trouble), so an
/// outage does not turn into a hot redelivery loop.
const REQUEUE_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub amqp_url: String,
    /// Extra CA certificates (PEM) for an `amqps://` URL, from [`saga::broker::load_amqp_ca`].
    pub amqp_ca: Option<std::sync::Arc<str>>,
    pub database_url: String,
    pub participants: Vec<String>,
    /// Injected failures.
    pub failures: Vec<FailRule>,
    /// Added before each command's work.
    pub latency: Duration,
    pub prefetch: u16,
    /// Send every reply twice (for fault tests).
    pub duplicate_replies: bool,
    /// Answer every command with a success at once, with no database work: the no-op steps
    /// other engines are benchmarked with (the bench's `--participants noop`). The reply is still
    /// confirmed before the command is acknowledged; nothing is de-duplicated or recorded.
    pub noop: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_ca: None,
            database_url: "postgres://postgres@127.0.0.1:5432/saga_demo".into(),
            participants: PARTICIPANTS.iter().map(|p| p.to_string()).collect(),
            failures: Vec::new(),
            latency: Duration::ZERO,
            prefetch: 64,
            duplicate_replies: false,
            noop: false,
        }
    }
}

/// Fails `command` with the given probability; `retryable` makes the failure transient.
#[derive(Debug, Clone, PartialEq)]
pub struct FailRule {
    pub command: String,
    pub probability: f64,
    pub retryable: bool,
}

impl FromStr for FailRule {
    type Err = String;

    /// `authorize_payment`, `authorize_payment=0.3`, `authorize_payment=0.5:transient`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORMAT: &str =
            "expected COMMAND[=PROBABILITY][:transient], e.g. authorize_payment=0.3:transient";
        let (rule, retryable) = match s.split_once(':') {
            None => (s, false),
            Some((rule, "transient")) => (rule, true),
            Some((_, suffix)) => {
                return Err(format!(
                    "invalid failure rule {s:?}: unknown suffix {suffix:?} ({FORMAT})"
                ));
            }
        };
        let (command, probability) = match rule.split_once('=') {
            None => (rule, 1.0),
            Some((command, p)) => {
                let p: f64 = p.trim().parse().map_err(|_| {
                    format!("invalid failure rule {s:?}: {p:?} is not a number ({FORMAT})")
                })?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!(
                        "invalid failure rule {s:?}: probability {p} is not between 0 and 1"
                    ));
                }
                (command, p)
            }
        };
        let command = command.trim();
        if command.is_empty() {
            return Err(format!(
                "invalid failure rule {s:?}: missing command ({FORMAT})"
            ));
        }
        if effect_of(command).is_none() {
            return Err(format!(
                "invalid failure rule {s:?}: unknown command {command:?} (known: {})",
                EFFECTS
                    .iter()
                    .map(|e| e.command)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(FailRule {
            command: command.to_string(),
            probability,
            retryable,
        })
    }
}

/// What a command does to `demo_effects`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Effect {
    command: &'static str,
    participant: &'static str,
    resource: &'static str,
    state: &'static str,
    /// Compensations only undo an effect that exists.
    compensation: bool,
}

const fn effect(
    command: &'static str,
    participant: &'static str,
    resource: &'static str,
    state: &'static str,
    compensation: bool,
) -> Effect {
    Effect {
        command,
        participant,
        resource,
        state,
        compensation,
    }
}

const EFFECTS: [Effect; 15] = [
    effect("create_order", "order", "order", "created", false),
    effect("approve_order", "order", "order", "approved", false),
    effect("cancel_order", "order", "order", "cancelled", true),
    effect(
        "authorize_payment",
        "payment",
        "payment",
        "authorized",
        false,
    ),
    effect("refund_payment", "payment", "payment", "refunded", true),
    // An authorization not yet captured is voided rather than refunded.
    effect("void_payment", "payment", "payment", "voided", true),
    effect(
        "schedule_delivery",
        "delivery",
        "delivery",
        "scheduled",
        false,
    ),
    effect("cancel_delivery", "delivery", "delivery", "cancelled", true),
    effect(
        "dispatch_rider",
        "delivery",
        "delivery",
        "dispatched",
        false,
    ),
    effect("recall_rider", "delivery", "delivery", "recalled", true),
    effect("accept_order", "shop", "shop", "accepted", false),
    effect("reject_order", "shop", "shop", "rejected", true),
    effect("redeem_coupon", "coupon", "coupon", "redeemed", false),
    effect("restore_coupon", "coupon", "coupon", "restored", true),
    effect(
        "notify_customer",
        "notification",
        "notification",
        "sent",
        false,
    ),
];

/// States a compensation leaves; an action never overwrites them.
const COMPENSATED: [&str; 6] = [
    "cancelled",
    "refunded",
    "voided",
    "recalled",
    "rejected",
    "restored",
];

const RIDERS: [&str; 6] = ["Ana", "Bongani", "Chen", "Dara", "Eun-ji", "Femi"];

fn effect_of(command: &str) -> Option<&'static Effect> {
    EFFECTS.iter().find(|e| e.command == command)
}

/// Whether the command's input asks for `command` to fail (`"fail_at"`: a string or array of
/// them).
pub fn fail_at_matches(input: &Value, command: &str) -> bool {
    match input.get("fail_at") {
        Some(Value::String(s)) => s == command,
        Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(command)),
        _ => false,
    }
}

/// Why the service itself turns the action down, judging by its input: a final failure, since
/// asking again with the same input gets the same answer.
pub fn business_refusal(command: &str, input: &Value) -> Option<&'static str> {
    let text = |field: &str| input.get(field).and_then(Value::as_str);
    match command {
        "accept_order" if text("shop_id").is_some_and(|s| s.starts_with("closed")) => {
            Some("shop is closed")
        }
        "authorize_payment"
            if input
                .get("amount_cents")
                .and_then(Value::as_f64)
                .is_some_and(|a| a > CARD_LIMIT_CENTS) =>
        {
            Some("card declined")
        }
        "redeem_coupon" if text("coupon") == Some("EXPIRED") => Some("coupon has expired"),
        _ => None,
    }
}

/// How long the service takes before it handles the command (on top of the configured latency).
pub fn slowness(command: &CommandBody) -> Duration {
    let slow_shop = command.command == "accept_order"
        && command
            .input
            .get("shop_id")
            .and_then(Value::as_str)
            .is_some_and(|s| s.starts_with("slow"));
    if slow_shop { SLOW_SHOP } else { Duration::ZERO }
}

/// The output of a successful action: references later steps (and humans) can recognise. They
/// derive from the saga id, so a retried attempt (a new command id) gives the same ones.
fn action_output(effect: &Effect, saga_id: Uuid) -> Value {
    let simple = saga_id.simple().to_string();
    // The leading digits of a v7 id are its timestamp (the same for every saga started within
    // a minute or so), the trailing ones are random: ids that must tell sagas apart use those.
    let (short, unique) = (&simple[..8], &simple[20..]);
    let pick = saga_id.as_u128();
    match effect.command {
        "create_order" => {
            json!({ "order_id": format!("ord-{unique}"), "order_ref": format!("ord-{short}") })
        }
        "approve_order" => json!({ "order_ref": format!("ord-{short}") }),
        "authorize_payment" => json!({ "authorization": format!("auth-{short}") }),
        "schedule_delivery" => json!({ "tracking": format!("trk-{short}") }),
        "dispatch_rider" => {
            let riders = RIDERS.len() as u128;
            let rider = usize::try_from(pick % riders)
                .ok()
                .and_then(|i| RIDERS.get(i))
                .copied()
                .unwrap_or("Ana");
            json!({ "rider_name": rider, "eta_minutes": 15 + (pick % 30) as u64 })
        }
        "accept_order" => json!({ "ticket": format!("tkt-{unique}") }),
        "redeem_coupon" => json!({ "redemption_id": format!("rdm-{unique}") }),
        "notify_customer" => json!({ "message_id": format!("msg-{unique}") }),
        _ => json!({}),
    }
}

/// Decides the reply for a command seen for the first time, before touching the database.
/// `None` for the effect means nothing is to be applied.
fn decide(
    participant: &str,
    command: &CommandBody,
    failures: &[FailRule],
    draw: impl FnOnce() -> f64,
) -> (ReplyBody, Option<&'static Effect>) {
    let id = command.command_id;
    let Some(effect) = effect_of(&command.command).filter(|e| e.participant == participant) else {
        let reason = format!(
            "unknown command {:?} for participant {participant:?}",
            command.command
        );
        return (ReplyBody::failure(id, reason, false), None);
    };
    if fail_at_matches(&command.input, &command.command) {
        let reason = format!(
            "injected failure: saga input has fail_at {:?}",
            command.command
        );
        return (ReplyBody::failure(id, reason, false), None);
    }
    if let Some(reason) = business_refusal(&command.command, &command.input) {
        return (ReplyBody::failure(id, reason, false), None);
    }
    // One draw per command, taken only if a rule applies, keeps probabilities as configured.
    if let Some(rule) = failures.iter().find(|r| r.command == command.command)
        && draw() < rule.probability
    {
        let reason = format!(
            "injected failure: {} fails with probability {}{}",
            rule.command,
            rule.probability,
            if rule.retryable { " (transient)" } else { "" }
        );
        return (ReplyBody::failure(id, reason, rule.retryable), None);
    }
    let output = if effect.compensation {
        Value::Null // filled in once we know whether there was anything to undo
    } else {
        action_output(effect, command.saga_id)
    };
    (ReplyBody::success(id, output), Some(effect))
}

/// Creates the database named in `database_url` if it does not exist, by connecting to the
/// `postgres` database of the same server. Used by the binary; [`run`] assumes it exists.
pub async fn ensure_database(database_url: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(database_url)
        .with_context(|| format!("invalid database URL {database_url:?}"))?;
    match options.connect().await {
        Ok(conn) => return Ok(conn.close().await?),
        // invalid_catalog_name: the database does not exist yet.
        Err(e) if pg_code(&e).as_deref() == Some("3D000") => {}
        Err(e) => return Err(e).context("cannot connect to PostgreSQL"),
    }
    let name = options
        .get_database()
        .context("the database URL names no database")?
        .to_string();
    let mut admin = options
        .database("postgres")
        .connect()
        .await
        .context("cannot connect to the `postgres` database to create the demo database")?;
    let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::raw_sql(sqlx::AssertSqlSafe(create))
        .execute(&mut admin)
        .await
    {
        Ok(_) => info!(database = %name, "created the demo database"),
        // Another demo process created it meanwhile.
        Err(e) if pg_code(&e).as_deref() == Some("42P04") => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create database {name:?}")),
    }
    admin.close().await?;
    Ok(())
}

fn pg_code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// Runs the configured participants until `shutdown` is cancelled.
///
/// Errors at start (bad configuration, servers unreachable) are returned. A broker connection
/// lost later is re-established with back-off, so the demo survives broker restarts.
pub async fn run(config: DemoConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.participants.is_empty() {
        bail!("no participants to run");
    }
    for p in &config.participants {
        if !PARTICIPANTS.contains(&p.as_str()) {
            bail!(
                "unknown participant {p:?} (known: {})",
                PARTICIPANTS.join(", ")
            );
        }
    }
    if config.prefetch == 0 {
        bail!("prefetch must be at least 1");
    }
    let pool = PgPoolOptions::new()
        .max_connections(16)
        // While the database is down, sqlx retries inside `acquire` with a back-off of up to a
        // fifth of this timeout. The default (30 s) let a command wait ~6 s after the database
        // was back, long enough for the orchestrator to time the step out; like `sagad`, give
        // up sooner and let the command be requeued and retried instead.
        .acquire_timeout(Duration::from_secs(5))
        .connect(&config.database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    create_schema(&pool).await?;

    let mut session = Session::start(&config).await?;
    let mut backoff = Duration::from_millis(200);
    loop {
        match session.serve(&config, &pool, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) => error!(error = format!("{e:#}"), "lost the broker; reconnecting"),
        }
        session = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            match Session::start(&config).await {
                Ok(s) => break s,
                Err(e) => {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    warn!(error = format!("{e:#}"), retry_in = ?backoff, "cannot reconnect");
                }
            }
        };
        backoff = Duration::from_millis(200);
        info!("reconnected to the broker");
    }
}

async fn create_schema(pool: &PgPool) -> anyhow::Result<()> {
    // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the catalog, so demo
    // processes starting together take turns.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('saga-demo-schema'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut *tx)
        .await
        .context("cannot create the demo tables")?;
    tx.commit().await?;
    Ok(())
}

/// One broker connection: a consumer channel per participant and a confirming publish channel.
struct Session {
    connection: Connection,
    publisher: Channel,
    consumers: Vec<(String, Channel, Consumer)>,
}

impl Session {
    async fn start(config: &DemoConfig) -> anyhow::Result<Session> {
        let connection = broker::connect(&config.amqp_url, config.amqp_ca.as_deref())
            .await
            .context("cannot connect to RabbitMQ")?;
        let publisher = connection.create_channel().await?;
        contract::declare_participant_topology(
            &publisher,
            config.participants.iter().map(String::as_str),
        )
        .await
        .context("cannot declare the participant topology")?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut consumers = Vec::new();
        for participant in &config.participants {
            // A channel each, so the prefetch applies per participant.
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(config.prefetch, BasicQosOptions::default())
                .await?;
            let tag = format!("saga-demo-{participant}-{}", Uuid::now_v7().simple());
            let consumer = channel
                .basic_consume(
                    contract::participant_queue(participant).as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot consume the {participant} queue"))?;
            consumers.push((participant.clone(), channel, consumer));
        }
        info!(participants = ?config.participants, prefetch = config.prefetch, "demo participants ready");
        Ok(Session {
            connection,
            publisher,
            consumers,
        })
    }

    /// Consumes until shutdown (`Ok`) or until the connection breaks (`Err`).
    async fn serve(
        self,
        config: &DemoConfig,
        pool: &PgPool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Cancelled on shutdown, or by any consumer that sees the connection break, so all
        // participants stop together and the session is rebuilt as a whole.
        let stop = shutdown.child_token();
        // The channels stay owned here: dropping a lapin channel closes it, and the connection
        // close below would then trip over channels already closing.
        let loops = self
            .consumers
            .iter()
            .map(|(participant, channel, consumer)| {
                let handler = Handler {
                    participant: participant.clone(),
                    pool: pool.clone(),
                    publisher: self.publisher.clone(),
                    failures: config.failures.clone(),
                    latency: config.latency,
                    duplicate_replies: config.duplicate_replies,
                    noop: config.noop,
                    broken: stop.clone(),
                };
                consume(handler, channel, consumer.clone(), stop.clone())
            });
        let results = futures::future::join_all(loops).await;
        let failure = results.into_iter().find_map(Result::err);
        if shutdown.is_cancelled() && failure.is_none() {
            if let Err(e) = self.connection.close(200, "shutdown".into()).await {
                warn!(error = %e, "closing the broker connection");
            }
            info!("demo participants stopped");
            return Ok(());
        }
        // Unacked commands are requeued by the broker once the connection is gone.
        let _ = self.connection.close(320, "reconnecting".into()).await;
        match failure {
            Some(e) => Err(e),
            None if shutdown.is_cancelled() => Ok(()),
            None => bail!("the broker connection broke"),
        }
    }
}

/// Consumes one participant queue, handling deliveries concurrently (bounded by the prefetch,
/// since the broker sends no more unacked deliveries than that).
async fn consume(
    handler: Handler,
    channel: &Channel,
    mut consumer: Consumer,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut in_flight = JoinSet::new();
    let closed = broker::disconnected(|| channel.status().connected());
    tokio::pin!(closed);
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = &mut closed => {
                break Err(anyhow::anyhow!("the channel of {} is closed", handler.participant));
            }
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done {
                    error!(participant = %handler.participant, error = %e, "command task failed");
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let handler = handler.clone();
                    in_flight.spawn(async move { handler.handle(delivery).await });
                }
                Some(Err(e)) => {
                    break Err(anyhow::Error::new(e)
                        .context(format!("consumer of {} failed", handler.participant)));
                }
                None => break Err(anyhow::anyhow!("consumer of {} was cancelled", handler.participant)),
            },
        }
    };
    if result.is_err() {
        stop.cancel();
    } else if channel.status().connected()
        && let Err(e) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
    {
        warn!(participant = %handler.participant, error = %e, "cancelling the consumer");
    }
    // Let in-flight commands finish: each either acks (reply sent) or nacks. Not once the
    // connection is gone, though, as their publish or ack may then never resolve: those tasks
    // are dropped; the broker requeues their commands, and a command whose transaction did
    // commit is answered from its stored reply when it comes back.
    let drained = async {
        while let Some(done) = in_flight.join_next().await {
            if let Err(e) = done {
                error!(participant = %handler.participant, error = %e, "command task failed");
            }
        }
    };
    let connection_lost = broker::disconnected(|| {
        channel.status().connected() && handler.publisher.status().connected()
    });
    tokio::select! {
        _ = drained => {}
        _ = connection_lost => {
            warn!(participant = %handler.participant, dropped = in_flight.len(), "connection lost with commands in flight");
            in_flight.abort_all();
        }
    }
    result
}

#[derive(Clone)]
struct Handler {
    participant: String,
    pool: PgPool,
    publisher: Channel,
    failures: Vec<FailRule>,
    latency: Duration,
    duplicate_replies: bool,
    noop: bool,
    broken: CancellationToken,
}

/// The outcome of the database transaction for one command.
struct Processed {
    reply: ReplyBody,
    /// The reply was stored by an earlier delivery of the same command.
    duplicate: bool,
}

impl Handler {
    async fn handle(&self, delivery: Delivery) {
        let command = match parse_command(&delivery) {
            Ok(command) => command,
            Err(why) => {
                // Poison: dead-letter it; the orchestrator times the step out.
                warn!(participant = %self.participant, reason = %why, "rejecting malformed command");
                if let Err(e) = delivery.reject(BasicRejectOptions { requeue: false }).await {
                    warn!(error = %e, "rejecting a command");
                }
                return;
            }
        };
        // The participant's work joins the saga's trace, as the contract asks participants to.
        let span = tracing::info_span!(
            "process",
            otel.name = %format!("process {}", contract::participant_queue(&self.participant)),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %contract::participant_queue(&self.participant),
            messaging.message.id = %command.command_id,
            saga.id = %command.saga_id,
            saga.step = %command.step,
        );
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        telemetry::set_parent(
            &span,
            contract::header_str(&headers, telemetry::TRACEPARENT),
        );
        self.handle_command(delivery, command)
            .instrument(span)
            .await
    }

    async fn handle_command(&self, delivery: Delivery, command: CommandBody) {
        let delay = self.latency + slowness(&command);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = match self.process(&command).await {
            Ok(processed) => self
                .reply(&delivery, &processed.reply)
                .await
                .map(|()| processed),
            Err(e) => Err(e.context("database")),
        };
        match result {
            Ok(processed) => {
                match delivery.ack(BasicAckOptions::default()).await {
                    Ok(_) => {}
                    // The reply is out; a redelivery will just re-send it.
                    Err(e) => {
                        warn!(command_id = %command.command_id, error = %e, "acking a command")
                    }
                }
                info!(
                    participant = %self.participant,
                    saga_id = %command.saga_id,
                    step = %command.step,
                    command = %command.command,
                    kind = %command.kind,
                    attempt = command.attempt,
                    outcome = match processed.reply.outcome {
                        ReplyOutcome::Success => "success",
                        ReplyOutcome::Failure => "failure",
                    },
                    reason = processed.reply.reason.as_deref().unwrap_or(""),
                    duplicate = processed.duplicate,
                    "command handled"
                );
            }
            Err(e) => {
                error!(
                    participant = %self.participant,
                    saga_id = %command.saga_id,
                    step = %command.step,
                    command_id = %command.command_id,
                    error = format!("{e:#}"),
                    "handling a command failed; requeueing it"
                );
                tokio::time::sleep(REQUEUE_DELAY).await;
                if let Err(e) = delivery
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
                {
                    // The channel is gone; the broker requeues unacked commands by itself.
                    warn!(error = %e, "requeueing a command");
                }
            }
        }
    }

    /// The participant's local transaction: de-duplicate, decide, apply, record (the
    /// `demo_handle` function of [`SCHEMA`], one round trip).
    async fn process(&self, command: &CommandBody) -> anyhow::Result<Processed> {
        if self.noop {
            return Ok(Processed {
                reply: ReplyBody::success(command.command_id, json!({})),
                duplicate: false,
            });
        }
        let (reply, effect) = decide(&self.participant, command, &self.failures, || {
            rand::random::<f64>()
        });
        let refusal = effect.map(|e| {
            ReplyBody::failure(
                command.command_id,
                format!("{} was already compensated for this saga", e.resource),
                false,
            )
        });
        let reply = serde_json::to_value(&reply)?;
        let refusal = refusal.map(|r| serde_json::to_value(&r)).transpose()?;
        let call = || {
            sqlx::query(
                "SELECT reply, duplicate FROM demo_handle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(command.command_id)
            .bind(command.saga_id)
            .bind(&self.participant)
            .bind(&command.command)
            .bind(&command.kind)
            .bind(i32::try_from(command.attempt).unwrap_or(i32::MAX))
            .bind(effect.map(|e| e.resource))
            .bind(effect.map(|e| e.state))
            .bind(effect.is_some_and(|e| e.compensation))
            .bind(&COMPENSATED[..])
            .bind(&reply)
            .bind(&refusal)
            .fetch_one(&self.pool)
        };
        let row = match call().await {
            // A concurrent delivery of the same command recorded it first (and has committed:
            // the primary key made us wait for it), so a second call finds its reply.
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
                call().await?
            }
            other => other?,
        };
        let reply: Value = row.try_get("reply")?;
        Ok(Processed {
            reply: serde_json::from_value(reply).context("a stored reply does not parse")?,
            duplicate: row.try_get("duplicate")?,
        })
    }

    /// Publishes the reply (twice with `duplicate_replies`) and waits for the broker's confirm.
    async fn reply(&self, delivery: &Delivery, reply: &ReplyBody) -> anyhow::Result<()> {
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(ShortString::as_str)
            .filter(|q| !q.is_empty())
            .unwrap_or(contract::REPLIES_QUEUE);
        let body = serde_json::to_vec(reply)?;
        let mut headers = FieldTable::default();
        if let Some(tp) = telemetry::traceparent(&tracing::Span::current()) {
            headers.insert(
                telemetry::TRACEPARENT.into(),
                AMQPValue::LongString(tp.into()),
            );
        }
        let properties = BasicProperties::default()
            .with_content_type(contract::JSON.into())
            .with_delivery_mode(2)
            .with_correlation_id(reply.command_id.to_string().into())
            .with_headers(headers);
        let copies = if self.duplicate_replies { 2 } else { 1 };
        for _ in 0..copies {
            let confirm = self
                .publisher
                .basic_publish(
                    "".into(),
                    reply_to.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties.clone(),
                )
                .await;
            let confirm = match confirm {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            let confirm = match confirm {
                Ok(confirm) => confirm,
                Err(e) => {
                    if !self.publisher.status().connected() {
                        // The publish channel is dead; only a new session can fix that.
                        self.broken.cancel();
                    }
                    return Err(anyhow::Error::new(e).context("publishing the reply"));
                }
            };
            if confirm.is_nack() {
                bail!("the broker refused the reply (nack)");
            }
            if confirm.take_message().is_some() {
                // Requeueing could not help: nobody declared the reply queue. The step times
                // out and the orchestrator retries or compensates, as the contract says.
                warn!(reply_to, command_id = %reply.command_id, "reply unroutable; dropped");
            }
        }
        Ok(())
    }
}

fn parse_command(delivery: &Delivery) -> Result<CommandBody, String> {
    let command: CommandBody =
        serde_json::from_slice(&delivery.data).map_err(|e| format!("invalid command body: {e}"))?;
    if let Some(message_id) = delivery.properties.message_id() {
        // De-duplication keys on the command id; a message whose two ids disagree cannot be
        // de-duplicated safely.
        if message_id.as_str() != command.command_id.to_string() {
            return Err(format!(
                "message_id {:?} differs from the body's command_id {}",
                message_id.as_str(),
                command.command_id
            ));
        }
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(name: &str, input: Value) -> CommandBody {
        CommandBody {
            command_id: Uuid::now_v7(),
            saga_id: Uuid::now_v7(),
            definition: "order_fulfillment".into(),
            definition_version: 1,
            step: name.into(),
            kind: "action".into(),
            command: name.into(),
            attempt: 1,
            input,
            outputs: json!({}),
        }
    }

    #[test]
    fn fail_rules_parse() {
        let rule = |command: &str, probability: f64, retryable: bool| FailRule {
            command: command.into(),
            probability,
            retryable,
        };
        for (text, expected) in [
            ("authorize_payment", rule("authorize_payment", 1.0, false)),
            (
                "authorize_payment=0.3",
                rule("authorize_payment", 0.3, false),
            ),
            (
                "authorize_payment=0.5:transient",
                rule("authorize_payment", 0.5, true),
            ),
            ("cancel_order:transient", rule("cancel_order", 1.0, true)),
            ("schedule_delivery=0", rule("schedule_delivery", 0.0, false)),
            ("approve_order=1", rule("approve_order", 1.0, false)),
        ] {
            assert_eq!(text.parse::<FailRule>(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_fail_rules_say_why() {
        for (text, needle) in [
            ("", "missing command"),
            ("=0.3", "missing command"),
            ("authorize_payment=abc", "\"abc\" is not a number"),
            ("authorize_payment=", "is not a number"),
            ("authorize_payment=1.5", "not between 0 and 1"),
            ("authorize_payment=-0.1", "not between 0 and 1"),
            (
                "authorize_payment:sometimes",
                "unknown suffix \"sometimes\"",
            ),
            ("authorise_payment", "unknown command \"authorise_payment\""),
        ] {
            let e = text.parse::<FailRule>().unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn fail_at_matches_a_string_or_an_array() {
        assert!(fail_at_matches(
            &json!({"fail_at": "create_order"}),
            "create_order"
        ));
        assert!(!fail_at_matches(
            &json!({"fail_at": "create_order"}),
            "approve_order"
        ));
        let both = json!({"fail_at": ["authorize_payment", "cancel_order"]});
        assert!(fail_at_matches(&both, "cancel_order"));
        assert!(fail_at_matches(&both, "authorize_payment"));
        assert!(!fail_at_matches(&both, "create_order"));
        for input in [json!({}), json!(null), json!({"fail_at": 3}), json!("x")] {
            assert!(!fail_at_matches(&input, "create_order"), "{input}");
        }
    }

    #[test]
    fn decisions() {
        let never = || panic!("no draw expected");
        let ok = command("create_order", json!({}));
        let (reply, effect) = decide("order", &ok, &[], never);
        let id = ok.saga_id.simple().to_string();
        assert_eq!(
            reply,
            ReplyBody::success(
                ok.command_id,
                json!({"order_id": format!("ord-{}", &id[20..]), "order_ref": format!("ord-{}", &id[..8])})
            )
        );
        assert_eq!(effect.map(|e| e.state), Some("created"));

        let wrong_queue = command("create_order", json!({}));
        let (reply, effect) = decide("payment", &wrong_queue, &[], never);
        assert!(
            reply
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("unknown command")
        );
        assert!(!reply.retryable && effect.is_none());

        let fail_at = command("create_order", json!({"fail_at": ["create_order"]}));
        let (reply, effect) = decide("order", &fail_at, &[], never);
        assert_eq!(reply.outcome, ReplyOutcome::Failure);
        assert!(!reply.retryable && effect.is_none());

        let rules = ["authorize_payment=0.5:transient".parse().unwrap()];
        let pay = command("authorize_payment", json!({}));
        let (reply, effect) = decide("payment", &pay, &rules, || 0.49);
        assert!(reply.retryable && effect.is_none(), "{reply:?}");
        let (reply, effect) = decide("payment", &pay, &rules, || 0.5);
        assert_eq!(reply.outcome, ReplyOutcome::Success);
        assert!(effect.is_some());
    }

    fn reason(reply: &ReplyBody) -> &str {
        reply.reason.as_deref().unwrap_or("")
    }

    #[test]
    fn every_command_belongs_to_a_participant_the_demo_runs() {
        for e in EFFECTS {
            assert!(PARTICIPANTS.contains(&e.participant), "{}", e.command);
            let (reply, effect) =
                decide(e.participant, &command(e.command, json!({})), &[], || {
                    panic!("no draw expected")
                });
            assert_eq!(reply.outcome, ReplyOutcome::Success, "{}", e.command);
            assert_eq!(effect.map(|e| e.command), Some(e.command));
            // An action's state is never one an action refuses to overwrite; a compensation's is.
            assert_eq!(
                COMPENSATED.contains(&e.state),
                e.compensation,
                "{}",
                e.command
            );
        }
        for participant in PARTICIPANTS {
            assert!(
                EFFECTS.iter().any(|e| e.participant == participant),
                "{participant}"
            );
        }
    }

    #[test]
    fn food_delivery_outputs_carry_what_the_later_steps_read() {
        let out = |name: &str, participant: &str| {
            let (reply, _) = decide(participant, &command(name, json!({})), &[], || 1.0);
            reply.output
        };
        assert!(out("create_order", "order")["order_id"].is_string());
        assert!(out("create_order", "order")["order_ref"].is_string());
        assert!(out("authorize_payment", "payment")["authorization"].is_string());
        assert!(out("redeem_coupon", "coupon")["redemption_id"].is_string());
        let rider = out("dispatch_rider", "delivery");
        assert!(rider["rider_name"].is_string(), "{rider}");
        assert!(
            rider["eta_minutes"]
                .as_u64()
                .is_some_and(|m| (15..45).contains(&m)),
            "{rider}"
        );
        // Ids that later steps key on differ between sagas started in the same second.
        let (a, b) = (out("create_order", "order"), out("create_order", "order"));
        assert_ne!(a["order_id"], b["order_id"]);
    }

    #[test]
    fn services_refuse_what_a_real_one_would() {
        for (participant, name, input, refusal) in [
            (
                "shop",
                "accept_order",
                json!({"shop_id": "closed-7"}),
                Some("shop is closed"),
            ),
            (
                "shop",
                "accept_order",
                json!({"shop_id": "closed"}),
                Some("shop is closed"),
            ),
            ("shop", "accept_order", json!({"shop_id": "s-closed"}), None),
            ("shop", "accept_order", json!({"shop_id": 7}), None),
            ("shop", "accept_order", json!({}), None),
            (
                "payment",
                "authorize_payment",
                json!({"amount_cents": 1_000_001}),
                Some("card declined"),
            ),
            (
                "payment",
                "authorize_payment",
                json!({"amount_cents": 2.5e6}),
                Some("card declined"),
            ),
            (
                "payment",
                "authorize_payment",
                json!({"amount_cents": 1_000_000}),
                None,
            ),
            (
                "payment",
                "authorize_payment",
                json!({"amount_cents": "9999999"}),
                None,
            ),
            (
                "coupon",
                "redeem_coupon",
                json!({"coupon": "EXPIRED"}),
                Some("coupon has expired"),
            ),
            (
                "coupon",
                "redeem_coupon",
                json!({"coupon": "expired"}),
                None,
            ),
            (
                "coupon",
                "redeem_coupon",
                json!({"coupon": "WELCOME"}),
                None,
            ),
            // Undoing is never refused, whatever the input.
            ("shop", "reject_order", json!({"shop_id": "closed-7"}), None),
            (
                "coupon",
                "restore_coupon",
                json!({"coupon": "EXPIRED"}),
                None,
            ),
        ] {
            let cmd = command(name, input.clone());
            let (reply, effect) = decide(participant, &cmd, &[], || 1.0);
            match refusal {
                Some(why) => {
                    assert_eq!(reply.outcome, ReplyOutcome::Failure, "{name} {input}");
                    assert_eq!(reason(&reply), why, "{name} {input}");
                    assert!(!reply.retryable && effect.is_none(), "{name} {input}");
                }
                None => assert_eq!(reply.outcome, ReplyOutcome::Success, "{name} {input}"),
            }
        }
        // The saga's own fail_at still wins, and a rule is applied to a refused command no more.
        let both = command(
            "authorize_payment",
            json!({"amount_cents": 5_000_000, "fail_at": "authorize_payment"}),
        );
        let rules = ["authorize_payment=1:transient".parse().unwrap()];
        let (reply, _) = decide("payment", &both, &rules, || panic!("no draw expected"));
        assert!(reason(&reply).contains("fail_at"), "{reply:?}");
        let declined = command("authorize_payment", json!({"amount_cents": 5_000_000}));
        let (reply, _) = decide("payment", &declined, &rules, || panic!("no draw expected"));
        assert_eq!((reason(&reply), reply.retryable), ("card declined", false));
    }

    #[test]
    fn only_a_slow_shop_takes_its_time() {
        for (name, input, delay) in [
            ("accept_order", json!({"shop_id": "slow-1"}), SLOW_SHOP),
            ("accept_order", json!({"shop_id": "slow"}), SLOW_SHOP),
            ("accept_order", json!({"shop_id": "s-1"}), Duration::ZERO),
            ("accept_order", json!({}), Duration::ZERO),
            ("reject_order", json!({"shop_id": "slow-1"}), Duration::ZERO),
            (
                "redeem_coupon",
                json!({"shop_id": "slow-1"}),
                Duration::ZERO,
            ),
        ] {
            assert_eq!(
                slowness(&command(name, input.clone())),
                delay,
                "{name} {input}"
            );
        }
    }

    /// Runs `sagas/food_delivery.toml` forwards with the engine's own conditions and
    /// mappings, each command answered by [`decide`]: every mapping finds the fields it reads in
    /// the outputs the demo gives, and each business rule fails the step it is meant to.
    mod food_delivery {
        use super::*;
        use saga_engine::definition::{self, Definition};
        use saga_engine::expr::Data;

        const FILE: &str = "sagas/food_delivery.toml";

        fn definition() -> Definition {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(FILE);
            let text = std::fs::read_to_string(&path).unwrap();
            definition::parse(&path, &text).unwrap()
        }

        fn input(extra: Value) -> Value {
            let mut input = json!({
                "customer_id": "c-42", "shop_id": "s-9", "items": [{"sku": "bibimbap", "qty": 2}],
                "amount_cents": 12_900, "address": "1 Main St"
            });
            if let (Some(to), Some(from)) = (input.as_object_mut(), extra.as_object()) {
                to.extend(from.clone());
            }
            input
        }

        /// Each step's command, in graph order, until one fails: (step, command input, reply),
        /// `None` for a skipped step. Then the compensations of the completed steps, rendered.
        struct Run {
            forwards: Vec<(String, Option<(Value, ReplyBody)>)>,
            compensations: Vec<(String, Value, ReplyBody)>,
        }

        fn run(def: &Definition, saga_input: &Value) -> Run {
            let saga_id = Uuid::now_v7();
            let mut outputs: Vec<Option<Value>> = vec![None; def.steps.len()];
            let mut forwards = Vec::new();
            let mut done = Vec::new();
            for i in def.topo_order() {
                let step = &def.steps[i];
                let data = Data {
                    input: saga_input,
                    saga_id,
                    outputs: &outputs,
                };
                if let Some(when) = &step.when
                    && !when.eval(def, i, &data).unwrap()
                {
                    outputs[i] = Some(Value::Null);
                    forwards.push((step.name.clone(), None));
                    continue;
                }
                let body = step.input.as_ref().unwrap().render(def, i, &data).unwrap();
                let mut cmd = command(&step.action, body.clone());
                cmd.saga_id = saga_id;
                let (reply, _) = decide(&step.participant, &cmd, &[], || 1.0);
                let ok = reply.outcome == ReplyOutcome::Success;
                outputs[i] = ok.then(|| reply.output.clone());
                forwards.push((step.name.clone(), Some((body, reply))));
                if !ok {
                    break;
                }
                done.push(i);
            }
            let mut compensations = Vec::new();
            for &i in done.iter().rev().filter(|&&i| i <= def.pivot) {
                let step = &def.steps[i];
                let Some(name) = &step.compensation else {
                    continue;
                };
                let data = Data {
                    input: saga_input,
                    saga_id,
                    outputs: &outputs,
                };
                let mapping = step
                    .compensation_input
                    .as_ref()
                    .or(step.input.as_ref())
                    .unwrap();
                let body = mapping.render(def, i, &data).unwrap();
                let mut cmd = command(name, body.clone());
                cmd.kind = "compensation".into();
                let (reply, _) = decide(&step.participant, &cmd, &[], || 1.0);
                compensations.push((step.name.clone(), body, reply));
            }
            Run {
                forwards,
                compensations,
            }
        }

        fn failed(run: &Run) -> Option<(&str, &str)> {
            run.forwards.iter().find_map(|(step, sent)| match sent {
                Some((_, reply)) if reply.outcome == ReplyOutcome::Failure => {
                    Some((step.as_str(), reason(reply)))
                }
                _ => None,
            })
        }

        #[test]
        fn a_saga_with_a_coupon_runs_to_the_end() {
            let def = definition();
            let r = run(&def, &input(json!({"coupon": "WELCOME"})));
            assert_eq!(failed(&r), None);
            let sent: Vec<&str> = r
                .forwards
                .iter()
                .filter(|(_, c)| c.is_some())
                .map(|(s, _)| s.as_str())
                .collect();
            assert_eq!(sent.len(), def.steps.len(), "{sent:?}");
            let body = |name: &str| {
                r.forwards
                    .iter()
                    .find(|(s, _)| s == name)
                    .and_then(|(_, c)| c.as_ref())
                    .map(|(b, _)| b.clone())
                    .unwrap()
            };
            let order_id = &body("authorize_payment")["order_id"];
            assert!(
                order_id.as_str().is_some_and(|o| o.starts_with("ord-")),
                "{order_id}"
            );
            assert_eq!(body("dispatch_rider")["coupon_applied"], json!(true));
            let notify = body("notify_customer");
            assert!(
                notify["rider"].is_string() && notify["eta_minutes"].is_u64(),
                "{notify}"
            );
            assert_eq!(&notify["order_id"], order_id);
        }

        #[test]
        fn without_a_coupon_the_coupon_service_is_not_asked() {
            let def = definition();
            for coupon in [json!({}), json!({"coupon": ""})] {
                let r = run(&def, &input(coupon));
                assert_eq!(failed(&r), None);
                let skipped: Vec<&str> = r
                    .forwards
                    .iter()
                    .filter(|(_, c)| c.is_none())
                    .map(|(s, _)| s.as_str())
                    .collect();
                assert_eq!(skipped, ["redeem_coupon"]);
            }
        }

        #[test]
        fn each_rule_fails_its_step_and_the_compensations_get_what_they_need() {
            let def = definition();
            for (extra, step, why) in [
                (
                    json!({"shop_id": "closed-3"}),
                    "shop_accepts",
                    "shop is closed",
                ),
                (
                    json!({"amount_cents": 2_000_000}),
                    "authorize_payment",
                    "card declined",
                ),
                (
                    json!({"coupon": "EXPIRED"}),
                    "redeem_coupon",
                    "coupon has expired",
                ),
            ] {
                let r = run(&def, &input(extra.clone()));
                assert_eq!(failed(&r), Some((step, why)), "{extra}");
                assert_eq!(
                    r.compensations.last().map(|c| c.0.as_str()),
                    Some("create_order")
                );
                for (name, body, reply) in &r.compensations {
                    assert_eq!(reply.outcome, ReplyOutcome::Success, "{name} {body}");
                    // A mapped compensation input read a field the action's output had.
                    assert!(
                        body.as_object()
                            .is_some_and(|b| b.values().all(|v| !v.is_null())),
                        "{name} {body}"
                    );
                }
            }
        }
    }
}
