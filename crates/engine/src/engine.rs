//! The saga state machine. Pure: no I/O, no clock, no randomness of its own.
//!
//! [`apply`] takes a saga's control state, its definition and one [`Event`], and returns the next
//! state plus the [`Effect`]s the driver must persist in the same transaction (commands for the
//! outbox, outputs, history entries). Time, the id of a command it may send and the jitter of a
//! back-off come in through [`Ctx`] so every transition is reproducible in tests.
//!
//! A saga runs one step at a time. Actions run forwards; a failure at or before the pivot turns
//! the saga around and compensations run backwards over the completed steps; after the pivot
//! actions are retried until they succeed.

use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::definition::Definition;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// A compensation exhausted its attempts: nothing more happens until an operator acts.
    NeedsOperator,
    /// An operator closed the saga after fixing it by hand.
    Resolved,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::Resolved
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::NeedsOperator => "needs_operator",
            Status::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "running" => Status::Running,
            "compensating" => Status::Compensating,
            "completed" => Status::Completed,
            "compensated" => Status::Compensated,
            "needs_operator" => Status::NeedsOperator,
            "resolved" => Status::Resolved,
            _ => return None,
        })
    }
}

/// Whether a command performs a step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Action,
    Compensation,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Action => "action",
            Kind::Compensation => "compensation",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "action" => Some(Kind::Action),
            "compensation" => Some(Kind::Compensation),
            _ => None,
        }
    }
}

/// What the saga is waiting for. It is never waiting for two things: steps run one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Not started yet, or finished, or held for an operator.
    Nothing,
    /// The reply to `command_id`, until `deadline`.
    Reply {
        command_id: Uuid,
        deadline: OffsetDateTime,
    },
    /// The back-off before the next attempt ends at `at`.
    Retry { at: OffsetDateTime },
}

/// The control state of one saga: everything [`apply`] needs and nothing more.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    pub status: Status,
    /// Index of the step being executed (`kind == Action`) or compensated.
    pub step: usize,
    pub kind: Kind,
    /// 1-based attempt of the current command; 0 before the first dispatch.
    pub attempt: u32,
    pub waiting: Waiting,
    /// Why the saga turned around or stopped.
    pub error: Option<String>,
}

impl SagaState {
    pub fn new() -> Self {
        SagaState {
            status: Status::Running,
            step: 0,
            kind: Kind::Action,
            attempt: 0,
            waiting: Waiting::Nothing,
            error: None,
        }
    }

    /// When the timer sweeper must deliver [`Event::Timer`]; `None` when no timer is due.
    pub fn wake_at(&self) -> Option<OffsetDateTime> {
        match self.waiting {
            Waiting::Nothing => None,
            Waiting::Reply { deadline, .. } => Some(deadline),
            Waiting::Retry { at } => Some(at),
        }
    }
}

impl Default for SagaState {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success {
        output: Value,
    },
    /// `retryable`: the participant believes the same command may succeed later (a transient
    /// error). A non-retryable failure of a step up to the pivot compensates at once.
    Failure {
        reason: String,
        retryable: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start,
    Reply {
        command_id: Uuid,
        outcome: Outcome,
        /// The step and kind of the command answered, when the driver knows them: lets a late
        /// success of the step still in progress count.
        answers: Option<(usize, Kind)>,
    },
    /// The saga's wake-up time has passed.
    Timer,
}

/// Inputs from the outside world, so that [`apply`] is deterministic.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: OffsetDateTime,
    /// The id to give a command if this transition sends one (a new attempt gets a new id).
    pub next_command_id: Uuid,
    /// In [0, 1): spreads retries of many sagas apart.
    pub jitter: f64,
}

/// A command for a participant, to be written to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub command_id: Uuid,
    pub step: usize,
    pub kind: Kind,
    pub attempt: u32,
    pub deadline: OffsetDateTime,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    Replied(Outcome),
    /// No reply by its deadline.
    TimedOut,
    /// An operator moved the saga on while it was in flight.
    Superseded,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Record an attempt and put its command in the outbox.
    Send(Command),
    /// The attempt `command_id` ended.
    AttemptEnded { command_id: Uuid, end: AttemptEnd },
    /// Merge a step's output into the saga's outputs, passed to every later command.
    SaveOutput { step: usize, output: Value },
    /// Append to the saga's history (its timeline).
    History {
        kind: HistoryKind,
        step: Option<usize>,
        command_id: Option<Uuid>,
        detail: Value,
    },
    /// The saga entered a status that others may want to know about.
    Lifecycle(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryKind {
    SagaStarted,
    CommandSent,
    StepSucceeded,
    StepFailed,
    StepTimedOut,
    RetryScheduled,
    CompensationStarted,
    StepCompensated,
    CompensationFailed,
    LateReply,
    SagaCompleted,
    SagaCompensated,
    NeedsOperator,
    OperatorAction,
    SagaResolved,
    /// A graph step whose `when` was false: no command, never compensated.
    StepSkipped,
}

impl HistoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryKind::SagaStarted => "saga_started",
            HistoryKind::CommandSent => "command_sent",
            HistoryKind::StepSucceeded => "step_succeeded",
            HistoryKind::StepFailed => "step_failed",
            HistoryKind::StepTimedOut => "step_timed_out",
            HistoryKind::RetryScheduled => "retry_scheduled",
            HistoryKind::CompensationStarted => "compensation_started",
            HistoryKind::StepCompensated => "step_compensated",
            HistoryKind::CompensationFailed => "compensation_failed",
            HistoryKind::LateReply => "late_reply",
            HistoryKind::SagaCompleted => "saga_completed",
            HistoryKind::SagaCompensated => "saga_compensated",
            HistoryKind::NeedsOperator => "needs_operator",
            HistoryKind::OperatorAction => "operator_action",
            HistoryKind::SagaResolved => "saga_resolved",
            HistoryKind::StepSkipped => "step_skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: SagaState,
    pub effects: Vec<Effect>,
}

