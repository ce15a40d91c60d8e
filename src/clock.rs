//! The one place sagad reads the time. The driver, the timer sweeper, the relay and the API take
//! a [`Clock`], so a test can hold time still and move it past a deadline or a back-off in one
//! step instead of sleeping through it.

use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The machine's clock.
    #[default]
    System,
    /// Time that moves only when a test says so; clones share it.
    Manual(Arc<Mutex<OffsetDateTime>>),
}

impl Clock {
    /// A clock standing at `at` until advanced.
    pub fn manual(at: OffsetDateTime) -> Clock {
        Clock::Manual(Arc::new(Mutex::new(at)))
    }

    /// A manual clock standing at the machine's current time, so rows it stamps sort with
    /// the ones PostgreSQL's own `now()` writes.
    pub fn manual_now() -> Clock {
        Clock::manual(OffsetDateTime::now_utc())
    }

    pub fn now(&self) -> OffsetDateTime {
        match self {
            Clock::System => OffsetDateTime::now_utc(),
            // A poisoned lock still holds a valid time: a panicking test does not own it.
            Clock::Manual(at) => *at.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Moves a manual clock forward; the system clock moves by itself, so this does nothing.
    pub fn advance(&self, by: std::time::Duration) {
        if let Clock::Manual(at) = self {
            let mut at = at.lock().unwrap_or_else(|p| p.into_inner());
            *at = at.saturating_add(time::Duration::try_from(by).unwrap_or(time::Duration::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let start = OffsetDateTime::UNIX_EPOCH;
        let clock = Clock::manual(start);
        let shared = clock.clone();
        assert_eq!(clock.now(), start);
        shared.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), start + time::Duration::seconds(90));
    }
}
