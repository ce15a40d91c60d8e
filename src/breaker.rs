//! Dispatch control per participant: operator pauses and the circuit breaker. The decisions are
//! here; the store runs the statements they lead to, and the relay and the driver call them.
//!
//! Both holds work the same way: the relay leaves a held participant's commands in the outbox
//! (a paused participant, or a circuit that is not closed), and the timer sweeper does not run
//! the deadline of a command still in the outbox, so a held participant's sagas wait instead of
//! failing in a storm. When the commands go out, their deadlines start again from the moment of
//! publishing ([`restarts_deadline`]).
//!
//! The circuit: consecutive timeouts and transient failures ([`health`]) open it
//! ([`after_failure`]); once the cool-down has passed the relay sends one held command as a
//! probe ([`after_probe_sent`]: half-open); a healthy answer closes it again, and a failure
//! re-opens it. Closing is written by the transition statement itself (the hot path takes no
//! participant lock when there is nothing to reset).

use std::time::Duration;

use time::OffsetDateTime;

use crate::engine::{AttemptEnd, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn parse(s: &str) -> Option<Circuit> {
        match s {
            "closed" => Some(Circuit::Closed),
            "open" => Some(Circuit::Open),
            "half_open" => Some(Circuit::HalfOpen),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }

    /// The `saga_circuit_state` gauge's value.
    pub fn gauge(self) -> i64 {
        match self {
            Circuit::Closed => 0,
            Circuit::Open => 1,
            Circuit::HalfOpen => 2,
        }
    }
}

/// When a participant's circuit opens, and how long it stays open before a probe.
#[derive(Debug, Clone, Copy)]
pub struct CircuitSettings {
    /// Consecutive timeouts or transient failures that open the circuit.
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
        }
    }
}

/// What an attempt's end says about its participant's health: `Some(false)` counts towards
/// opening the circuit, `Some(true)` closes it, `None` says nothing. Business refusals are
/// healthy answers; only silence and transient errors count against a participant.
pub fn health(end: &AttemptEnd) -> Option<bool> {
    match end {
        AttemptEnd::Replied(Outcome::Success { .. }) => Some(true),
        AttemptEnd::Replied(Outcome::Failure { retryable, .. }) => Some(!retryable),
        AttemptEnd::TimedOut => Some(false),
        AttemptEnd::Superseded => None,
    }
}

/// A participant's circuit after one more failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterFailure {
    pub circuit: Circuit,
    pub consecutive_failures: u32,
    /// Whether the next probe moves to a cool-down from now (else it stays as it was).
    pub probe_after_cooldown: bool,
    /// Whether the circuit changed state now (closed to open).
    pub changed: bool,
}

impl AfterFailure {
    /// Whether this failure leaves the circuit open past the threshold (worth a warning).
    pub fn holds_commands(&self, settings: CircuitSettings) -> bool {
        self.circuit == Circuit::Open && self.consecutive_failures >= settings.failure_threshold
    }
}

/// A failed probe re-opens the circuit at once; otherwise it opens at the threshold. Every
/// failure that (re-)opens it, or finds it open, pushes the next probe a cool-down away.
pub fn after_failure(
    circuit: Circuit,
    consecutive_failures: u32,
    settings: CircuitSettings,
) -> AfterFailure {
    let failures = consecutive_failures.saturating_add(1);
    let at_threshold = failures >= settings.failure_threshold;
    let opens = circuit == Circuit::HalfOpen || at_threshold;
    AfterFailure {
        circuit: if opens { Circuit::Open } else { circuit },
        consecutive_failures: failures,
        probe_after_cooldown: opens,
        changed: circuit == Circuit::Closed && at_threshold,
    }
}

/// The probe went out: the circuit is half-open, the rest held until the probe's outcome is
/// known, or (if the probe is lost) until the cool-down passes again.
pub const AFTER_PROBE_SENT: Circuit = Circuit::HalfOpen;

/// How long a command may sit in the outbox before its deadline is restarted on publishing.
const WAITED: time::Duration = time::Duration::seconds(1);

/// Whether a command published at `now` waited long enough (held participant, broker outage,
/// backlog) to get its whole timeout from now; fresh ones keep the deadline set when they were
/// created.
pub fn restarts_deadline(created_at: OffsetDateTime, now: OffsetDateTime) -> bool {
    now - created_at > WAITED
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: CircuitSettings = CircuitSettings {
        failure_threshold: 3,
        cooldown: Duration::from_secs(5),
    };

    #[test]
    fn the_circuit_opens_at_the_threshold_and_a_failed_probe_reopens_it() {
        let first = after_failure(Circuit::Closed, 0, THREE);
        assert_eq!(first.circuit, Circuit::Closed);
        assert!(!first.probe_after_cooldown && !first.changed);
        let third = after_failure(Circuit::Closed, 2, THREE);
        assert_eq!(third.circuit, Circuit::Open);
        assert!(third.probe_after_cooldown && third.changed && third.holds_commands(THREE));
        // Already open (a late timeout): the probe moves away, the state does not change.
        let late = after_failure(Circuit::Open, 3, THREE);
        assert_eq!(late.circuit, Circuit::Open);
        assert!(late.probe_after_cooldown && !late.changed);
        // A failed probe re-opens whatever the count.
        let probe = after_failure(Circuit::HalfOpen, 0, THREE);
        assert_eq!(probe.circuit, Circuit::Open);
        assert!(probe.probe_after_cooldown && !probe.changed && !probe.holds_commands(THREE));
    }

    #[test]
    fn only_silence_and_transient_failures_count_against_a_participant() {
        let refused = AttemptEnd::Replied(Outcome::Failure {
            reason: "no stock".into(),
            retryable: false,
        });
        let transient = AttemptEnd::Replied(Outcome::Failure {
            reason: "busy".into(),
            retryable: true,
        });
        assert_eq!(health(&refused), Some(true));
        assert_eq!(health(&transient), Some(false));
        assert_eq!(health(&AttemptEnd::TimedOut), Some(false));
        assert_eq!(health(&AttemptEnd::Superseded), None);
    }
}
