//! The reply intake: consumes `saga.replies`, applies the replies through the driver in
//! batches, acks them after the commit, and dead-letters what cannot be applied.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use super::{BrokerError, disconnected, open, reconnecting};
use crate::contract::{self, ReplyBody, ReplyOutcome};
use crate::driver::{Driver, DriverError, ReplyResult};
use crate::engine::Outcome;
use crate::store::StoreError;
use crate::telemetry;

/// Most replies applied in one transaction.
const REPLY_BATCH: usize = 64;
const CONCURRENT_BATCHES: usize = 4;

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub amqp_url: String,
    /// Extra CA certificates (PEM) for `amqps://`, from [`load_amqp_ca`].
    pub amqp_ca: Option<Arc<str>>,
    pub participants: Vec<String>,
    pub prefetch: u16,
}

/// Consumes `saga.replies`: applies each reply in its own transaction and acks it only after
/// the commit. Malformed or unknown replies are moved to the dead-letter queue with the reason.
pub async fn run_reply_consumer(
    driver: Driver,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) {
    let connected = &driver.metrics().consumer_connected;
    reconnecting("reply consumer", connected, &shutdown, || {
        consume_session(&driver, &settings, &shutdown)
    })
    .await
}

async fn consume_session(
    driver: &Driver,
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let (conn, channel) = open(
        &settings.amqp_url,
        settings.amqp_ca.as_deref(),
        &settings.participants,
    )
    .await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    // Dead-letter publishes are confirmed before the original is acked.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let tag = format!("sagad-{}", uuid::Uuid::now_v7());
    let consumer = channel
        .basic_consume(
            contract::REPLIES_QUEUE.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let out = ReplyChannel {
        channel: channel.clone(),
        header_budget: header_budget(conn.configuration().frame_max()),
    };
    info!(queue = contract::REPLIES_QUEUE, "reply consumer connected");
    driver
        .metrics()
        .consumer_connected
        .store(true, Ordering::Relaxed);

    let stopped = shutdown.clone();
    let mut lost = None;
    let handled = consumer
        .take_until(async move { stopped.cancelled().await })
        // A delivery error means the channel or its connection is gone: stop there.
        .scan((), |(), delivery| {
            std::future::ready(match delivery {
                Ok(delivery) => Some(delivery),
                Err(e) => {
                    lost = Some(e);
                    None
                }
            })
        })
        // Whatever has arrived, up to a batch, is applied in one transaction; a few batches
        // run at once so one slow commit does not stall the queue.
        .ready_chunks(REPLY_BATCH)
        .for_each_concurrent(CONCURRENT_BATCHES, |batch| {
            handle_batch(driver, &out, batch)
        });
    // The connection is watched too (see `disconnected`). Batches still running are then
    // dropped: a transaction not committed rolls back, and every unacked reply comes back after
    // the reconnect, where a committed one is a duplicate.
    let connection_lost =
        disconnected(|| conn.status().connected() && channel.status().connected());
    tokio::select! {
        _ = handled => {}
        _ = connection_lost => {
            return Err(BrokerError::ConsumerEnded);
        }
    }
    if shutdown.is_cancelled() {
        // Unacked replies go back to the queue when the channel closes.
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = channel.close(200, "shutdown".into()).await;
        let _ = conn.close(200, "shutdown".into()).await;
        return Ok(());
    }
    Err(lost.map_or(BrokerError::ConsumerEnded, BrokerError::Amqp))
}

/// A reply taken off the queue, with the span of its processing.
struct Incoming {
    delivery: lapin::message::Delivery,
    span: tracing::Span,
}

/// The consumer span of one reply, continuing the participant's trace.
fn reply_span(delivery: &lapin::message::Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {}", contract::REPLIES_QUEUE),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = contract::REPLIES_QUEUE,
        messaging.message.id = tracing::field::Empty,
        saga.command_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    telemetry::set_parent(
        &span,
        contract::header_str(&headers, telemetry::TRACEPARENT),
    );
    span.record("trace_id", telemetry::trace_id(&span));
    if let Some(id) = delivery.properties.message_id() {
        span.record("messaging.message.id", id.as_str());
    }
    span
}

/// Applies every reply that arrived together in one database transaction, then acks each one.
/// Malformed and unknown replies are dead-lettered one by one; if the batch hits a saga that
/// cannot be read or a value the database refuses, its replies are retried one at a time so
/// the others still go through.
async fn handle_batch(
    driver: &Driver,
    channel: &ReplyChannel,
    deliveries: Vec<lapin::message::Delivery>,
) {
    let mut valid: Vec<(Incoming, ReplyBody)> = Vec::new();
    for delivery in deliveries {
        let span = reply_span(&delivery);
        match ReplyBody::parse(&delivery.data) {
            Ok(reply) => {
                span.record("saga.command_id", tracing::field::display(reply.command_id));
                valid.push((Incoming { delivery, span }, reply));
            }
            Err(reason) => {
                dead_letter(driver, channel, delivery, &reason)
                    .instrument(span)
                    .await
            }
        }
    }
    if valid.is_empty() {
        return;
    }
    let replies: Vec<(uuid::Uuid, Outcome)> = valid
        .iter()
        .map(|(_, r)| (r.command_id, outcome_of(r)))
        .collect();
    match driver.apply_replies(replies).await {
        Ok(results) => {
            // Acked together, for the same reason the relay publishes together.
            let settled = valid
                .into_iter()
                .zip(results)
                .map(|((incoming, reply), result)| {
                    settle(driver, channel, incoming, reply.command_id, result)
                });
            futures::future::join_all(settled).await;
        }
        // A saga that cannot be read, or a value the database refuses: one at a time, so the
        // other replies still go through and the culprit is dead-lettered, not redelivered
        // for ever.
        Err(e) if e.is_corrupt() || e.refused_value().is_some() => {
            for (incoming, reply) in valid {
                let result = driver
                    .apply_reply(reply.command_id, outcome_of(&reply))
                    .await;
                match result {
                    Ok(result) => settle(driver, channel, incoming, reply.command_id, result).await,
                    Err(e) => give_back(driver, channel, incoming, reply.command_id, e).await,
                }
            }
        }
        Err(e) => {
            // Most likely the database is down: give the replies back and slow down rather
            // than spin on redeliveries.
            warn!(count = valid.len(), error = %e, "replies not applied; requeued");
            tokio::time::sleep(Duration::from_millis(500)).await;
            for (incoming, _) in valid {
                requeue(&incoming.delivery).await;
            }
        }
    }
}

fn outcome_of(reply: &ReplyBody) -> Outcome {
    match reply.outcome {
        ReplyOutcome::Success => Outcome::Success {
            output: reply.output.clone(),
        },
        ReplyOutcome::Failure => Outcome::Failure {
            reason: reply.reason.clone().unwrap_or_default(),
            retryable: reply.retryable,
        },
    }
}

async fn settle(
    driver: &Driver,
    channel: &ReplyChannel,
    incoming: Incoming,
    command_id: uuid::Uuid,
    result: ReplyResult,
) {
    let Incoming { delivery, span } = incoming;
    async {
        match result {
            ReplyResult::Applied | ReplyResult::Recorded => ack(&delivery).await,
            ReplyResult::Duplicate => {
                debug!(%command_id, "duplicate reply ignored");
                ack(&delivery).await
            }
            ReplyResult::UnknownCommand => {
                let reason = format!("unknown command id {command_id}: no saga sent it");
                dead_letter(driver, channel, delivery, &reason).await
            }
        }
    }
    .instrument(span)
    .await
}

/// A reply that failed on its own: dead-lettered if its saga is unreadable or the database
/// refuses its values, else requeued.
async fn give_back(
    driver: &Driver,
    channel: &ReplyChannel,
    incoming: Incoming,
    command_id: uuid::Uuid,
    e: DriverError,
) {
    let Incoming { delivery, span } = incoming;
    async {
        if let Some(refused) = e.refused_value() {
            warn!(%command_id, error = %refused, "reply the database cannot store");
            dead_letter(
                driver,
                channel,
                delivery,
                &format!("the database cannot store a value of this reply: {refused}"),
            )
            .await
        } else if let DriverError::Corrupt(e) | DriverError::Store(StoreError::Corrupt(e)) = e {
            error!(%command_id, error = %e, "reply for a corrupt saga");
            dead_letter(
                driver,
                channel,
                delivery,
                &format!("saga state cannot be read: {e}"),
            )
            .await
        } else {
            warn!(%command_id, error = %e, "reply not applied; requeued");
            requeue(&delivery).await
        }
    }
    .instrument(span)
    .await
}

async fn requeue(delivery: &lapin::message::Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.nack(requeue).await {
        warn!(error = %e, "nack failed; the broker will redeliver on reconnect");
    }
}

async fn ack(delivery: &lapin::message::Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel is gone: the reply is redelivered and recognised as a duplicate.
        warn!(error = %e, "ack failed");
    }
}

