//! Observing completion: a private queue bound to `saga.events`.

use super::*;

/// Matches lifecycle events to the sagas waiting for them. An event may arrive before the
/// `StartSaga` response that names its saga; it is kept until asked for.
#[derive(Default)]
pub(crate) struct Tracker {
    pub(crate) slots: Mutex<HashMap<Uuid, Slot>>,
}

pub(crate) type Ended = (Instant, String);

pub(crate) enum Slot {
    Waiting(oneshot::Sender<Ended>),
    Arrived(Ended),
}

impl Tracker {
    pub(crate) fn arrived(&self, saga_id: Uuid, ended: Ended) {
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(&saga_id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(ended);
            }
            // A duplicate (delivery is at least once): keep the first.
            Some(arrived @ Slot::Arrived(_)) => {
                slots.insert(saga_id, arrived);
            }
            None => {
                slots.insert(saga_id, Slot::Arrived(ended));
            }
        }
    }

    pub(crate) fn wait_for(&self, saga_id: Uuid) -> oneshot::Receiver<Ended> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(&saga_id) {
            Some(Slot::Arrived(ended)) => {
                let _ = tx.send(ended);
            }
            _ => {
                slots.insert(saga_id, Slot::Waiting(tx));
            }
        }
        rx
    }
}

/// Binds an exclusive, non-durable queue to the terminal lifecycle events and timestamps each
/// on arrival. Non-durable and auto-ack: the observer adds no disk write to the broker.
pub(crate) async fn observe_events(
    amqp_url: &str,
    tracker: Arc<Tracker>,
) -> anyhow::Result<(Connection, tokio::task::JoinHandle<()>)> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("observer: cannot connect to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for event in ["completed", "compensated", "needs_operator"] {
        channel
            .queue_bind(
                queue.name().clone(),
                contract::EVENTS_EXCHANGE.into(),
                // Every definition's: the scenario's vhost holds only the bench's sagas.
                format!("*.{event}").into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding to saga.events (is sagad up?)")?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "saga-bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let handle = tokio::spawn(async move {
        let _channel = channel; // keep it open
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            match serde_json::from_slice::<LifecycleEvent>(&delivery.data) {
                Ok(event) => tracker.arrived(event.saga_id, (at, event.event)),
                Err(e) => eprintln!("warning: unreadable lifecycle event: {e}"),
            }
        }
    });
    Ok((conn, handle))
}
