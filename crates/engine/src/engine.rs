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
        event: HistoryEvent,
        step: Option<usize>,
        command_id: Option<Uuid>,
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

/// One entry of a saga's history and what it records. Its [`detail`](HistoryEvent::detail) is
/// stored as `saga_history.detail` and shown as is by the API, sagactl and the console, so the
/// JSON of every variant is a contract: `history_details_keep_their_shape` pins it.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryEvent {
    SagaStarted {
        definition_version: u32,
    },
    CommandSent {
        kind: Kind,
        attempt: u32,
    },
    StepSucceeded {
        output: Value,
    },
    /// A participant's failure, or (`retryable: false`) an action whose command cannot be built.
    StepFailed {
        reason: String,
        retryable: bool,
    },
    StepTimedOut {
        kind: Kind,
        timeout_ms: u64,
    },
    RetryScheduled {
        kind: Kind,
        next_attempt: u32,
        delay_ms: u64,
        reason: String,
    },
    /// `attempts` is the failed step's: none when an operator turned the saga around.
    CompensationStarted {
        reason: String,
        attempts: Option<u32>,
    },
    StepCompensated,
    CompensationFailed {
        reason: String,
    },
    /// A reply to an attempt that had already ended.
    LateReply {
        outcome: Outcome,
    },
    SagaCompleted,
    SagaCompensated,
    NeedsOperator {
        reason: String,
    },
    /// `action` is recorded by its name; a skip's output is recorded beside it as `output`.
    OperatorAction {
        action: Repair,
        actor: String,
        reason: String,
        kind: Kind,
    },
    SagaResolved {
        actor: String,
    },
    /// The step's `when` was false (the only way a step is skipped).
    StepSkipped,
}

impl HistoryEvent {
    pub fn kind(&self) -> HistoryKind {
        match self {
            HistoryEvent::SagaStarted { .. } => HistoryKind::SagaStarted,
            HistoryEvent::CommandSent { .. } => HistoryKind::CommandSent,
            HistoryEvent::StepSucceeded { .. } => HistoryKind::StepSucceeded,
            HistoryEvent::StepFailed { .. } => HistoryKind::StepFailed,
            HistoryEvent::StepTimedOut { .. } => HistoryKind::StepTimedOut,
            HistoryEvent::RetryScheduled { .. } => HistoryKind::RetryScheduled,
            HistoryEvent::CompensationStarted { .. } => HistoryKind::CompensationStarted,
            HistoryEvent::StepCompensated => HistoryKind::StepCompensated,
            HistoryEvent::CompensationFailed { .. } => HistoryKind::CompensationFailed,
            HistoryEvent::LateReply { .. } => HistoryKind::LateReply,
            HistoryEvent::SagaCompleted => HistoryKind::SagaCompleted,
            HistoryEvent::SagaCompensated => HistoryKind::SagaCompensated,
            HistoryEvent::NeedsOperator { .. } => HistoryKind::NeedsOperator,
            HistoryEvent::OperatorAction { .. } => HistoryKind::OperatorAction,
            HistoryEvent::SagaResolved { .. } => HistoryKind::SagaResolved,
            HistoryEvent::StepSkipped => HistoryKind::StepSkipped,
        }
    }

    /// The entry's detail, as stored (see [`HistoryEvent::into_detail`]).
    pub fn detail(&self) -> Value {
        self.clone().into_detail()
    }

