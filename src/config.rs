//! Settings: defaults that work on a development machine, overridable by `SAGA_*` environment
//! variables and command-line flags (flags win).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
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
    /// Address of the operator console (HTTP; HTTPS with --tls-cert/--tls-key). Operator
    /// tokens log in; without tokens it is open, so it must then be on loopback, as the API.
    #[arg(
        long,
        global = true,
        env = "SAGA_CONSOLE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub console_listen: SocketAddr,
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
    /// PEM certificate chain for TLS on the gRPC listener and the console (with --tls-key).
    #[arg(long, global = true, env = "SAGA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC listener and the console (with --tls-cert).
    #[arg(long, global = true, env = "SAGA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long shutdown waits for in-flight work before giving up.
    #[arg(long, global = true, env = "SAGA_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// A background task that failed three times within this window is crash-looping: sagad
    /// reports not ready until the task has run this long without failing.
    #[arg(long, global = true, env = "SAGA_TASK_FAILURE_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub task_failure_window: Duration,
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

/// A setting out of its range, named as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} ({env}): {message}")]
pub struct SettingsError {
    pub flag: &'static str,
    pub env: &'static str,
    pub message: String,
}

/// Bounds of the poll intervals: a zero interval would spin, hours would leave work undone.
const POLL_RANGE: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(3600));

impl Settings {
    /// Checks every setting's range, so that `sagad` refuses to start with one clear message
    /// instead of spinning on a zero interval or failing later on a bad URL.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_database()?;
        check_amqp_url(&self.amqp_url)?;
        let between = |flag, env, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(SettingsError {
                    flag,
                    env,
                    message: format!("{value} is out of range: must be between {min} and {max}"),
                })
            }
        };
        between(
            "--reply-prefetch",
            "SAGA_REPLY_PREFETCH",
            u64::from(self.reply_prefetch),
            1,
            u64::from(u16::MAX),
        )?;
        if !(1..=10_000).contains(&self.outbox_batch) {
            return Err(SettingsError {
                flag: "--outbox-batch",
                env: "SAGA_OUTBOX_BATCH",
                message: format!(
                    "{} is out of range: must be between 1 and 10000",
                    self.outbox_batch
                ),
            });
        }
        between(
            "--relay-workers",
            "SAGA_RELAY_WORKERS",
            u64::from(self.relay_workers),
            1,
            64,
        )?;
        between(
            "--circuit-failures",
            "SAGA_CIRCUIT_FAILURES",
            u64::from(self.circuit_failures),
            1,
            1_000_000,
        )?;
        duration_between(
            "--outbox-poll",
            "SAGA_OUTBOX_POLL",
            self.outbox_poll,
            POLL_RANGE,
        )?;
        duration_between(
            "--timer-poll",
            "SAGA_TIMER_POLL",
            self.timer_poll,
            POLL_RANGE,
        )?;
        duration_between(
            "--circuit-cooldown",
            "SAGA_CIRCUIT_COOLDOWN",
            self.circuit_cooldown,
            (Duration::from_millis(1), Duration::from_secs(24 * 3600)),
        )?;
        duration_between(
            "--shutdown-grace",
            "SAGA_SHUTDOWN_GRACE",
            self.shutdown_grace,
            (Duration::from_millis(1), Duration::from_secs(3600)),
        )?;
        Ok(())
    }

    /// The settings `sagad migrate` uses: the database URL and the pool size.
    pub fn validate_database(&self) -> Result<(), SettingsError> {
        let err = |flag, env, message: String| SettingsError { flag, env, message };
        let shown = redact_url(&self.database_url);
        match url::Url::parse(&self.database_url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            Ok(u) => {
                return Err(err(
                    "--database-url",
                    "SAGA_DATABASE_URL",
                    format!(
                        "{shown}: scheme `{}` is not PostgreSQL (postgres://user@host:port/database)",
                        u.scheme()
                    ),
                ));
            }
            Err(e) => {
                return Err(err(
                    "--database-url",
                    "SAGA_DATABASE_URL",
                    format!("{shown}: {e} (postgres://user@host:port/database)"),
                ));
            }
        }
        if let Err(e) = crate::store::check_url(&self.database_url) {
            return Err(err(
                "--database-url",
                "SAGA_DATABASE_URL",
                format!("{shown}: {e}"),
            ));
        }
        if !(1..=1000).contains(&self.db_max_connections) {
            return Err(err(
                "--db-max-connections",
                "SAGA_DB_MAX_CONNECTIONS",
                format!(
                    "{} is out of range: must be between 1 and 1000",
                    self.db_max_connections
                ),
            ));
        }
        Ok(())
    }
}

