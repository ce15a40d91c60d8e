//! New sagas are written in groups: the `StartSaga` calls waiting at one moment are inserted by
//! one statement and one durable commit (group commit), instead of a statement and an fsync
//! each. A call waits at most for the group being written when it arrives; alone, it is
//! written at once.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Batch, Driver, Result};
use crate::definition::Definition;
use crate::engine::{Event, Status};
use crate::store::{SagaRecord, Writes};

/// Most sagas written by one statement.
const MAX_GROUP: usize = 64;
/// Groups written at once, so that one slow commit does not hold back the calls behind it.
const CONCURRENT_GROUPS: usize = 2;

pub(super) struct NewSaga {
    pub(super) def: Arc<Definition>,
    /// In its initial state; its times are set to the group's.
    pub(super) record: SagaRecord,
    /// Whether it was inserted (not: its idempotency key was taken), and its status.
    pub(super) done: oneshot::Sender<Result<(bool, Status)>>,
}

/// The queue of new sagas: the senders are the API's, the receiver is shared by the runs of the
/// writer task, so a writer that died (a panic while writing a group fails only that group's
/// calls) is started again by its supervisor on the same queue.
pub(super) fn queue() -> (mpsc::Sender<NewSaga>, Queue) {
    let (tx, rx) = mpsc::channel(MAX_GROUP * CONCURRENT_GROUPS);
    (tx, Arc::new(Mutex::new(rx)))
}

pub(super) type Queue = Arc<Mutex<mpsc::Receiver<NewSaga>>>;

/// Writes new sagas until `shutdown`, then those already queued, then ends.
pub(super) async fn run_writer(driver: Driver, queue: Queue, shutdown: CancellationToken) {
    let mut rx = queue.lock().await;
    let mut stopping = std::pin::pin!(shutdown.cancelled_owned());
    let mut closed = false;
    futures::stream::poll_fn(|cx| {
        // A closed queue still yields what it holds, then ends.
        if !closed && stopping.as_mut().poll(cx).is_ready() {
            rx.close();
            closed = true;
        }
        rx.poll_recv(cx)
    })
    .ready_chunks(MAX_GROUP)
    .for_each_concurrent(CONCURRENT_GROUPS, |group| write_group(&driver, group))
    .await
}

/// One statement for the whole group; if it fails, each saga is written alone, so that one
/// the database refuses (say, an input with a `\u0000` that `jsonb` rejects) fails only its
/// own call.
async fn write_group(driver: &Driver, group: Vec<NewSaga>) {
    if group.len() > 1 {
        match insert(driver, &group).await {
            Ok(results) => {
                for (new, result) in group.into_iter().zip(results) {
                    // A caller that went away finds its saga by its idempotency key.
                    let _ = new.done.send(Ok(result));
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, count = group.len(), "new sagas not written together; writing them one by one");
            }
        }
    }
    for new in group {
        let result = insert(driver, std::slice::from_ref(&new))
            .await
            .map(|mut results| results.remove(0));
        let _ = new.done.send(result);
    }
}

/// Runs each saga's first transition (it needs nothing from the database) and inserts the rows
/// in their state after it, with everything the transitions wrote.
async fn insert(driver: &Driver, group: &[NewSaga]) -> Result<Vec<(bool, Status)>> {
    let now = driver.clock.now();
    let mut batch = Batch {
        driver,
        now,
        writes: Writes::default(),
    };
    let mut records = Vec::with_capacity(group.len());
    let mut statuses = Vec::with_capacity(group.len());
    for new in group {
        let mut record = new.record.clone();
        record.created_at = now;
        record.updated_at = now;
        let (_, status) = batch.apply(&new.def, &mut record, Event::Start)?;
        statuses.push(status);
        records.push(record);
    }
    let (inserted, flushed) = driver.store.insert_new(batch.writes, &records, now).await?;
    driver.signals.committed(flushed);
    Ok(records
        .iter()
        .zip(statuses)
        .map(|(r, status)| (inserted.contains(&r.id), status))
        .collect())
}
