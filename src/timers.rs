//! The timer sweeper: delivers [`Event::Timer`](crate::engine::Event::Timer) to sagas whose reply
//! deadline or retry back-off has passed.
//!
//! Timers are the `wake_at` column of the saga row, not in-memory state, so they survive
//! restarts and are shared by replicas (`FOR UPDATE SKIP LOCKED` hands each due saga to one).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::definition::Registry;
use crate::store::Store;

const BATCH: i64 = 256;

pub async fn run_sweeper(
    store: Store,
    registry: Arc<Registry>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    loop {
        // Drain everything due before sleeping again.
        loop {
            match store
                .fire_due_timers(&registry, OffsetDateTime::now_utc(), BATCH)
                .await
            {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %e, "timer sweep failed; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}