/// The reply consumer's channel, and how large a header table a message published on it may
/// carry.
struct ReplyChannel {
    channel: Channel,
    header_budget: usize,
}

/// Room kept in a content header frame for everything but the header table: the frame's fixed
/// fields and the other properties (ten short strings of at most 255 bytes each, and numbers).
const PROPERTIES_RESERVE: usize = 3072;
/// The frame size every AMQP peer must accept.
const MIN_FRAME: usize = 4096;

/// How large a header table fits in one frame of a connection that negotiated `frame_max`
/// (0: no limit; RabbitMQ's default is then assumed).
fn header_budget(frame_max: u32) -> usize {
    let frame_max = match frame_max as usize {
        0 => 128 * 1024,
        n => n.max(MIN_FRAME),
    };
    frame_max - PROPERTIES_RESERVE
}

/// Bytes `value` takes in an AMQP field table (type tag included). Errs on the large side.
fn encoded_len(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(encoded_len).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_len(t),
        AMQPValue::Void => 0,
    }
}

fn entry_len(key: &ShortString, value: &AMQPValue) -> usize {
    1 + key.as_str().len() + encoded_len(value)
}

fn table_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(k, v)| entry_len(k, v))
        .sum::<usize>()
}

/// The headers of a dead-lettered copy: the original ones plus the reason. If they would not fit
/// in `budget` bytes (a header frame larger than the connection's frame size makes the broker
/// close the connection, and the reply would come back for ever), the largest original headers
/// are dropped until they fit, and [`contract::H_SHORTENED`] names them.
fn dead_letter_headers(original: &FieldTable, reason: &str, budget: usize) -> FieldTable {
    // A small frame gets shorter texts, so our own headers always fit.
    let limit = contract::MAX_REASON_BYTES.min(budget / 4);
    let mut ours = FieldTable::default();
    ours.insert(
        contract::H_ERROR.into(),
        AMQPValue::LongString(contract::bounded(reason, limit).as_ref().into()),
    );
    ours.insert(
        "x-original-queue".into(),
        AMQPValue::LongString(contract::REPLIES_QUEUE.into()),
    );
    let mut kept = original.inner().clone();
    for key in ours.inner().keys() {
        kept.remove(key);
    }
    kept.remove(contract::H_SHORTENED);
    // Room for our headers, and for the note that some were dropped.
    let reserve = table_len(&ours) + 1 + contract::H_SHORTENED.len() + 5 + limit;
    let room = budget.saturating_sub(reserve);
    let mut size = 4 + kept.iter().map(|(k, v)| entry_len(k, v)).sum::<usize>();
    let mut dropped = Vec::new();
    if size > room {
        let mut by_size: Vec<(usize, ShortString)> = kept
            .iter()
            .map(|(k, v)| (entry_len(k, v), k.clone()))
            .collect();
        by_size.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        for (len, key) in by_size {
            if size <= room {
                break;
            }
            kept.remove(&key);
            size -= len;
            dropped.push(key.to_string());
        }
    }
    let mut headers = FieldTable::from(kept);
    for (k, v) in ours.inner() {
        headers.insert(k.clone(), v.clone());
    }
    if !dropped.is_empty() {
        let note = format!(
            "{} header(s) dropped to fit the frame size: {}",
            dropped.len(),
            dropped.join(", ")
        );
        headers.insert(
            contract::H_SHORTENED.into(),
            AMQPValue::LongString(contract::bounded(&note, limit).as_ref().into()),
        );
    }
    headers
}