fn duration_between(
    flag: &'static str,
    env: &'static str,
    value: Duration,
    (min, max): (Duration, Duration),
) -> Result<(), SettingsError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(SettingsError {
        flag,
        env,
        message: format!(
            "{} is out of range: must be between {} and {}",
            humantime::format_duration(value),
            humantime::format_duration(min),
            humantime::format_duration(max)
        ),
    })
}

fn check_amqp_url(url: &str) -> Result<(), SettingsError> {
    let err = |message: String| SettingsError {
        flag: "--amqp-url",
        env: "SAGA_AMQP_URL",
        message,
    };
    let shown = redact_url(url);
    let form = "amqp://user:password@host:port/vhost";
    let parsed = url::Url::parse(url).map_err(|e| err(format!("{shown}: {e} ({form})")))?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(err(format!(
            "{shown}: scheme `{}` is not AMQP ({form})",
            parsed.scheme()
        )));
    }
    // The broker client's own parser has the last word (ports, vhost, query options); its
    // messages may quote the whole URL, password included, so only ours is shown.
    lapin::uri::AMQPUri::from_str(url)
        .map(drop)
        .map_err(|_| err(format!("{shown}: not a valid AMQP URL ({form})")))
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

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Settings::defaults().validate(), Ok(()));
    }

    #[test]
    fn every_out_of_range_setting_is_refused_with_its_flag() {
        type Change = Box<dyn Fn(&mut Settings)>;
        let cases: Vec<(&str, Change)> = vec![
            ("--outbox-batch", Box::new(|s| s.outbox_batch = 0)),
            ("--outbox-batch", Box::new(|s| s.outbox_batch = -5)),
            ("--outbox-batch", Box::new(|s| s.outbox_batch = 1_000_000)),
            (
                "--db-max-connections",
                Box::new(|s| s.db_max_connections = 0),
            ),
            (
                "--db-max-connections",
                Box::new(|s| s.db_max_connections = 100_000),
            ),
            ("--reply-prefetch", Box::new(|s| s.reply_prefetch = 0)),
            ("--relay-workers", Box::new(|s| s.relay_workers = 0)),
            ("--relay-workers", Box::new(|s| s.relay_workers = 1000)),
            ("--circuit-failures", Box::new(|s| s.circuit_failures = 0)),
            (
                "--outbox-poll",
                Box::new(|s| s.outbox_poll = Duration::ZERO),
            ),
            (
                "--outbox-poll",
                Box::new(|s| s.outbox_poll = Duration::from_secs(86_400)),
            ),
            ("--timer-poll", Box::new(|s| s.timer_poll = Duration::ZERO)),
            ("--timer-poll", Box::new(|s| s.timer_poll = Duration::MAX)),
            (
                "--circuit-cooldown",
                Box::new(|s| s.circuit_cooldown = Duration::ZERO),
            ),
            (
                "--shutdown-grace",
                Box::new(|s| s.shutdown_grace = Duration::ZERO),
            ),
            (
                "--shutdown-grace",
                Box::new(|s| s.shutdown_grace = Duration::from_secs(1 << 40)),
            ),
            (
                "--database-url",
                Box::new(|s| s.database_url = "mysql://root:s3cret@db/saga".into()),
            ),
            (
                "--database-url",
                Box::new(|s| s.database_url = "127.0.0.1:5432/saga".into()),
            ),
            (
                "--database-url",
                Box::new(|s| s.database_url = "postgres://h:notaport/saga".into()),
            ),
            ("--amqp-url", Box::new(|s| s.amqp_url = "not a url".into())),
            (
                "--amqp-url",
                Box::new(|s| s.amqp_url = "http://guest:s3cret@h/".into()),
            ),
            (
                "--amqp-url",
                Box::new(|s| s.amqp_url = "amqp://guest:s3cret@h:99999/%2f".into()),
            ),
        ];
        for (flag, set) in cases {
            let mut s = Settings::defaults();
            set(&mut s);
            let e = s.validate().expect_err(flag);
            assert_eq!(e.flag, flag, "{e}");
            let shown = e.to_string();
            assert!(shown.starts_with(flag), "{shown}");
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn migrate_checks_only_the_database_settings() {
        let mut s = Settings::defaults();
        s.amqp_url = "not a url".into();
        assert_eq!(s.validate_database(), Ok(()));
        s.db_max_connections = 0;
        assert_eq!(
            s.validate_database().map_err(|e| e.flag),
            Err("--db-max-connections")
        );
    }
}