impl Transition {
    /// Nothing changed: the event did not apply to this saga's current state.
    pub fn is_noop(&self) -> bool {
        self.effects.is_empty()
    }
}

/// Applies one event. Events that do not fit the state (a duplicate or late reply, a timer that
/// is not due, anything after the saga ended) leave the state unchanged; a late reply to an
/// attempt that already ended is only recorded in the history.
pub fn apply(def: &Definition, state: &SagaState, event: Event, ctx: Ctx) -> Transition {
    if !fits(def, state) {
        return Transition {
            state: state.clone(),
            effects: Vec::new(),
        };
    }
    let mut m = Machine {
        def,
        state: state.clone(),
        effects: Vec::new(),
        ctx,
    };
    match event {
        Event::Start => m.start(),
        Event::Reply {
            command_id,
            outcome,
            answers,
        } => m.reply(command_id, outcome, answers),
        Event::Timer => m.timer(),
    }
    Transition {
        state: m.state,
        effects: m.effects,
    }
}

/// A repair an operator asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Repair {
    /// Send the current step's command again as a new attempt, now.
    RetryNow,
    /// Consider the current step done by hand: an action succeeded with `output`, a
    /// compensation undid its step.
    Skip { output: Value },
    /// Abort a running saga and compensate what it completed.
    Compensate,
    /// Close a saga that needs an operator.
    Resolve,
}

impl Repair {
    pub fn name(&self) -> &'static str {
        match self {
            Repair::RetryNow => "retry",
            Repair::Skip { .. } => "skip",
            Repair::Compensate => "compensate",
            Repair::Resolve => "resolve",
        }
    }
}

/// Who asked for a repair, and why: both go to the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    pub actor: String,
    pub reason: String,
}

/// A repair that does not fit the saga's state, with the reason shown to the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Applies an operator's repair, or refuses it when it makes no sense in the saga's state.
// Step indices here are `state.step` or the pivot, both checked by `fits` on entry, or walk
// from them within `0..steps.len()`.
#[allow(clippy::indexing_slicing)]
pub fn repair(
    def: &Definition,
    state: &SagaState,
    repair: Repair,
    by: &Operator,
    ctx: Ctx,
) -> Result<Transition, Refused> {
    if !fits(def, state) {
        return Err(Refused(format!(
            "the saga's step {} does not exist in {} version {}",
            state.step, def.name, def.version
        )));
    }
    let mut m = Machine {
        def,
        state: state.clone(),
        effects: Vec::new(),
        ctx,
    };
    let status = state.status;
    if status.is_terminal() {
        return Err(Refused(format!(
            "the saga is {}: nothing to repair",
            status.as_str()
        )));
    }
    if state.attempt == 0 {
        return Err(Refused("the saga has not started yet".into()));
    }
    let step = state.step;
    let mut detail = json!({"action": repair.name(), "actor": by.actor, "reason": by.reason, "kind": state.kind.as_str()});
    match &repair {
        Repair::Skip { output } => {
            if let Value::Object(d) = &mut detail {
                d.insert("output".into(), output.clone());
            }
        }
        Repair::RetryNow | Repair::Compensate | Repair::Resolve => {}
    }
    // Whatever the repair, a command still in flight is abandoned: its reply, if it ever
    // comes, is recorded as late and changes nothing.
    let abandon = |m: &mut Machine| {
        if let Waiting::Reply { command_id, .. } = m.state.waiting {
            m.effects.push(Effect::AttemptEnded {
                command_id,
                end: AttemptEnd::Superseded,
            });
        }
    };
    match repair {
        Repair::RetryNow => {
            if status == Status::NeedsOperator {
                m.state.status = Status::Compensating;
            }
            m.history(HistoryKind::OperatorAction, Some(step), None, detail);
            abandon(&mut m);
            m.send(step, state.kind, state.attempt.saturating_add(1));
        }
        Repair::Skip { output } => {
            m.history(HistoryKind::OperatorAction, Some(step), None, detail);
            abandon(&mut m);
            match state.kind {
                Kind::Action => {
                    m.effects.push(Effect::SaveOutput { step, output });
                    m.advance(step);
                }
                Kind::Compensation => {
                    m.state.status = Status::Compensating;
                    m.compensate_from(step.checked_sub(1));
                }
            }
        }
        Repair::Compensate => {
            if status != Status::Running {
                return Err(Refused(format!(
                    "only a running saga can be compensated; this one is {}",
                    status.as_str()
                )));
            }
            if step > def.pivot {
                return Err(Refused(format!(
                    "the saga is past its pivot ({}): its remaining steps can only go forwards",
                    def.steps[def.pivot].name
                )));
            }
            m.history(HistoryKind::OperatorAction, Some(step), None, detail);
            abandon(&mut m);
            m.state.error = Some(format!("compensated by {}: {}", by.actor, by.reason));
            m.state.status = Status::Compensating;
            m.history(
                HistoryKind::CompensationStarted,
                Some(step),
                None,
                json!({"reason": by.reason}),
            );
            // The current step may have been applied (a command was out, or failed attempts
            // timed out): undo it too; compensations tolerate undoing nothing.
            m.compensate_from(Some(step));
        }
        Repair::Resolve => {
            if status != Status::NeedsOperator {
                return Err(Refused(format!(
                    "only a saga that needs an operator can be resolved; this one is {}",
                    status.as_str()
                )));
            }
            m.history(HistoryKind::OperatorAction, Some(step), None, detail);
            m.state.status = Status::Resolved;
            m.state.waiting = Waiting::Nothing;
            m.history(
                HistoryKind::SagaResolved,
                None,
                None,
                json!({"actor": by.actor}),
            );
            m.effects.push(Effect::Lifecycle(Status::Resolved));
        }
    }
    Ok(Transition {
        state: m.state,
        effects: m.effects,
    })
}

