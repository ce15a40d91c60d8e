//! `saga-demo`: runs the demo participants of `sagas/order_fulfillment.toml` and
//! `sagas/food_delivery.toml` against RabbitMQ. See the library, `saga_demo`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::time::Duration;

use clap::Parser;
use saga_demo::{self as demo, DemoConfig, FailRule};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Demo saga participants: order, payment, delivery, shop, coupon and notification"
)]
struct Args {
    /// RabbitMQ URL (the vhost is the path, `%2f` for `/`).
    #[arg(
        long,
        env = "SAGA_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,

    /// PEM file of certificate authorities trusted for an `amqps://` URL, besides the system's.
    #[arg(long, env = "SAGA_AMQP_CA_FILE")]
    amqp_ca_file: Option<std::path::PathBuf>,

    /// The demo's own database; created if missing.
    #[arg(
        long,
        env = "SAGA_DEMO_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/saga_demo"
    )]
    database_url: String,

    /// Which participants to run, comma-separated (default: all, `saga_demo::PARTICIPANTS`).
    #[arg(
        long,
        env = "SAGA_DEMO_PARTICIPANTS",
        value_delimiter = ',',
        default_value = "order,payment,delivery,shop,coupon,notification"
    )]
    participants: Vec<String>,

    /// Inject failures: COMMAND[=PROBABILITY][:transient], e.g. `authorize_payment=0.3:transient`.
    /// Repeatable. Sagas can also ask for failures with `"fail_at"` in their input, and some
    /// inputs are refused as a real service would (a closed shop, a declined card).
    #[arg(
        long = "fail",
        value_name = "RULE",
        env = "SAGA_DEMO_FAIL",
        value_delimiter = ','
    )]
    failures: Vec<FailRule>,

    /// Latency added before each command's work, e.g. `5ms`.
    #[arg(long, env = "SAGA_DEMO_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,

    /// Unacknowledged commands per participant, handled concurrently.
    #[arg(long, env = "SAGA_DEMO_PREFETCH", default_value_t = 64)]
    prefetch: u16,

    /// Send every reply twice (to exercise the orchestrator's de-duplication).
    #[arg(long, env = "SAGA_DEMO_DUPLICATE_REPLIES")]
    duplicate_replies: bool,

    /// Answer every command with a success at once, with no database work (for benchmarks
    /// against engines whose steps do nothing); replies are still confirmed before the ack.
    #[arg(long, env = "SAGA_DEMO_NOOP")]
    noop: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = saga::telemetry::Telemetry::init("saga-demo", false);
    let args = Args::parse();
    let amqp_ca = saga::broker::load_amqp_ca(&args.amqp_url, args.amqp_ca_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    demo::ensure_database(&args.database_url).await?;

    let shutdown = CancellationToken::new();
    saga::app::cancel_on_signal(shutdown.clone());
    let result = demo::run(
        DemoConfig {
            amqp_url: args.amqp_url,
            amqp_ca,
            database_url: args.database_url,
            participants: args.participants,
            failures: args.failures,
            latency: args.latency,
            prefetch: args.prefetch,
            duplicate_replies: args.duplicate_replies,
            noop: args.noop,
        },
        shutdown,
    )
    .await;
    telemetry.shutdown();
    result
}