/// Copies a refused message to the dead-letter exchange with `x-saga-error`, then acks it. If
/// the copy cannot be published, the original is rejected without requeue: the queue's own
/// dead-letter exchange takes it (without our reason), so one message can never loop.
async fn dead_letter(
    driver: &Driver,
    out: &ReplyChannel,
    delivery: lapin::message::Delivery,
    reason: &str,
) {
    let reason = contract::reason(reason);
    warn!(reason = %reason, "reply dead-lettered");
    let original = delivery.properties.headers().clone().unwrap_or_default();
    let headers = dead_letter_headers(&original, &reason, out.header_budget);
    if headers.contains_key(contract::H_SHORTENED) {
        warn!(
            headers = original.inner().len(),
            "dead-lettered reply's headers shortened to fit the frame size"
        );
    }
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let published = async {
        out.channel
            .basic_publish(
                contract::DEAD_LETTER_EXCHANGE.into(),
                contract::REPLIES_QUEUE.into(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await?
            .await
    }
    .await;
    match published {
        Ok(confirm) if confirm.is_ack() => {
            driver.metrics().dead_lettered();
            ack(&delivery).await
        }
        other => {
            warn!(result = ?other.map(|c| c.is_ack()), "dead-letter publish failed; rejected to the queue's dead-letter exchange");
            let reject = BasicNackOptions {
                requeue: false,
                ..BasicNackOptions::default()
            };
            match delivery.nack(reject).await {
                Ok(true) => driver.metrics().dead_lettered(),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "reject failed; the broker will redeliver on reconnect")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_fit_the_frame_and_say_what_was_dropped() {
        let budget = header_budget(131_072);
        let mut original = FieldTable::default();
        original.insert("small".into(), AMQPValue::LongLongInt(7));
        original.insert(
            "big".into(),
            AMQPValue::LongString("x".repeat(131_000).into()),
        );
        let long_reason = "r".repeat(300_000);
        let headers = dead_letter_headers(&original, &long_reason, budget);
        assert!(table_len(&headers) <= budget, "{}", table_len(&headers));
        assert!(headers.contains_key("small"));
        assert!(!headers.contains_key("big"));
        assert!(
            contract::header_str(&headers, contract::H_SHORTENED)
                .is_some_and(|n| n.contains("big"))
        );
        let reason = contract::header_str(&headers, contract::H_ERROR).unwrap_or_default();
        assert!(reason.len() <= contract::MAX_REASON_BYTES);

        // Many small headers: as many go as needed, no more.
        let mut many = FieldTable::default();
        for i in 0..20_000 {
            many.insert(format!("h{i}").as_str().into(), AMQPValue::LongLongInt(i));
        }
        let headers = dead_letter_headers(&many, "bad", budget);
        assert!(table_len(&headers) <= budget);
        assert!(headers.inner().len() > 1000);

        // Nothing to drop: everything kept, no note.
        let headers = dead_letter_headers(&original, "bad", 1 << 20);
        assert!(headers.contains_key("big") && !headers.contains_key(contract::H_SHORTENED));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = AMQPValue> {
            let leaf = prop_oneof![
                any::<bool>().prop_map(AMQPValue::Boolean),
                any::<i64>().prop_map(AMQPValue::LongLongInt),
                any::<u32>().prop_map(AMQPValue::LongUInt),
                any::<f64>().prop_map(AMQPValue::Double),
                any::<u64>().prop_map(AMQPValue::Timestamp),
                Just(AMQPValue::Void),
                ".{0,40}".prop_map(|s| AMQPValue::ShortString(s.as_str().into())),
                (0usize..70_000).prop_map(|n| AMQPValue::LongString("v".repeat(n).into())),
                proptest::collection::vec(any::<u8>(), 0..256)
                    .prop_map(|b| AMQPValue::LongString(b.into())),
            ];
            leaf.prop_recursive(3, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6)
                        .prop_map(|v| AMQPValue::FieldArray(v.into())),
                    proptest::collection::btree_map("[a-z-]{1,20}", inner, 0..6).prop_map(|m| {
                        AMQPValue::FieldTable(
                            m.into_iter()
                                .map(|(k, v)| (ShortString::from(k.as_str()), v))
                                .collect::<std::collections::BTreeMap<_, _>>()
                                .into(),
                        )
                    }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_header_table_and_reason_fit_the_frame(
                entries in proptest::collection::btree_map(".{1,60}", value(), 0..40),
                reason in (0usize..300_000, ".{0,8}").prop_map(|(n, s)| s.repeat(n.min(40_000))),
                frame_max in prop_oneof![Just(0u32), 0u32..200_000],
            ) {
                let original: FieldTable = entries
                    .into_iter()
                    .map(|(k, v)| (ShortString::from(k.as_str()), v))
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into();
                let budget = header_budget(frame_max);
                let headers = dead_letter_headers(&original, &reason, budget);
                prop_assert!(table_len(&headers) <= budget, "{} > {budget}", table_len(&headers));
                let error = contract::header_str(&headers, contract::H_ERROR).unwrap_or_default();
                prop_assert!(error.len() <= contract::MAX_REASON_BYTES);
                if table_len(&original) + 2048 <= budget / 2 {
                    prop_assert!(!headers.contains_key(contract::H_SHORTENED));
                }
            }
        }
    }
}
