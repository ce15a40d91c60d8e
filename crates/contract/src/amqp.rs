//! Connecting to RabbitMQ the way sagad does, for sagad, the demo and the participant SDK alike:
//! TLS for `amqps://` and the watch for a connection that died without telling its users.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

/// Connects to RabbitMQ. `amqps://` is always TLS (verified against the system's authorities and
/// `ca`, PEM certificate authorities to trust besides them); a server that does not speak TLS
/// there fails the connection, it is never retried in plain text.
pub async fn connect(url: &str, ca: Option<&str>) -> Result<Connection, lapin::Error> {
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: ca.map(str::to_owned),
    };
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_with_config(url, ConnectionProperties::default(), tls, runtime).await
}

/// Resolves once `connected` turns false, checked every [`CONNECTION_CHECK`]. A lost
/// connection does not always end lapin's consumer streams, nor the publishes and acks waiting
/// on it (seen when RabbitMQ stops mid-load: sessions hung and never reconnected), so whatever
/// waits on the broker also waits on this.
pub async fn disconnected(connected: impl Fn() -> bool) {
    while connected() {
        tokio::time::sleep(CONNECTION_CHECK).await;
    }
}

/// How often [`disconnected`] looks.
pub const CONNECTION_CHECK: Duration = Duration::from_millis(250);
