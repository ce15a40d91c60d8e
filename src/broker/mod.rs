//! The RabbitMQ adapter: the outbox relay ([`relay`]: commands and events out) and the reply
//! intake ([`intake`]: replies in), and what both share: connecting, the topology, reconnecting.
//!
//! Both loops survive broker restarts: any AMQP or database error drops the connection, waits
//! with capped back-off and starts again. Nothing is lost meanwhile: unpublished commands stay
//! in the outbox, unacknowledged replies stay in their queue.

pub mod intake;
pub mod relay;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::{Channel, Connection};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::contract;
use crate::store::StoreError;

pub use intake::{ConsumerSettings, run_reply_consumer};
pub use relay::{RelaySettings, run_relay};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the broker connection or the consumer ended")]
    ConsumerEnded,
    #[error("broker refused message {0}")]
    Nacked(String),
}

/// Reads and checks, once at start-up, the PEM certificate authorities trusted for `amqps://`
/// besides the system's. A file that holds no certificate is refused here: the TLS library
/// would skip what it cannot parse and the first handshake would fail later, far from the cause.
/// A CA file with a plain-text `amqp://` URL is refused too, as it says TLS was meant.
pub fn load_amqp_ca(url: &str, ca_file: Option<&Path>) -> Result<Option<Arc<str>>, String> {
    let Some(path) = ca_file else {
        return Ok(None);
    };
    if !url
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("amqps://")
    {
        return Err(format!(
            "a CA file ({}) is configured but the AMQP URL is not amqps://",
            path.display()
        ));
    }
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(Some(pem.into()))
}

// Every AMQP connection of this crate (relay, consumer, topology, demo participants) goes
// through `connect`; it lives in the contract crate so participants connect the same way.
pub use saga_contract::amqp::{connect, disconnected};

/// Connects and opens a channel, declaring the topology first: done on every (re)connect, so a
/// broker that lost its state gets it back before anything is published or consumed.
pub async fn open(
    url: &str,
    ca: Option<&str>,
    participants: &[String],
) -> Result<(Connection, Channel), lapin::Error> {
    let conn = connect(url, ca).await?;
    let channel = conn.create_channel().await?;
    contract::declare_topology(&channel, participants.iter().map(String::as_str)).await?;
    Ok((conn, channel))
}

/// Capped exponential back-off for reconnect loops.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// Waits for the next delay; false if shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Runs `session` until it ends cleanly (shutdown), starting it again after any error with
/// capped back-off. The back-off starts over once a session had connected (`connected`).
async fn reconnecting<F, Fut>(
    what: &str,
    connected: &AtomicBool,
    shutdown: &CancellationToken,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    let mut backoff = Backoff::new();
    loop {
        match session().await {
            Ok(()) => return,
            Err(e) => {
                if connected.swap(false, Ordering::Relaxed) {
                    backoff.reset();
                }
                warn!(error = %e, "{what} interrupted; reconnecting");
            }
        }
        if !backoff.wait(shutdown).await {
            return;
        }
    }
}