struct Machine<'a> {
    def: &'a Definition,
    state: SagaState,
    effects: Vec<Effect>,
    ctx: Ctx,
}

// Step indices here are `state.step` (checked by `fits` before a machine is built) or walk from
// it within `0..steps.len()`.
#[allow(clippy::indexing_slicing)]
impl Machine<'_> {
    fn start(&mut self) {
        if self.state.status != Status::Running || self.state.attempt != 0 {
            return;
        }
        self.history(
            HistoryKind::SagaStarted,
            None,
            None,
            json!({"definition_version": self.def.version}),
        );
        self.effects.push(Effect::Lifecycle(Status::Running));
        self.send(0, Kind::Action, 1);
    }

    fn reply(&mut self, command_id: Uuid, outcome: Outcome, answers: Option<(usize, Kind)>) {
        let current =
            matches!(self.state.waiting, Waiting::Reply { command_id: c, .. } if c == command_id);
        if !current {
            // The driver only hands us replies to attempts that never got one, so this is an
            // answer that arrived after its attempt timed out (or after the saga ended): keep it
            // for the operator.
            self.effects.push(Effect::AttemptEnded {
                command_id,
                end: AttemptEnd::Replied(outcome.clone()),
            });
            self.history(
                HistoryKind::LateReply,
                None,
                Some(command_id),
                outcome_detail(&outcome),
            );
            // A late *success* of the very step (and kind) the saga is still retrying means that
            // step is done: take it, rather than keep sending attempts that may each time out
            // behind a backlog. The attempt in flight, if any, is abandoned. A late failure
            // changes nothing: a newer attempt may still succeed.
            let same_step = answers == Some((self.state.step, self.state.kind))
                && !self.state.status.is_terminal();
            if let (true, Outcome::Success { output }) = (same_step, outcome) {
                if let Waiting::Reply {
                    command_id: newer, ..
                } = self.state.waiting
                {
                    self.effects.push(Effect::AttemptEnded {
                        command_id: newer,
                        end: AttemptEnd::Superseded,
                    });
                }
                self.succeeded(command_id, output);
            }
            return;
        }
        self.effects.push(Effect::AttemptEnded {
            command_id,
            end: AttemptEnd::Replied(outcome.clone()),
        });
        let step = self.state.step;
        match (self.state.kind, outcome) {
            (_, Outcome::Success { output }) => self.succeeded(command_id, output),
            (Kind::Action, Outcome::Failure { reason, retryable }) => {
                self.history(
                    HistoryKind::StepFailed,
                    Some(step),
                    Some(command_id),
                    json!({"reason": reason, "retryable": retryable}),
                );
                // The participant answered: its local transaction did not happen, so this step
                // has nothing to undo.
                self.action_failed(reason, retryable, false);
            }
            (Kind::Compensation, Outcome::Failure { reason, .. }) => {
                self.history(
                    HistoryKind::CompensationFailed,
                    Some(step),
                    Some(command_id),
                    json!({"reason": reason}),
                );
                self.compensation_failed(reason);
            }
        }
    }

    /// The current step's command (action or compensation) succeeded.
    fn succeeded(&mut self, command_id: Uuid, output: Value) {
        let step = self.state.step;
        match self.state.kind {
            Kind::Action => {
                self.history(
                    HistoryKind::StepSucceeded,
                    Some(step),
                    Some(command_id),
                    json!({"output": output}),
                );
                self.effects.push(Effect::SaveOutput { step, output });
                self.advance(step);
            }
            Kind::Compensation => {
                self.history(
                    HistoryKind::StepCompensated,
                    Some(step),
                    Some(command_id),
                    json!({}),
                );
                // Also ends a wait for an operator: the compensation did happen after all.
                self.state.status = Status::Compensating;
                self.compensate_from(step.checked_sub(1));
            }
        }
    }

    /// Moves on after `step` succeeded.
    fn advance(&mut self, step: usize) {
        if step + 1 < self.def.steps.len() {
            self.send(step + 1, Kind::Action, 1);
        } else {
            self.finish(Status::Completed);
        }
    }

    fn timer(&mut self) {
        let now = self.ctx.now;
        match self.state.waiting {
            Waiting::Reply {
                command_id,
                deadline,
            } if deadline <= now => {
                self.effects.push(Effect::AttemptEnded {
                    command_id,
                    end: AttemptEnd::TimedOut,
                });
                let step = self.state.step;
                let timeout = self.def.steps[step].timeout;
                self.history(
                    HistoryKind::StepTimedOut,
                    Some(step),
                    Some(command_id),
                    json!({"kind": self.state.kind.as_str(), "timeout_ms": millis(timeout)}),
                );
                let reason = format!(
                    "{} of step {} got no reply within {}",
                    self.state.kind.as_str(),
                    self.def.steps[step].name,
                    humantime::format_duration(timeout)
                );
                match self.state.kind {
                    // Unlike a failure, a timeout leaves us not knowing whether the participant
                    // applied the action: if we give up on it, it is compensated too.
                    Kind::Action => self.action_failed(reason, true, true),
                    Kind::Compensation => self.compensation_failed(reason),
                }
            }
            Waiting::Retry { at } if at <= now => {
                let next = self.state.attempt.saturating_add(1);
                self.send(self.state.step, self.state.kind, next);
            }
            _ => {}
        }
    }

    fn action_failed(&mut self, reason: String, retryable: bool, uncertain: bool) {
        let step = self.state.step;
        let policy = &self.def.steps[step].retry;
        if step > self.def.pivot {
            // Past the point of no return: the only way is forwards.
            self.retry_later(&reason);
        } else if retryable && self.state.attempt < policy.max_attempts {
            self.retry_later(&reason);
        } else {
            let from = if uncertain {
                Some(step)
            } else {
                step.checked_sub(1)
            };
            self.state.error = Some(format!(
                "step {} failed: {reason}",
                self.def.steps[step].name
            ));
            self.history(
                HistoryKind::CompensationStarted,
                Some(step),
                None,
                json!({"reason": reason, "attempts": self.state.attempt}),
            );
            self.state.status = Status::Compensating;
            self.compensate_from(from);
        }
    }

    fn compensation_failed(&mut self, reason: String) {
        if self.state.attempt >= self.def.compensation_max_attempts {
            let step = self.state.step;
            self.state.status = Status::NeedsOperator;
            self.state.waiting = Waiting::Nothing;
            self.state.error = Some(format!(
                "compensation of step {} failed {} times, last: {reason}",
                self.def.steps[step].name, self.state.attempt
            ));
            self.history(
                HistoryKind::NeedsOperator,
                Some(step),
                None,
                json!({"reason": reason}),
            );
            self.effects.push(Effect::Lifecycle(Status::NeedsOperator));
        } else {
            self.retry_later(&reason);
        }
    }

    fn retry_later(&mut self, reason: &str) {
        let step = &self.def.steps[self.state.step];
        let next_attempt = self.state.attempt.saturating_add(1);
        let delay = step.retry.backoff(next_attempt, self.ctx.jitter);
        let at = later(self.ctx.now, delay);
        self.state.waiting = Waiting::Retry { at };
        self.history(
            HistoryKind::RetryScheduled,
            Some(self.state.step),
            None,
            json!({
                "kind": self.state.kind.as_str(),
                "next_attempt": next_attempt,
                "delay_ms": millis(delay),
                "reason": reason,
            }),
        );
    }

    /// Compensates the highest step at or below `from` that has a compensation, or ends the saga
    /// as compensated when none is left.
    fn compensate_from(&mut self, from: Option<usize>) {
        let next = from.and_then(|from| {
            (0..=from)
                .rev()
                .find(|&i| self.def.steps[i].compensation.is_some())
        });
        match next {
            Some(i) => self.send(i, Kind::Compensation, 1),
            None => self.finish(Status::Compensated),
        }
    }

    fn send(&mut self, step: usize, kind: Kind, attempt: u32) {
        let command_id = self.ctx.next_command_id;
        let deadline = later(self.ctx.now, self.def.steps[step].timeout);
        self.state.step = step;
        self.state.kind = kind;
        self.state.attempt = attempt;
        self.state.waiting = Waiting::Reply {
            command_id,
            deadline,
        };
        self.effects.push(Effect::Send(Command {
            command_id,
            step,
            kind,
            attempt,
            deadline,
        }));
        self.history(
            HistoryKind::CommandSent,
            Some(step),
            Some(command_id),
            json!({"kind": kind.as_str(), "attempt": attempt}),
        );
    }

    fn finish(&mut self, status: Status) {
        self.state.status = status;
        self.state.waiting = Waiting::Nothing;
        let kind = match status {
            Status::Completed => HistoryKind::SagaCompleted,
            _ => HistoryKind::SagaCompensated,
        };
        self.state.error = self
            .state
            .error
            .take()
            .filter(|_| status != Status::Completed);
        self.history(kind, None, None, json!({}));
        self.effects.push(Effect::Lifecycle(status));
    }

    fn history(
        &mut self,
        kind: HistoryKind,
        step: Option<usize>,
        command_id: Option<Uuid>,
        detail: Value,
    ) {
        self.effects.push(Effect::History {
            kind,
            step,
            command_id,
            detail,
        });
    }
}

