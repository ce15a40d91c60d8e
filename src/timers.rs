//! The timer sweeper: delivers [`Event::Timer`](crate::engine::Event::Timer) to sagas whose reply
//! deadline or retry back-off has passed.
//!
//! Timers are the `wake_at` column of the saga row, not in-memory state, so they survive
//! restarts and are shared by replicas (`FOR UPDATE SKIP LOCKED` hands each due saga to one).
//! "Due" is by the driver's clock, so a test drives deadlines with [`try_sweep`] and a manual
//! clock instead of waiting for them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::driver::{Driver, DriverError};

const BATCH: i64 = 256;

/// One pass: fires every saga due now, batch after batch, and returns how many fired.
pub async fn try_sweep(driver: &Driver) -> Result<usize, DriverError> {
    let mut fired = 0;
    loop {
        let n = driver.fire_due_timers(BATCH).await?;
        fired += n;
        if (n as i64) < BATCH {
            return Ok(fired);
        }
    }
}

/// Sweeps every `poll` until `shutdown`; a failed pass is retried on the next tick.
pub async fn run_sweeper(driver: Driver, poll: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = try_sweep(&driver).await {
            warn!(error = %e, "timer sweep failed; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}