    /// The JSON stored as the entry's detail. Taking the event by value saves copying a step's
    /// output on the store's path.
    pub fn into_detail(self) -> Value {
        match self {
            HistoryEvent::SagaStarted { definition_version } => {
                json!({"definition_version": definition_version})
            }
            HistoryEvent::CommandSent { kind, attempt } => {
                json!({"kind": kind.as_str(), "attempt": attempt})
            }
            HistoryEvent::StepSucceeded { output } => json!({"output": output}),
            HistoryEvent::StepFailed { reason, retryable } => {
                json!({"reason": reason, "retryable": retryable})
            }
            HistoryEvent::StepTimedOut { kind, timeout_ms } => {
                json!({"kind": kind.as_str(), "timeout_ms": timeout_ms})
            }
            HistoryEvent::RetryScheduled {
                kind,
                next_attempt,
                delay_ms,
                reason,
            } => json!({
                "kind": kind.as_str(),
                "next_attempt": next_attempt,
                "delay_ms": delay_ms,
                "reason": reason,
            }),
            HistoryEvent::CompensationStarted {
                reason,
                attempts: Some(attempts),
            } => json!({"reason": reason, "attempts": attempts}),
            HistoryEvent::CompensationStarted {
                reason,
                attempts: None,
            } => json!({"reason": reason}),
            HistoryEvent::CompensationFailed { reason }
            | HistoryEvent::NeedsOperator { reason } => {
                json!({"reason": reason})
            }
            HistoryEvent::LateReply {
                outcome: Outcome::Success { output },
            } => json!({"outcome": "success", "output": output}),
            HistoryEvent::LateReply {
                outcome: Outcome::Failure { reason, retryable },
            } => json!({"outcome": "failure", "reason": reason, "retryable": retryable}),
            HistoryEvent::OperatorAction {
                action,
                actor,
                reason,
                kind,
            } => {
                let name = action.name();
                match action {
                    Repair::Skip { output } => json!({
                        "action": name,
                        "actor": actor,
                        "reason": reason,
                        "kind": kind.as_str(),
                        "output": output,
                    }),
                    Repair::RetryNow | Repair::Compensate | Repair::Resolve => json!({
                        "action": name,
                        "actor": actor,
                        "reason": reason,
                        "kind": kind.as_str(),
                    }),
                }
            }
            HistoryEvent::SagaResolved { actor } => json!({"actor": actor}),
            HistoryEvent::StepSkipped => json!({"when": false}),
            HistoryEvent::StepCompensated
            | HistoryEvent::SagaCompleted
            | HistoryEvent::SagaCompensated => json!({}),
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
    let action = HistoryEvent::OperatorAction {
        action: repair.clone(),
        actor: by.actor.clone(),
        reason: by.reason.clone(),
        kind: state.kind,
    };
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
            m.history(action, Some(step), None);
            abandon(&mut m);
            m.send(step, state.kind, state.attempt.saturating_add(1));
        }
        Repair::Skip { output } => {
            m.history(action, Some(step), None);
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
            m.history(action, Some(step), None);
            abandon(&mut m);
            m.state.error = Some(format!("compensated by {}: {}", by.actor, by.reason));
            m.state.status = Status::Compensating;
            m.history(
                HistoryEvent::CompensationStarted {
                    reason: by.reason.clone(),
                    attempts: None,
                },
                Some(step),
                None,
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
            m.history(action, Some(step), None);
            m.state.status = Status::Resolved;
            m.state.waiting = Waiting::Nothing;
            m.history(
                HistoryEvent::SagaResolved {
                    actor: by.actor.clone(),
                },
                None,
                None,
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
            HistoryEvent::SagaStarted {
                definition_version: self.def.version,
            },
            None,
            None,
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
                HistoryEvent::LateReply {
                    outcome: outcome.clone(),
                },
                None,
                Some(command_id),
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
                    HistoryEvent::StepFailed {
                        reason: reason.clone(),
                        retryable,
                    },
                    Some(step),
                    Some(command_id),
                );
                // The participant answered: its local transaction did not happen, so this step
                // has nothing to undo.
                self.action_failed(reason, retryable, false);
            }
            (Kind::Compensation, Outcome::Failure { reason, .. }) => {
                self.history(
                    HistoryEvent::CompensationFailed {
                        reason: reason.clone(),
                    },
                    Some(step),
                    Some(command_id),
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
                    HistoryEvent::StepSucceeded {
                        output: output.clone(),
                    },
                    Some(step),
                    Some(command_id),
                );
                self.effects.push(Effect::SaveOutput { step, output });
                self.advance(step);
            }
            Kind::Compensation => {
                self.history(HistoryEvent::StepCompensated, Some(step), Some(command_id));
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
                    HistoryEvent::StepTimedOut {
                        kind: self.state.kind,
                        timeout_ms: millis(timeout),
                    },
                    Some(step),
                    Some(command_id),
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
                HistoryEvent::CompensationStarted {
                    reason,
                    attempts: Some(self.state.attempt),
                },
                Some(step),
                None,
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
            self.history(HistoryEvent::NeedsOperator { reason }, Some(step), None);
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
            HistoryEvent::RetryScheduled {
                kind: self.state.kind,
                next_attempt,
                delay_ms: millis(delay),
                reason: reason.to_owned(),
            },
            Some(self.state.step),
            None,
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
            HistoryEvent::CommandSent { kind, attempt },
            Some(step),
            Some(command_id),
        );
    }

    fn finish(&mut self, status: Status) {
        self.state.status = status;
        self.state.waiting = Waiting::Nothing;
        let event = match status {
            Status::Completed => HistoryEvent::SagaCompleted,
            _ => HistoryEvent::SagaCompensated,
        };
        self.state.error = self
            .state
            .error
            .take()
            .filter(|_| status != Status::Completed);
        self.history(event, None, None);
        self.effects.push(Effect::Lifecycle(status));
    }

    fn history(&mut self, event: HistoryEvent, step: Option<usize>, command_id: Option<Uuid>) {
        self.effects.push(Effect::History {
            event,
            step,
            command_id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition;
    use std::path::Path;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    /// The stored detail of every kind of history entry, in every shape it takes. The store,
    /// the API, sagactl, the console and the integration tests read these keys and types: a
    /// change here is a change of contract, not a refactoring.
    #[test]
    fn history_details_keep_their_shape() {
        use HistoryEvent as H;
        let operator = |action| H::OperatorAction {
            action,
            actor: "alice".into(),
            reason: "ticket 42".into(),
            kind: Kind::Compensation,
        };
        let operator_detail = |action: &str| json!({"action": action, "actor": "alice", "reason": "ticket 42", "kind": "compensation"});
        let table = [
            (
                H::SagaStarted {
                    definition_version: 3,
                },
                "saga_started",
                json!({"definition_version": 3}),
            ),
            (
                H::CommandSent {
                    kind: Kind::Action,
                    attempt: 2,
                },
                "command_sent",
                json!({"kind": "action", "attempt": 2}),
            ),
            (
                H::StepSucceeded {
                    output: json!({"order_id": "o-1", "n": [1, null]}),
                },
                "step_succeeded",
                json!({"output": {"order_id": "o-1", "n": [1, null]}}),
            ),
            (
                H::StepSucceeded {
                    output: Value::Null,
                },
                "step_succeeded",
                json!({"output": null}),
            ),
            (
                H::StepFailed {
                    reason: "card declined".into(),
                    retryable: false,
                },
                "step_failed",
                json!({"reason": "card declined", "retryable": false}),
            ),
            (
                H::StepTimedOut {
                    kind: Kind::Compensation,
                    timeout_ms: 30_000,
                },
                "step_timed_out",
                json!({"kind": "compensation", "timeout_ms": 30_000}),
            ),
            (
                H::RetryScheduled {
                    kind: Kind::Action,
                    next_attempt: 3,
                    delay_ms: u64::MAX,
                    reason: "busy".into(),
                },
                "retry_scheduled",
                json!({"kind": "action", "next_attempt": 3, "delay_ms": u64::MAX, "reason": "busy"}),
            ),
            (
                H::CompensationStarted {
                    reason: "out of stock".into(),
                    attempts: Some(1),
                },
                "compensation_started",
                json!({"reason": "out of stock", "attempts": 1}),
            ),
            (
                H::CompensationStarted {
                    reason: "ticket 42".into(),
                    attempts: None,
                },
                "compensation_started",
                json!({"reason": "ticket 42"}),
            ),
            (H::StepCompensated, "step_compensated", json!({})),
            (
                H::CompensationFailed {
                    reason: "refund refused".into(),
                },
                "compensation_failed",
                json!({"reason": "refund refused"}),
            ),
            (
                H::LateReply {
                    outcome: Outcome::Success {
                        output: json!({"a": 1}),
                    },
                },
                "late_reply",
                json!({"outcome": "success", "output": {"a": 1}}),
            ),
            (
                H::LateReply {
                    outcome: Outcome::Failure {
                        reason: "late".into(),
                        retryable: true,
                    },
                },
                "late_reply",
                json!({"outcome": "failure", "reason": "late", "retryable": true}),
            ),
            (H::SagaCompleted, "saga_completed", json!({})),
            (H::SagaCompensated, "saga_compensated", json!({})),
            (
                H::NeedsOperator {
                    reason: "refund refused".into(),
                },
                "needs_operator",
                json!({"reason": "refund refused"}),
            ),
            (
                operator(Repair::RetryNow),
                "operator_action",
                operator_detail("retry"),
            ),
            (
                operator(Repair::Skip {
                    output: json!({"by": "hand"}),
                }),
                "operator_action",
                json!({"action": "skip", "actor": "alice", "reason": "ticket 42", "kind": "compensation", "output": {"by": "hand"}}),
            ),
            (
                operator(Repair::Skip {
                    output: Value::Null,
                }),
                "operator_action",
                json!({"action": "skip", "actor": "alice", "reason": "ticket 42", "kind": "compensation", "output": null}),
            ),
            (
                operator(Repair::Compensate),
                "operator_action",
                operator_detail("compensate"),
            ),
            (
                operator(Repair::Resolve),
                "operator_action",
                operator_detail("resolve"),
            ),
            (
                H::SagaResolved {
                    actor: "alice".into(),
                },
                "saga_resolved",
                json!({"actor": "alice"}),
            ),
            (H::StepSkipped, "step_skipped", json!({"when": false})),
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for (event, kind, detail) in table {
            assert_eq!(event.kind().as_str(), kind, "{event:?}");
            assert_eq!(event.detail(), detail, "{event:?}");
            // Compared as text as well: a number must stay a number, not become a string.
            assert_eq!(event.detail().to_string(), detail.to_string(), "{event:?}");
            assert_eq!(event.clone().into_detail(), detail, "{event:?}");
            kinds.insert(kind);
        }
        assert_eq!(kinds.len(), 16, "every kind is pinned: {kinds:?}");
    }

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
                    Effect::History { event, .. } => out.history.push(event.kind()),
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
                            event: HistoryEvent::LateReply { .. },
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
                        event: HistoryEvent::LateReply { .. },
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
                    event: event @ HistoryEvent::OperatorAction { .. },
                    ..
                } => Some(event.detail()),
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