/// The latest time a timer is ever set to. Definitions stored by older, laxer loaders (or built
/// in code) may carry durations of thousands of years; such a timer simply never fires instead
/// of overflowing the clock arithmetic, and the year stays within what PostgreSQL stores.
pub const NEVER: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59 UTC);

/// `now + delay`, saturating at [`NEVER`].
pub fn later(now: OffsetDateTime, delay: std::time::Duration) -> OffsetDateTime {
    time::Duration::try_from(delay)
        .ok()
        .and_then(|d| now.checked_add(d))
        .map_or(NEVER, |t| t.min(NEVER))
}

/// Whole milliseconds for the history, saturating where `as` would wrap.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the state can be interpreted against this definition at all. A definition read back
/// from the database is not re-validated, and a state may point past its steps if the two were
/// ever out of step: then nothing is applied rather than indexing out of bounds.
fn fits(def: &Definition, state: &SagaState) -> bool {
    !def.steps.is_empty() && def.pivot < def.steps.len() && state.step < def.steps.len()
}

fn outcome_detail(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Success { output } => json!({"outcome": "success", "output": output}),
        Outcome::Failure { reason, retryable } => {
            json!({"outcome": "failure", "reason": reason, "retryable": retryable})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition;
    use std::path::Path;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    fn order_saga() -> Definition {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas/order_fulfillment.toml"),
        )
        .unwrap();
        definition::parse(Path::new("order_fulfillment.toml"), &text).unwrap()
    }

    /// What a scripted participant does with one command.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Ok,
        Fail,
        Transient,
        Silent,
    }

    /// Runs a saga to its end (or `max_events`), answering each command with `script`, and
    /// returns the commands in the order they were sent as "step:kind:attempt".
    struct Run {
        sent: Vec<String>,
        history: Vec<HistoryKind>,
        state: SagaState,
        lifecycle: Vec<Status>,
    }

    fn run(def: &Definition, script: impl Fn(&str, Kind, u32) -> Answer) -> Run {
        let mut state = SagaState::new();
        let mut now = T0;
        let mut ids = 0u128;
        let mut out = Run {
            sent: vec![],
            history: vec![],
            state: state.clone(),
            lifecycle: vec![],
        };
        let mut event = Event::Start;
        for _ in 0..500 {
            ids += 1;
            let ctx = Ctx {
                now,
                next_command_id: Uuid::from_u128(ids),
                jitter: 0.5,
            };
            let t = apply(def, &state, event, ctx);
            for e in &t.effects {
                match e {
                    Effect::Send(c) => out.sent.push(format!(
                        "{}:{}:{}",
                        def.steps[c.step].name,
                        c.kind.as_str(),
                        c.attempt
                    )),
                    Effect::History { kind, .. } => out.history.push(*kind),
                    Effect::Lifecycle(s) => out.lifecycle.push(*s),
                    _ => {}
                }
            }
            state = t.state;
            event = match state.waiting {
                Waiting::Nothing => break,
                Waiting::Retry { at } => {
                    now = at;
                    Event::Timer
                }
                Waiting::Reply {
                    command_id,
                    deadline,
                } => match script(&def.steps[state.step].name, state.kind, state.attempt) {
                    Answer::Ok => Event::Reply {
                        command_id,
                        outcome: Outcome::Success {
                            output: json!({"by": def.steps[state.step].name}),
                        },
                        answers: None,
                    },
                    Answer::Fail => Event::Reply {
                        command_id,
                        outcome: Outcome::Failure {
                            reason: "no".into(),
                            retryable: false,
                        },
                        answers: None,
                    },
                    Answer::Transient => Event::Reply {
                        command_id,
                        outcome: Outcome::Failure {
                            reason: "busy".into(),
                            retryable: true,
                        },
                        answers: None,
                    },
                    Answer::Silent => {
                        now = deadline;
                        Event::Timer
                    }
                },
            };
        }
        out.state = state;
        out
    }

    #[test]
    fn all_steps_succeed_in_order() {
        let r = run(&order_saga(), |_, _, _| Answer::Ok);
        assert_eq!(
            r.sent,
            [
                "create_order:action:1",
                "authorize_payment:action:1",
                "schedule_delivery:action:1",
                "approve_order:action:1"
            ]
        );
        assert_eq!(r.state.status, Status::Completed);
        assert_eq!(r.lifecycle, [Status::Running, Status::Completed]);
        assert_eq!(r.history.first(), Some(&HistoryKind::SagaStarted));
        assert_eq!(r.history.last(), Some(&HistoryKind::SagaCompleted));
    }

    #[test]
    fn a_definitive_failure_at_each_position_compensates_the_completed_steps_in_reverse() {
        let cases: &[(&str, &[&str], Status)] = &[
            ("create_order", &[], Status::Compensated),
            (
                "authorize_payment",
                &["create_order:compensation:1"],
                Status::Compensated,
            ),
            (
                "schedule_delivery",
                &[
                    "authorize_payment:compensation:1",
                    "create_order:compensation:1",
                ],
                Status::Compensated,
            ),
        ];
        let def = order_saga();
        for (failing, compensations, status) in cases {
            let r = run(&def, |step, kind, _| match (step, kind) {
                (s, Kind::Action) if s == *failing => Answer::Fail,
                _ => Answer::Ok,
            });
            let undo: Vec<_> = r
                .sent
                .iter()
                .filter(|s| s.contains(":compensation:"))
                .cloned()
                .collect();
            assert_eq!(undo, *compensations, "failing {failing}");
            assert_eq!(r.state.status, *status, "failing {failing}");
            // A definitive failure is not retried.
            assert_eq!(
                r.sent.iter().filter(|s| s.starts_with(failing)).count(),
                1,
                "{:?}",
                r.sent
            );
            assert!(r.state.error.as_deref().unwrap().contains(failing));
            assert_eq!(r.lifecycle.last(), Some(&Status::Compensated));
        }
    }

    #[test]
    fn transient_failures_are_retried_up_to_max_attempts_then_compensate() {
        let def = order_saga();
        let r = run(&def, |step, kind, _| match (step, kind) {
            ("authorize_payment", Kind::Action) => Answer::Transient,
            _ => Answer::Ok,
        });
        assert_eq!(
            r.sent,
            [
                "create_order:action:1",
                "authorize_payment:action:1",
                "authorize_payment:action:2",
                "authorize_payment:action:3",
                "create_order:compensation:1"
            ]
        );
        assert_eq!(r.state.status, Status::Compensated);

        // Succeeding on the last allowed attempt carries on.
        let r = run(&def, |step, kind, attempt| match (step, kind) {
            ("authorize_payment", Kind::Action) if attempt < 3 => Answer::Transient,
            _ => Answer::Ok,
        });
        assert_eq!(r.state.status, Status::Completed);
    }

    #[test]
    fn a_step_that_times_out_every_attempt_is_itself_compensated() {
        let def = order_saga();
        let r = run(&def, |step, kind, _| match (step, kind) {
            ("schedule_delivery", Kind::Action) => Answer::Silent,
            _ => Answer::Ok,
        });
        let undo: Vec<_> = r
            .sent
            .iter()
            .filter(|s| s.contains(":compensation:"))
            .cloned()
            .collect();
        // We never learnt whether delivery was scheduled, so it is cancelled too.
        assert_eq!(
            undo,
            [
                "schedule_delivery:compensation:1",
                "authorize_payment:compensation:1",
                "create_order:compensation:1"
            ]
        );
        assert_eq!(
            r.history
                .iter()
                .filter(|h| **h == HistoryKind::StepTimedOut)
                .count(),
            3
        );
        assert_eq!(r.state.status, Status::Compensated);
    }

    #[test]
    fn a_failure_after_the_pivot_is_retried_and_never_compensated() {
        let def = order_saga();
        let r = run(&def, |step, kind, attempt| match (step, kind) {
            // Even a "definitive" failure: after the pivot the saga can only go forwards.
            ("approve_order", Kind::Action) if attempt <= 6 => Answer::Fail,
            _ => Answer::Ok,
        });
        assert_eq!(r.state.status, Status::Completed);
        assert!(
            !r.sent.iter().any(|s| s.contains("compensation")),
            "{:?}",
            r.sent
        );
        assert_eq!(r.sent.last().unwrap(), "approve_order:action:7");
    }

    #[test]
    fn a_failing_compensation_is_retried_then_waits_for_an_operator() {
        let def = order_saga();
        let r = run(&def, |step, kind, attempt| match (step, kind) {
            ("schedule_delivery", Kind::Action) => Answer::Fail,
            ("authorize_payment", Kind::Compensation) if attempt < 4 => Answer::Transient,
            _ => Answer::Ok,
        });
        assert_eq!(r.state.status, Status::Compensated);
        let refunds = r
            .sent
            .iter()
            .filter(|s| s.starts_with("authorize_payment:compensation"))
            .count();
        assert_eq!(refunds, 4);
        assert_eq!(r.sent.last().unwrap(), "create_order:compensation:1");

        let r = run(&def, |step, kind, _| match (step, kind) {
            ("schedule_delivery", Kind::Action) => Answer::Fail,
            ("authorize_payment", Kind::Compensation) => Answer::Fail,
            _ => Answer::Ok,
        });
        assert_eq!(r.state.status, Status::NeedsOperator);
        assert_eq!(r.state.waiting, Waiting::Nothing);
        let refunds = r
            .sent
            .iter()
            .filter(|s| s.starts_with("authorize_payment:compensation"))
            .count();
        assert_eq!(refunds as u32, def.compensation_max_attempts);
        // The order is not cancelled while the payment is not refunded.
        assert!(
            !r.sent
                .iter()
                .any(|s| s.starts_with("create_order:compensation"))
        );
        assert_eq!(r.lifecycle.last(), Some(&Status::NeedsOperator));
    }

    #[test]
    fn a_silent_compensation_is_retried_like_a_failed_one() {
        let def = order_saga();
        let r = run(&def, |step, kind, attempt| match (step, kind) {
            ("authorize_payment", Kind::Action) => Answer::Fail,
            ("create_order", Kind::Compensation) if attempt == 1 => Answer::Silent,
            _ => Answer::Ok,
        });
        assert_eq!(
            r.sent[2..],
            ["create_order:compensation:1", "create_order:compensation:2"]
        );
        assert_eq!(r.state.status, Status::Compensated);
    }

    fn started(def: &Definition) -> (SagaState, Uuid) {
        let t = apply(
            def,
            &SagaState::new(),
            Event::Start,
            Ctx {
                now: T0,
                next_command_id: Uuid::from_u128(1),
                jitter: 0.0,
            },
        );
        (t.state, Uuid::from_u128(1))
    }

    fn ok(command_id: Uuid) -> Event {
        Event::Reply {
            command_id,
            outcome: Outcome::Success { output: json!({}) },
            answers: None,
        }
    }

    #[test]
    fn events_that_do_not_fit_change_nothing() {
        let def = order_saga();
        let ctx = Ctx {
            now: T0,
            next_command_id: Uuid::from_u128(99),
            jitter: 0.0,
        };
        let (running, first) = started(&def);

        // A second start, an early timer, a reply to a command never sent.
        for event in [Event::Start, Event::Timer] {
            let t = apply(&def, &running, event, ctx);
            assert!(t.is_noop());
            assert_eq!(t.state, running);
        }
        let t = apply(&def, &running, ok(Uuid::from_u128(42)), ctx);
        assert_eq!(t.state, running, "an unknown reply must not move the saga");

        // A duplicate of a reply that was already applied is not the current command any more.
        let after = apply(&def, &running, ok(first), ctx).state;
        assert_eq!(after.step, 1);
        let t = apply(&def, &after, ok(first), ctx);
        assert_eq!(t.state, after);
        assert!(
            !t.effects
                .iter()
                .any(|e| matches!(e, Effect::Send(_) | Effect::SaveOutput { .. }))
        );

        // Finished sagas ignore everything but replies, which are only recorded as late, even
        // a success of the step they stopped at.
        for status in [Status::Completed, Status::Compensated, Status::Resolved] {
            let done = SagaState {
                status,
                waiting: Waiting::Nothing,
                ..after.clone()
            };
            for event in [Event::Start, Event::Timer] {
                let t = apply(&def, &done, event, ctx);
                assert!(t.is_noop(), "{status:?}");
                assert_eq!(t.state, done);
            }
            for answers in [None, Some((done.step, done.kind))] {
                let t = apply(
                    &def,
                    &done,
                    Event::Reply {
                        command_id: first,
                        outcome: Outcome::Success { output: json!(1) },
                        answers,
                    },
                    ctx,
                );
                assert_eq!(t.state, done, "{status:?}");
                assert!(t.effects.iter().all(|e| matches!(
                    e,
                    Effect::AttemptEnded { .. }
                        | Effect::History {
                            kind: HistoryKind::LateReply,
                            ..
                        }
                )));
                assert_eq!(t.effects.len(), 2, "{status:?}");
            }
        }
    }

    #[test]
    fn a_late_reply_is_recorded_and_only_a_success_of_the_step_still_in_progress_counts() {
        let def = order_saga();
        let (running, first) = started(&def);
        let deadline = running.wake_at().unwrap();
        let ctx = |now, id| Ctx {
            now,
            next_command_id: Uuid::from_u128(id),
            jitter: 0.0,
        };
        let timed_out = apply(&def, &running, Event::Timer, ctx(deadline, 2)).state;
        assert!(matches!(timed_out.waiting, Waiting::Retry { .. }));
        let late = |outcome, answers| Event::Reply {
            command_id: first,
            outcome,
            answers,
        };
        let is_late = |t: &Transition| {
            t.effects.iter().any(|e| {
                matches!(
                    e,
                    Effect::History {
                        kind: HistoryKind::LateReply,
                        ..
                    }
                )
            })
        };
        let moved = |t: &Transition| {
            t.effects
                .iter()
                .any(|e| matches!(e, Effect::Send(_) | Effect::SaveOutput { .. }))
        };

        // A late failure, or a reply whose step the driver does not know: recorded, nothing moves.
        let failure = Outcome::Failure {
            reason: "late".into(),
            retryable: false,
        };
        for t in [
            apply(
                &def,
                &timed_out,
                late(failure, Some((0, Kind::Action))),
                ctx(deadline, 3),
            ),
            apply(&def, &timed_out, ok(first), ctx(deadline, 3)),
        ] {
            assert_eq!(t.state, timed_out);
            assert!(is_late(&t) && !moved(&t));
        }

        // A late success of the step being retried: the step is done, the retry is not needed.
        let success = Outcome::Success {
            output: json!({"order_ref": "late"}),
        };
        let t = apply(
            &def,
            &timed_out,
            late(success.clone(), Some((0, Kind::Action))),
            ctx(deadline, 4),
        );
        assert!(is_late(&t));
        assert!(t.effects.contains(&Effect::SaveOutput {
            step: 0,
            output: json!({"order_ref": "late"})
        }));
        assert_eq!(
            (t.state.step, t.state.kind, t.state.attempt),
            (1, Kind::Action, 1)
        );

        // ...also while a newer attempt is out: that one is abandoned.
        let retrying = apply(
            &def,
            &timed_out,
            Event::Timer,
            ctx(timed_out.wake_at().unwrap(), 5),
        )
        .state;
        let t = apply(
            &def,
            &retrying,
            late(success.clone(), Some((0, Kind::Action))),
            ctx(deadline, 6),
        );
        assert!(t.effects.contains(&Effect::AttemptEnded {
            command_id: Uuid::from_u128(5),
            end: AttemptEnd::Superseded
        }));
        assert_eq!(t.state.step, 1);

        // A late success of a step the saga has moved past changes nothing.
        let t = apply(
            &def,
            &t.state,
            late(success, Some((0, Kind::Action))),
            ctx(deadline, 7),
        );
        assert!(!moved(&t));
    }

    #[test]
    fn a_new_attempt_gets_a_new_command_id_and_a_fresh_deadline() {
        let def = order_saga();
        let (running, first) = started(&def);
        let deadline = running.wake_at().unwrap();
        assert_eq!(deadline, T0 + def.steps[0].timeout);
        let retry = apply(
            &def,
            &running,
            Event::Timer,
            Ctx {
                now: deadline,
                next_command_id: Uuid::from_u128(5),
                jitter: 0.0,
            },
        )
        .state;
        let Waiting::Retry { at } = retry.waiting else {
            panic!("{retry:?}")
        };
        assert_eq!(at, deadline + def.steps[0].retry.backoff(2, 0.0));
        let t = apply(
            &def,
            &retry,
            Event::Timer,
            Ctx {
                now: at,
                next_command_id: Uuid::from_u128(6),
                jitter: 0.0,
            },
        );
        let Effect::Send(cmd) = &t.effects[0] else {
            panic!("{:?}", t.effects)
        };
        assert_ne!(cmd.command_id, first);
        assert_eq!(
            (cmd.command_id, cmd.attempt, cmd.deadline),
            (Uuid::from_u128(6), 2, at + def.steps[0].timeout)
        );
    }

    fn op() -> Operator {
        Operator {
            actor: "alice".into(),
            reason: "ticket 42".into(),
        }
    }

    fn at(state: &SagaState) -> Ctx {
        Ctx {
            now: state.wake_at().unwrap_or(T0),
            next_command_id: Uuid::from_u128(777),
            jitter: 0.0,
        }
    }

    /// Drives a saga with `script` until it waits for `until` or ends.
    fn drive(
        def: &Definition,
        script: impl Fn(&str, Kind, u32) -> Answer,
        stop: impl Fn(&SagaState) -> bool,
    ) -> SagaState {
        let (mut state, _) = started(def);
        for _ in 0..100 {
            if stop(&state) || state.status.is_terminal() {
                return state;
            }
            let event = match state.waiting {
                Waiting::Reply { command_id, .. } => {
                    match script(&def.steps[state.step].name, state.kind, state.attempt) {
                        Answer::Ok => ok(command_id),
                        Answer::Fail | Answer::Transient => Event::Reply {
                            command_id,
                            outcome: Outcome::Failure {
                                reason: "no".into(),
                                retryable: true,
                            },
                            answers: None,
                        },
                        Answer::Silent => Event::Timer,
                    }
                }
                _ => Event::Timer,
            };
            let ids = Uuid::now_v7();
            state = apply(
                def,
                &state,
                event,
                Ctx {
                    next_command_id: ids,
                    ..at(&state)
                },
            )
            .state;
        }
        state
    }

    fn sent(t: &Transition) -> Vec<(usize, Kind, u32)> {
        t.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(c) => Some((c.step, c.kind, c.attempt)),
                _ => None,
            })
            .collect()
    }

    fn recorded(t: &Transition) -> Value {
        t.effects
            .iter()
            .find_map(|e| match e {
                Effect::History {
                    kind: HistoryKind::OperatorAction,
                    detail,
                    ..
                } => Some(detail.clone()),
                _ => None,
            })
            .expect("the repair is in the history")
    }

    #[test]
    fn retry_now_sends_a_new_attempt_at_once_and_abandons_the_one_in_flight() {
        let def = order_saga();
        // Backing off after a transient failure of the payment.
        let waiting = drive(
            &def,
            |s, _, _| {
                if s == "authorize_payment" {
                    Answer::Transient
                } else {
                    Answer::Ok
                }
            },
            |s| s.step == 1 && matches!(s.waiting, Waiting::Retry { .. }),
        );
        let t = repair(
            &def,
            &waiting,
            Repair::RetryNow,
            &op(),
            at(&SagaState {
                waiting: Waiting::Nothing,
                ..waiting.clone()
            }),
        )
        .unwrap();
        assert_eq!(sent(&t), [(1, Kind::Action, 2)]);
        assert_eq!(
            recorded(&t),
            json!({"action": "retry", "actor": "alice", "reason": "ticket 42", "kind": "action"})
        );

        // In flight: the old attempt is superseded, a new one goes.
        let (running, first) = started(&def);
        let t = repair(&def, &running, Repair::RetryNow, &op(), at(&running)).unwrap();
        assert!(t.effects.contains(&Effect::AttemptEnded {
            command_id: first,
            end: AttemptEnd::Superseded
        }));
        assert_eq!(sent(&t), [(0, Kind::Action, 2)]);
    }

    #[test]
    fn skip_marks_the_step_done_with_the_given_output_and_continues() {
        let def = order_saga();
        let stuck = drive(
            &def,
            |s, _, _| {
                if s == "approve_order" {
                    Answer::Fail
                } else {
                    Answer::Ok
                }
            },
            |s| s.step == 3 && s.attempt >= 3,
        );
        let t = repair(
            &def,
            &stuck,
            Repair::Skip {
                output: json!({"approved_by": "hand"}),
            },
            &op(),
            at(&stuck),
        )
        .unwrap();
        assert_eq!(t.state.status, Status::Completed);
        assert!(t.effects.contains(&Effect::SaveOutput {
            step: 3,
            output: json!({"approved_by": "hand"})
        }));
        assert_eq!(recorded(&t)["output"], json!({"approved_by": "hand"}));

        // Skipping a compensation moves on to the next one.
        let def = order_saga();
        let comp = drive(
            &def,
            |s, k, _| match (s, k) {
                ("schedule_delivery", Kind::Action) => Answer::Fail,
                ("authorize_payment", Kind::Compensation) => Answer::Transient,
                _ => Answer::Ok,
            },
            |s| s.status == Status::NeedsOperator,
        );
        assert_eq!((comp.status, comp.step), (Status::NeedsOperator, 1));
        let t = repair(
            &def,
            &comp,
            Repair::Skip {
                output: Value::Null,
            },
            &op(),
            at(&comp),
        )
        .unwrap();
        assert_eq!(t.state.status, Status::Compensating);
        assert_eq!(sent(&t), [(0, Kind::Compensation, 1)]);
    }

    #[test]
    fn compensate_aborts_a_running_saga_but_not_past_its_pivot() {
        let def = order_saga();
        let at_payment = drive(&def, |_, _, _| Answer::Ok, |s| s.step == 1);
        let t = repair(
            &def,
            &at_payment,
            Repair::Compensate,
            &op(),
            at(&at_payment),
        )
        .unwrap();
        assert_eq!(t.state.status, Status::Compensating);
        // The payment may have been authorised meanwhile: it is refunded first.
        assert_eq!(sent(&t), [(1, Kind::Compensation, 1)]);
        assert!(t.state.error.as_deref().unwrap().contains("alice"));

        let past_pivot = drive(&def, |_, _, _| Answer::Ok, |s| s.step == 3);
        let e = repair(
            &def,
            &past_pivot,
            Repair::Compensate,
            &op(),
            at(&past_pivot),
        )
        .unwrap_err();
        assert!(e.0.contains("pivot"), "{e}");
        let compensating = SagaState {
            status: Status::Compensating,
            ..at_payment
        };
        assert!(
            repair(
                &def,
                &compensating,
                Repair::Compensate,
                &op(),
                at(&compensating)
            )
            .is_err()
        );
    }

    #[test]
    fn resolve_closes_only_a_saga_that_needs_an_operator() {
        let def = order_saga();
        let stuck = drive(
            &def,
            |s, k, _| match (s, k) {
                ("authorize_payment", Kind::Action) => Answer::Fail,
                ("create_order", Kind::Compensation) => Answer::Transient,
                _ => Answer::Ok,
            },
            |s| s.status == Status::NeedsOperator,
        );
        let t = repair(&def, &stuck, Repair::Resolve, &op(), at(&stuck)).unwrap();
        assert_eq!(
            (t.state.status, t.state.waiting),
            (Status::Resolved, Waiting::Nothing)
        );
        assert!(t.effects.contains(&Effect::Lifecycle(Status::Resolved)));

        let (running, _) = started(&def);
        assert!(
            repair(&def, &running, Repair::Resolve, &op(), at(&running))
                .unwrap_err()
                .0
                .contains("needs an operator")
        );
    }

    #[test]
    fn finished_or_unstarted_sagas_refuse_every_repair() {
        let def = order_saga();
        for status in [Status::Completed, Status::Compensated, Status::Resolved] {
            let done = SagaState {
                status,
                attempt: 1,
                ..SagaState::new()
            };
            for r in [
                Repair::RetryNow,
                Repair::Skip {
                    output: Value::Null,
                },
                Repair::Compensate,
                Repair::Resolve,
            ] {
                assert!(
                    repair(&def, &done, r, &op(), at(&done)).is_err(),
                    "{status:?}"
                );
            }
        }
        let fresh = SagaState::new();
        assert!(repair(&def, &fresh, Repair::RetryNow, &op(), at(&fresh)).is_err());
    }
}
