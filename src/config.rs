//! Settings: defaults that work on a development machine, overridable by `SAGA_*` environment
//! variables and command-line flags (flags win).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `sagad` can be told. Connection URLs may carry passwords: log them only through
/// [`redact_url`].
#[derive(clap::Args, Clone)]
pub struct Settings {
    /// PostgreSQL URL. The database is created if it does not exist.
    #[arg(
        long,
        global = true,
        env = "SAGA_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/saga"
    )]
    pub database_url: String,
    /// RabbitMQ URL (the vhost is the path, `%2f` for `/`).
    #[arg(
        long,
        global = true,
        env = "SAGA_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// PEM file of certificate authorities trusted for an `amqps://` URL, besides the system's.
    #[arg(long, global = true, env = "SAGA_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// Address the gRPC API listens on.
    #[arg(
        long,
        global = true,
        env = "SAGA_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,
    /// Address of the HTTP endpoints `/metrics` (Prometheus), `/healthz` and `/readyz`.
    #[arg(
        long,
        global = true,
        env = "SAGA_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
    /// Directory of saga definition files (`*.toml`).
    #[arg(long, global = true, env = "SAGA_DEFINITIONS", default_value = "sagas")]
    pub definitions: PathBuf,
    /// Size of the PostgreSQL connection pool.
    #[arg(
        long,
        global = true,
        env = "SAGA_DB_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub db_max_connections: u32,
    /// Replies processed concurrently (the AMQP prefetch of the reply consumer).
    #[arg(
        long,
        global = true,
        env = "SAGA_REPLY_PREFETCH",
        default_value_t = 256
    )]
    pub reply_prefetch: u16,
    /// Outbox rows published per batch (one confirm round trip per batch).
    #[arg(long, global = true, env = "SAGA_OUTBOX_BATCH", default_value_t = 256)]
    pub outbox_batch: i64,
    /// Outbox relays per process, each with its own broker channel, publishing concurrently.
    #[arg(long, global = true, env = "SAGA_RELAY_WORKERS", default_value_t = 2)]
    pub relay_workers: u16,
    /// How often the relay polls the outbox for rows no commit of this process woke it for.
    #[arg(long, global = true, env = "SAGA_OUTBOX_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub outbox_poll: Duration,
    /// How often due timers (reply deadlines, retry back-offs) are looked for.
    #[arg(long, global = true, env = "SAGA_TIMER_POLL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub timer_poll: Duration,
    /// Consecutive timeouts or transient failures of a participant that open its circuit
    /// (its commands then wait instead of being sent).
    #[arg(
        long,
        global = true,
        env = "SAGA_CIRCUIT_FAILURES",
        default_value_t = 5
    )]
    pub circuit_failures: u32,
    /// How long an open circuit waits before probing the participant with one command.
    #[arg(long, global = true, env = "SAGA_CIRCUIT_COOLDOWN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub circuit_cooldown: Duration,
    /// TOML file of API tokens: `[[token]]` entries with `name`, `scope` ("participant" or
    /// "operator") and `token`.
    #[arg(long, global = true, env = "SAGA_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// An operator token (named "operator"), in addition to the file.
    #[arg(
        long,
        global = true,
        env = "SAGA_OPERATOR_TOKEN",
        hide_env_values = true
    )]
    pub operator_token: Option<String>,
    /// A participant token (named "participant"), in addition to the file.
    #[arg(
        long,
        global = true,
        env = "SAGA_PARTICIPANT_TOKEN",
        hide_env_values = true
    )]
    pub participant_token: Option<String>,
    /// `WatchSaga` streams one token may have open at once (more: RESOURCE_EXHAUSTED).
    #[arg(
        long,
        global = true,
        env = "SAGA_MAX_WATCHES_PER_TOKEN",
        default_value_t = crate::api::DEFAULT_MAX_WATCHES_PER_TOKEN
    )]
    pub max_watches_per_token: usize,
    /// Serve the API without authentication on a non-loopback address (never in production).
    #[arg(long, global = true, env = "SAGA_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// PEM certificate chain for TLS on the gRPC listener (with --tls-key).
    #[arg(long, global = true, env = "SAGA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC listener (with --tls-cert).
    #[arg(long, global = true, env = "SAGA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long shutdown waits for in-flight work before giving up.
    #[arg(long, global = true, env = "SAGA_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

impl Settings {
    /// The defaults, as if no flag or variable were given.
    pub fn defaults() -> Settings {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            settings: Settings,
        }
        <Only as clap::Parser>::parse_from(["sagad"]).settings
    }
}

/// The URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/saga"),
            "postgres://postgres@127.0.0.1/saga"
        );
        assert!(!redact_url("not a url s3cret").contains("s3cret"));
    }
}
