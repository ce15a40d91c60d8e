//! The outbox relay: publishes what committed transitions left in the outbox, with publisher
//! confirms, and deletes the rows once the broker has them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info};

use super::{BrokerError, open, reconnecting};
use crate::breaker;
use crate::contract;
use crate::driver::Driver;
use crate::store::OutboxTx;
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub amqp_url: String,
    /// Extra CA certificates (PEM) for `amqps://`, from [`load_amqp_ca`].
    pub amqp_ca: Option<Arc<str>>,
    /// Participants whose queues must exist before commands are routed to them.
    pub participants: Vec<String>,
    pub batch_size: i64,
    /// How often to look for rows nobody woke this relay for (other replicas', a crashed one's).
    pub poll_interval: Duration,
}

/// Publishes the outbox: woken in-process after each committed transition (no `NOTIFY`: it
/// serialises the commits of every notifying transaction, fsync included), with polling for
/// rows other replicas left behind. Rows are deleted in the transaction that claimed them, after
/// the broker confirmed every message, so a crash in between re-publishes (at least once, same
/// `message_id`).
pub async fn run_relay(driver: Driver, settings: RelaySettings, shutdown: CancellationToken) {
    let connected = &driver.metrics().relay_connected;
    reconnecting("outbox relay", connected, &shutdown, || {
        relay_session(&driver, &settings, &shutdown)
    })
    .await
}

async fn relay_session(
    driver: &Driver,
    settings: &RelaySettings,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let (conn, channel) = open(
        &settings.amqp_url,
        settings.amqp_ca.as_deref(),
        &settings.participants,
    )
    .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // A connection of its own (see `OutboxSession`).
    let mut db = driver.store().outbox_session().await?;
    info!("outbox relay connected");
    driver
        .metrics()
        .relay_connected
        .store(true, Ordering::Relaxed);
    // Open circuits are probed on the polling tick (and at start), not on every batch.
    let mut probe = true;
    let mut more = true;
    loop {
        // The transaction is opened before waiting, so its BEGIN round trip is not on the way
        // out of the next command. It holds no snapshot nor lock until the batch's first
        // statement; a server that ends idle transactions only makes the relay reconnect.
        let tx = db.begin().await?;
        if !more {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    drop(tx);
                    let _ = channel.close(200, "shutdown".into()).await;
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                _ = driver.outbox_ready() => {}
                _ = tokio::time::sleep(settings.poll_interval) => { probe = true; }
            }
        }
        let published = publish_batch(
            driver,
            tx,
            &channel,
            settings.batch_size,
            std::mem::take(&mut probe),
        )
        .await?;
        more = published == settings.batch_size as usize;
    }
}

async fn publish_batch(
    driver: &Driver,
    mut tx: OutboxTx<'_>,
    channel: &Channel,
    limit: i64,
    probe: bool,
) -> Result<usize, BrokerError> {
    let now = driver.clock().now();
    let mut rows = tx.take(limit).await?;
    let mut probes = Vec::new();
    if probe {
        for participant in tx.due_for_probe(now).await? {
            if let Some(row) = tx.take_one(&participant).await? {
                probes.push(participant);
                rows.push(row);
            }
        }
    }
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    // A command that waited (held participant, broker outage, backlog) gets its whole timeout
    // from now; fresh ones keep the deadline set when they were created. Written before the
    // messages go out, in the transaction that commits only after their confirms: the reply
    // could otherwise be applied first, and the attempt keep the deadline it was decided with.
    let waited: Vec<uuid::Uuid> = rows
        .iter()
        .filter(|r| {
            r.exchange == contract::COMMANDS_EXCHANGE
                && breaker::restarts_deadline(r.created_at, now)
        })
        .map(|r| r.message_id)
        .collect();
    tx.restart_deadlines(&waited, now).await?;
    // Hand every message to the connection at once (each publish only resolves once lapin's
    // I/O thread has written it, so awaiting them one by one costs a thread round trip per
    // message), then wait for the confirms together: one broker round trip per batch. The
    // frames keep the rows' order: each publish queues its frames when first polled, and
    // `try_join_all` polls them in order.
    let publishes = rows.iter().map(|row| {
        // One producer span per message, child of the call that started the saga; its context
        // travels in the `traceparent` header so the participant's work joins the trace.
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish {}", row.exchange),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = %row.exchange,
            messaging.rabbitmq.destination.routing_key = %row.routing_key,
            messaging.message.id = %row.message_id,
        );
        telemetry::set_parent(&span, contract::render::parent(&row.properties));
        let properties = contract::render::amqp_properties(
            row.message_id,
            row.created_at.unix_timestamp().max(0) as u64,
            &row.properties,
            telemetry::traceparent(&span),
        );
        channel
            .basic_publish(
                row.exchange.as_str().into(),
                row.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &row.body,
                properties,
            )
            .instrument(span)
    });
    let confirms = futures::future::try_join_all(publishes).await?;
    for (row, confirm) in rows.iter().zip(confirms) {
        if !confirm.await?.is_ack() {
            return Err(BrokerError::Nacked(row.message_id.to_string()));
        }
    }
    let published = rows.len();
    for participant in &probes {
        tx.probe_sent(participant, now, driver.circuit().cooldown)
            .await?;
    }
    tx.commit().await?;
    debug!(count = published, "published outbox batch");
    Ok(published)
}
