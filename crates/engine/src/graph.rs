//! Sagas as graphs: one small state machine per step, the saga's status derived from them.
//!
//! Like [`crate::engine`], pure: [`Graph::apply`] takes the saga's [`GraphState`], one
//! [`Event`] and a [`Ctx`] and returns the next state with its [`Effect`]s. What a step's `when`
//! says and what its command carries come from a [`Facts`] the driver builds from the saga's data,
//! so the checker in [`crate::explore`] can answer both ways without any data.
//!
//! Per step (A = action, C = compensation; "turned" = the saga is compensating). Each line is one
//! transition; a state not listed for an event ignores it (a late or duplicate reply is recorded,
//! nothing moves).
//!
//! ```text
//! Pending      --ready, when false-------------------> Skipped          (no command, ever)
//! Pending      --ready, when/input error, <= pivot---> Failed           + turn
//! Pending      --ready, when/input error, > pivot----> Held             (operator)
//! Pending      --ready-------------------------------> Running(1)       A sent
//! Running(n)   --success-----------------------------> Succeeded
//! Running(n)   --failure|deadline, may retry---------> RetryWait(n)     (> pivot: always)
//! Running(n)   --failure, final----------------------> Failed           + turn
//! Running(n)   --deadline, final---------------------> Unknown          + turn (maybe applied)
//! Running(n)   --failure, turned---------------------> Failed           (awaited, no new attempt)
//! Running(n)   --deadline, turned--------------------> Unknown
//! RetryWait(n) --at----------------------------------> Running(n+1)     A sent
//! RetryWait(n) --turn--------------------------------> Failed | Unknown (as its last attempt)
//! Running|RetryWait|Held --late success of this step-> Succeeded        (the newer attempt dropped)
//! RetryWait(n) --at, input error----------------------> Failed + turn | Held (> pivot)
//! Succeeded|Unknown --turned, descendants quiet------> Compensating(1)  C sent (none: stays)
//! Succeeded|Unknown --same, input error--------------> CompFailed       (needs_operator)
//! Compensating(n) --success--------------------------> Compensated
//! Compensating(n) --failure|deadline, n < max--------> CompRetryWait(n)
//! Compensating(n) --failure|deadline, n = max--------> CompFailed       (needs_operator)
//! CompRetryWait(n) --at------------------------------> Compensating(n+1) (input error: CompFailed)
//! Compensating|CompRetryWait|CompFailed --late success of this C--> Compensated
//! Skipped | Failed | Compensated ------------------------> absorb everything
//! ```
//!
//! A step is ready when every step it waits for is Succeeded or Skipped; all ready steps leave in
//! the same transition. A descendant is quiet when nothing of it is in flight or left to undo:
//! not Running/RetryWait/Held, not Compensating/CompRetryWait/CompFailed, and not
//! Succeeded/Unknown with a compensation. The saga's status follows from the steps: running until
//! every step is Succeeded or Skipped (completed); once turned, compensating while anything is in
//! flight, then compensated, or needs_operator when a compensation (or a held step) blocks.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::definition::{Definition, Step};
use crate::engine::{
    AttemptEnd, Ctx, Event, HistoryEvent, Kind, Operator, Outcome, Refused, Repair, SagaState,
    Status, Waiting, later,
};

/// What the machine learns from the saga's data. The driver answers through `expr`; the checker
/// answers every possible way.
///
/// `saved` holds the outputs the transition asking has saved so far, (step, output), which the
/// saga's stored data does not have yet: a reply's output is saved by the very transition that
/// dispatches the steps waiting for it.
pub trait Facts {
    /// Evaluates step `step`'s `when`: Ok(None) when the step has none.
    fn condition(&self, step: usize, saved: &[(usize, &Value)]) -> Result<Option<bool>, String>;
    /// The command input for `step`/`kind` when the step maps its input (`input` /
    /// `compensation_input`); Ok(None) when it does not (the driver builds today's body).
    fn command_input(
        &self,
        step: usize,
        kind: Kind,
        saved: &[(usize, &Value)],
    ) -> Result<Option<Value>, String>;
}

/// The facts of a definition that uses no data (`needs_data() == false`): no conditions, no
/// mapped inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoData;

impl Facts for NoData {
    fn condition(&self, _step: usize, _saved: &[(usize, &Value)]) -> Result<Option<bool>, String> {
        Ok(None)
    }

    fn command_input(
        &self,
        _step: usize,
        _kind: Kind,
        _saved: &[(usize, &Value)],
    ) -> Result<Option<Value>, String> {
        Ok(None)
    }
}

/// The facts of a saga whose definition reads data: its conditions and mappings evaluated on
/// the saga's input and the outputs of the steps so far.
pub struct DataFacts<'a> {
    pub def: &'a Definition,
    pub data: crate::expr::Data<'a>,
}

impl DataFacts<'_> {
    /// Calls `f` with the saga's data and `saved` laid over its outputs.
    fn with_saved<R>(
        &self,
        saved: &[(usize, &Value)],
        f: impl FnOnce(&crate::expr::Data<'_>) -> R,
    ) -> R {
        if saved.is_empty() {
            return f(&self.data);
        }
        let mut outputs = self.data.outputs.to_vec();
        outputs.resize(self.def.steps.len().max(outputs.len()), None);
        for (i, output) in saved {
            if let Some(slot) = outputs.get_mut(*i) {
                *slot = Some((*output).clone());
            }
        }
        f(&crate::expr::Data {
            input: self.data.input,
            saga_id: self.data.saga_id,
            outputs: &outputs,
        })
    }
}

impl Facts for DataFacts<'_> {
    fn condition(&self, step: usize, saved: &[(usize, &Value)]) -> Result<Option<bool>, String> {
        let Some(s) = self.def.steps.get(step) else {
            return Ok(None);
        };
        s.when
            .as_ref()
            .map(|c| self.with_saved(saved, |data| c.eval(self.def, step, data)))
            .transpose()
            .map_err(|e| format!("step {}: {e}", s.name))
    }

    fn command_input(
        &self,
        step: usize,
        kind: Kind,
        saved: &[(usize, &Value)],
    ) -> Result<Option<Value>, String> {
        let Some(s) = self.def.steps.get(step) else {
            return Ok(None);
        };
        // A compensation without a mapping of its own is sent the step's own command input.
        let mapping = match kind {
            Kind::Action => s.input.as_ref(),
            Kind::Compensation => s.compensation_input.as_ref().or(s.input.as_ref()),
        };
        mapping
            .map(|m| self.with_saved(saved, |data| m.render(self.def, step, data)))
            .transpose()
            .map_err(|e| format!("step {}: {e}", s.name))
    }
}

/// One step's state. Stored as JSON with the saga (externally tagged: `serde_json`'s
/// `arbitrary_precision` cannot read numbers back through internally tagged enums).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    /// Its `when` was false: no command, never compensated, output null.
    Skipped,
    /// Attempt `attempt` of the action is out.
    Running {
        attempt: u32,
        command_id: Uuid,
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// Attempt `attempt` failed or timed out (`timed_out`: maybe applied); the next goes at `at`.
    RetryWait {
        attempt: u32,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        timed_out: bool,
    },
    Succeeded,
    /// Failed for good: nothing to undo.
    Failed,
    /// Given up on after a timeout: maybe applied, so compensated like a success.
    Unknown,
    /// Past the pivot, its command could not be built (`reason`): an operator must act.
    Held {
        attempt: u32,
        reason: String,
    },
    Compensating {
        attempt: u32,
        command_id: Uuid,
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    CompRetryWait {
        attempt: u32,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    Compensated,
    /// The compensation failed `attempt` times (0: could not be built), last for `reason`.
    CompFailed {
        attempt: u32,
        reason: String,
    },
}

impl StepState {
    pub fn as_str(&self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Skipped => "skipped",
            StepState::Running { .. } => "running",
            StepState::RetryWait { .. } => "retry_wait",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Unknown => "unknown",
            StepState::Held { .. } => "held",
            StepState::Compensating { .. } => "compensating",
            StepState::CompRetryWait { .. } => "comp_retry_wait",
            StepState::Compensated => "compensated",
            StepState::CompFailed { .. } => "comp_failed",
        }
    }

    /// The command this step waits for a reply to.
    pub fn command_id(&self) -> Option<Uuid> {
        match self {
            StepState::Running { command_id, .. } | StepState::Compensating { command_id, .. } => {
                Some(*command_id)
            }
            _ => None,
        }
    }

    /// When this step's timer fires (a reply deadline or the end of a back-off).
    pub fn wake_at(&self) -> Option<OffsetDateTime> {
        match self {
            StepState::Running { deadline, .. } | StepState::Compensating { deadline, .. } => {
                Some(*deadline)
            }
            StepState::RetryWait { at, .. } | StepState::CompRetryWait { at, .. } => Some(*at),
            _ => None,
        }
    }

    /// Whether an operator may act on this step (retry it, skip it).
    pub fn is_current(&self) -> bool {
        self.kind().is_some()
    }

    /// The kind of the command this step is running, waiting to retry, or blocked on.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            StepState::Running { .. } | StepState::RetryWait { .. } | StepState::Held { .. } => {
                Some(Kind::Action)
            }
            StepState::Compensating { .. }
            | StepState::CompRetryWait { .. }
            | StepState::CompFailed { .. } => Some(Kind::Compensation),
            _ => None,
        }
    }

    /// Why the step is held, or why its compensation gave up.
    pub fn reason(&self) -> Option<&str> {
        match self {
            StepState::Held { reason, .. } | StepState::CompFailed { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The attempt running, waited for, or last failed; 0 when none.
    pub fn attempt(&self) -> u32 {
        match self {
            StepState::Running { attempt, .. }
            | StepState::RetryWait { attempt, .. }
            | StepState::Held { attempt, .. }
            | StepState::Compensating { attempt, .. }
            | StepState::CompRetryWait { attempt, .. }
            | StepState::CompFailed { attempt, .. } => *attempt,
            _ => 0,
        }
    }

    fn in_flight(&self) -> bool {
        matches!(
            self,
            StepState::Running { .. }
                | StepState::RetryWait { .. }
                | StepState::Compensating { .. }
                | StepState::CompRetryWait { .. }
        )
    }
}

/// The control state of a graph saga: one [`StepState`] per step of its definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GraphState {
    /// Derived from the steps at the end of every transition; kept so that readers (the store,
    /// the API) need not re-derive it, and because `resolved` cannot be derived.
    #[serde(with = "status_text")]
    pub status: Status,
    pub started: bool,
    /// A step at or before the pivot failed for good (or an operator aborted): nothing new is
    /// dispatched and completed steps are compensated.
    pub turned: bool,
    pub steps: Vec<StepState>,
    /// Why the saga turned around or stopped.
    pub error: Option<String>,
}

impl GraphState {
    pub fn new(def: &Definition) -> Self {
        GraphState {
            status: Status::Running,
            started: false,
            turned: false,
            steps: vec![StepState::Pending; def.steps.len()],
            error: None,
        }
    }

    /// A saga stored on the linear machine's shape ([`SagaState`]: one cursor), for migrating
    /// sagas in flight. On the corridor it came from, the result behaves exactly as the linear
    /// machine would have from there on (a property test converts at random points and compares).
    /// Ended sagas keep their status; which of their steps were undone is not in the old shape,
    /// so each step with a compensation shows as compensated.
    pub fn from_linear(def: &Definition, old: &SagaState) -> GraphState {
        let n = def.steps.len();
        let mut g = GraphState::new(def);
        g.error = old.error.clone();
        g.status = old.status;
        if old.status == Status::Running && old.attempt == 0 {
            g.error = None;
            return g;
        }
        g.started = true;
        let at = old.step;
        let has_compensation =
            |i: usize| def.steps.get(i).is_some_and(|s| s.compensation.is_some());
        let current = match (old.kind, old.waiting) {
            (
                Kind::Action,
                Waiting::Reply {
                    command_id,
                    deadline,
                },
            ) => StepState::Running {
                attempt: old.attempt,
                command_id,
                deadline,
            },
            // Whether the last attempt timed out only matters for a sibling of a failing step,
            // and a corridor has none: assume the worse.
            (Kind::Action, Waiting::Retry { at }) => StepState::RetryWait {
                attempt: old.attempt,
                at,
                timed_out: true,
            },
            (
                Kind::Compensation,
                Waiting::Reply {
                    command_id,
                    deadline,
                },
            ) => StepState::Compensating {
                attempt: old.attempt,
                command_id,
                deadline,
            },
            (Kind::Compensation, Waiting::Retry { at }) => StepState::CompRetryWait {
                attempt: old.attempt,
                at,
            },
            (Kind::Compensation, Waiting::Nothing) => StepState::CompFailed {
                attempt: old.attempt,
                reason: old.error.clone().unwrap_or_default(),
            },
            (Kind::Action, Waiting::Nothing) => StepState::Pending,
        };
        let backwards = old.kind == Kind::Compensation;
        g.turned = backwards || matches!(old.status, Status::Compensated);
        for (i, st) in g.steps.iter_mut().enumerate().take(n) {
            *st = match old.status {
                Status::Completed => StepState::Succeeded,
                Status::Compensated if has_compensation(i) => StepState::Compensated,
                Status::Compensated => StepState::Pending,
                _ if i < at => StepState::Succeeded,
                _ if i == at => current.clone(),
                // Past the cursor of a compensating saga: undone, or nothing to undo.
                _ if backwards && has_compensation(i) => StepState::Compensated,
                _ => StepState::Pending,
            };
        }
        g
    }

    /// When the timer sweeper must deliver [`Event::Timer`]: the earliest deadline or retry time
    /// of any step.
    pub fn wake_at(&self) -> Option<OffsetDateTime> {
        if self.status.is_terminal() {
            return None;
        }
        self.steps.iter().filter_map(StepState::wake_at).min()
    }

    /// The steps an operator may act on, in definition order.
    pub fn current(&self) -> impl Iterator<Item = usize> + '_ {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_current())
            .map(|(i, _)| i)
    }
}

mod status_text {
    use crate::engine::Status;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(s: &Status, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
        let text = String::deserialize(d)?;
        Status::parse(&text).ok_or_else(|| D::Error::custom(format!("unknown status `{text}`")))
    }
}

/// A command for a participant, to be written to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub command_id: Uuid,
    pub step: usize,
    pub kind: Kind,
    pub attempt: u32,
    pub deadline: OffsetDateTime,
    /// The rendered `input` / `compensation_input` mapping; None: the body is built as today.
    pub input: Option<Value>,
}

/// As [`crate::engine::Effect`], with a [`Command`] that may carry its mapped input.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Send(Command),
    AttemptEnded {
        command_id: Uuid,
        end: AttemptEnd,
    },
    SaveOutput {
        step: usize,
        output: Value,
    },
    History {
        event: HistoryEvent,
        step: Option<usize>,
        command_id: Option<Uuid>,
    },
    Lifecycle(Status),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: GraphState,
    pub effects: Vec<Effect>,
}

impl Transition {
    /// Nothing changed: the event did not apply to this saga's current state.
    pub fn is_noop(&self) -> bool {
        self.effects.is_empty()
    }
}

/// A definition's graph, computed once: what each step waits for, what waits for it, and which
/// steps come after the pivot.
#[derive(Debug, Clone)]
pub struct Graph<'a> {
    def: &'a Definition,
    deps: Vec<Vec<usize>>,
    /// Every step that waits for `i`, directly or not (`i` itself excluded, even in a cycle).
    descendants: Vec<Vec<usize>>,
    after_pivot: Vec<bool>,
}

impl<'a> Graph<'a> {
    pub fn new(def: &'a Definition) -> Self {
        let n = def.steps.len();
        let deps: Vec<Vec<usize>> = (0..n).map(|i| def.deps(i)).collect();
        let mut children = vec![Vec::new(); n];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                // `deps` leaves out steps that do not exist; a cycle (only in a hand-built
                // definition) never becomes ready and stops the saga for an operator.
                if let Some(c) = children.get_mut(d) {
                    c.push(i);
                }
            }
        }
        let descendants: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                let mut seen = vec![false; n];
                let mut stack = children.get(i).cloned().unwrap_or_default();
                while let Some(j) = stack.pop() {
                    if let Some(s) = seen.get_mut(j)
                        && !*s
                    {
                        *s = true;
                        stack.extend(children.get(j).into_iter().flatten().copied());
                    }
                }
                (0..n)
                    .filter(|&j| j != i && seen.get(j) == Some(&true))
                    .collect()
            })
            .collect();
        let mut after_pivot = vec![false; n];
        for &d in descendants.get(def.pivot).into_iter().flatten() {
            if let Some(a) = after_pivot.get_mut(d) {
                *a = true;
            }
        }
        Graph {
            def,
            deps,
            descendants,
            after_pivot,
        }
    }

    pub fn def(&self) -> &'a Definition {
        self.def
    }

    pub fn deps(&self, i: usize) -> &[usize] {
        self.deps.get(i).map_or(&[], Vec::as_slice)
    }

    pub fn descendants(&self, i: usize) -> &[usize] {
        self.descendants.get(i).map_or(&[], Vec::as_slice)
    }

    /// Whether `i` runs after the pivot succeeded: retried until it succeeds, never undone.
    pub fn is_after_pivot(&self, i: usize) -> bool {
        self.after_pivot.get(i).copied().unwrap_or(false)
    }

    /// Whether the state can be interpreted against this definition at all (a state and a
    /// definition read back from the database are not re-validated).
    fn fits(&self, state: &GraphState) -> bool {
        !self.def.steps.is_empty()
            && self.def.pivot < self.def.steps.len()
            && state.steps.len() == self.def.steps.len()
    }

    fn machine<'m>(&'m self, state: &GraphState, ctx: Ctx, facts: &'m dyn Facts) -> Machine<'m> {
        Machine {
            g: self,
            s: state.clone(),
            effects: Vec::new(),
            ctx,
            facts,
            sent: 0,
        }
    }

    /// Applies one event. Events that do not fit the state change nothing; a late reply is only
    /// recorded, except a success of the very step (and kind) still being retried, which counts.
    pub fn apply(
        &self,
        state: &GraphState,
        event: Event,
        ctx: Ctx,
        facts: &dyn Facts,
    ) -> Transition {
        if !self.fits(state) {
            return noop(state);
        }
        let mut m = self.machine(state, ctx, facts);
        match event {
            Event::Start => m.start(),
            Event::Reply {
                command_id,
                outcome,
                answers,
            } => m.reply(command_id, outcome, answers),
            Event::Timer => {
                // Deadlines first: one of them may turn the saga around, and then the retries
                // due at the same time must not go out. A step whose deadline passed waits for
                // its back-off until the next timer, even a zero one.
                let (deadlines, backoffs): (Vec<usize>, Vec<usize>) = (0..state.steps.len())
                    .filter(|&i| {
                        let due = state.steps.get(i).and_then(StepState::wake_at);
                        due.is_some_and(|t| t <= ctx.now)
                    })
                    .partition(|&i| state.steps.get(i).and_then(StepState::command_id).is_some());
                for i in deadlines.into_iter().chain(backoffs) {
                    m.fire(i);
                }
            }
        }
        m.finish()
    }

    /// The timer of step `i` alone, as if it were the only one due at `ctx.now`: lets the checker
    /// explore timers in every order.
    pub(crate) fn fire_one(
        &self,
        state: &GraphState,
        i: usize,
        ctx: Ctx,
        facts: &dyn Facts,
    ) -> Transition {
        if !self.fits(state) {
            return noop(state);
        }
        let mut m = self.machine(state, ctx, facts);
        m.fire(i);
        m.finish()
    }

    /// Applies an operator's repair. `RetryNow` and `Skip` act on `step` (a step name), which may
    /// be left out when exactly one step is current; `Compensate` and `Resolve` act on the saga.
    pub fn repair(
        &self,
        state: &GraphState,
        repair: Repair,
        step: Option<&str>,
        by: &Operator,
        ctx: Ctx,
        facts: &dyn Facts,
    ) -> Result<Transition, Refused> {
        if !self.fits(state) {
            return Err(Refused(format!(
                "the saga has {} step states but {} version {} has {} steps",
                state.steps.len(),
                self.def.name,
                self.def.version,
                self.def.steps.len()
            )));
        }
        if state.status.is_terminal() {
            return Err(Refused(format!(
                "the saga is {}: nothing to repair",
                state.status.as_str()
            )));
        }
        if !state.started {
            return Err(Refused("the saga has not started yet".into()));
        }
        let named = match step {
            Some(name) => Some(self.def.step_index(name).ok_or_else(|| {
                Refused(format!(
                    "{} version {} has no step `{name}`",
                    self.def.name, self.def.version
                ))
            })?),
            None => None,
        };
        let mut m = self.machine(state, ctx, facts);
        match repair {
            Repair::RetryNow => {
                let i = m.target(named)?;
                let st = m.at(i).clone();
                if state.turned && matches!(st, StepState::Running { .. }) {
                    return Err(Refused(format!(
                        "the saga is compensating: the action of step {} is only awaited, not \
                         retried",
                        m.name(i)
                    )));
                }
                let kind = st.kind().unwrap_or(Kind::Action);
                m.operator_action(&Repair::RetryNow, i, kind, by);
                m.abandon(i);
                if matches!(st, StepState::Held { attempt: 0, .. }) {
                    // Never sent: its `when` may be what failed, so it is evaluated again.
                    m.set(i, StepState::Pending);
                } else {
                    m.dispatch(i, kind, st.attempt().saturating_add(1));
                }
            }
            Repair::Skip { output } => {
                let i = m.target(named)?;
                let kind = m.at(i).kind().unwrap_or(Kind::Action);
                m.operator_action(
                    &Repair::Skip {
                        output: output.clone(),
                    },
                    i,
                    kind,
                    by,
                );
                m.abandon(i);
                match kind {
                    Kind::Action => {
                        m.effects.push(Effect::SaveOutput { step: i, output });
                        m.set(i, StepState::Succeeded);
                    }
                    Kind::Compensation => m.set(i, StepState::Compensated),
                }
            }
            Repair::Compensate => {
                if state.status != Status::Running || state.turned {
                    return Err(Refused(format!(
                        "only a running saga can be compensated; this one is {}",
                        state.status.as_str()
                    )));
                }
                if matches!(
                    m.at(self.def.pivot),
                    StepState::Succeeded | StepState::Skipped
                ) {
                    return Err(Refused(format!(
                        "the saga is past its pivot ({}): its remaining steps can only go forwards",
                        m.name(self.def.pivot)
                    )));
                }
                let first = state.current().next();
                let kind = first.and_then(|i| m.at(i).kind()).unwrap_or(Kind::Action);
                m.operator_action_at(&Repair::Compensate, first, kind, by);
                // Whatever is out or between attempts may have been applied: undo it too;
                // compensations tolerate undoing nothing.
                for i in 0..state.steps.len() {
                    if matches!(
                        m.at(i),
                        StepState::Running { .. } | StepState::RetryWait { .. }
                    ) {
                        m.abandon(i);
                        m.set(i, StepState::Unknown);
                    }
                }
                m.s.error = Some(format!("compensated by {}: {}", by.actor, by.reason));
                m.s.turned = true;
                m.history(
                    HistoryEvent::CompensationStarted {
                        reason: by.reason.clone(),
                        attempts: None,
                    },
                    first,
                    None,
                );
            }
            Repair::Resolve => {
                if state.status != Status::NeedsOperator {
                    return Err(Refused(format!(
                        "only a saga that needs an operator can be resolved; this one is {}",
                        state.status.as_str()
                    )));
                }
                let at = named.or_else(|| m.blocking().first().copied());
                let kind = at.and_then(|i| m.at(i).kind()).unwrap_or(Kind::Action);
                m.operator_action_at(&Repair::Resolve, at, kind, by);
                m.s.status = Status::Resolved;
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
        Ok(m.finish())
    }
}

/// [`Graph::apply`] for callers that apply one event to a definition.
pub fn apply(
    def: &Definition,
    state: &GraphState,
    event: Event,
    ctx: Ctx,
    facts: &dyn Facts,
) -> Transition {
    Graph::new(def).apply(state, event, ctx, facts)
}

/// [`Graph::repair`] for callers that apply one repair to a definition.
pub fn repair(
    def: &Definition,
    state: &GraphState,
    repair: Repair,
    step: Option<&str>,
    by: &Operator,
    ctx: Ctx,
    facts: &dyn Facts,
) -> Result<Transition, Refused> {
    Graph::new(def).repair(state, repair, step, by, ctx, facts)
}

fn noop(state: &GraphState) -> Transition {
    Transition {
        state: state.clone(),
        effects: Vec::new(),
    }
}

/// The id of the `n`-th command sent by one transition. The first is the driver's own
/// `Ctx::next_command_id`, so a transition sending one command (every transition of a linear
/// saga) is exactly engine.rs's. Later ones are UUIDv8: the driver's id XOR a 128-bit mix of `n`
/// (SplitMix64's finaliser on each half), version and variant bits set. Replaying a transition
/// gives the same ids; they are unique as long as the driver's ids are (two transitions' ids
/// collide only if their driver ids differ by exactly such a mix, a 2^-122 chance for random
/// ids), and a v8 never equals a driver's v4/v7 id.
pub fn command_id(base: Uuid, n: u32) -> Uuid {
    if n == 0 {
        return base;
    }
    let hi = splitmix64(u64::from(n));
    let lo = splitmix64(hi ^ 0x9e37_79b9_7f4a_7c15);
    let mixed = base.as_u128() ^ ((u128::from(hi) << 64) | u128::from(lo));
    uuid::Builder::from_custom_bytes(mixed.to_be_bytes()).into_uuid()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whole milliseconds for the history, saturating where `as` would wrap.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

static PENDING: StepState = StepState::Pending;

struct Machine<'m> {
    g: &'m Graph<'m>,
    s: GraphState,
    effects: Vec<Effect>,
    ctx: Ctx,
    facts: &'m dyn Facts,
    /// Commands sent so far in this transition: numbers their ids.
    sent: u32,
}

impl Machine<'_> {
    // ---- access (bounds: `fits` checked that the state has one entry per step) ----

    fn at(&self, i: usize) -> &StepState {
        self.s.steps.get(i).unwrap_or(&PENDING)
    }

    fn set(&mut self, i: usize, st: StepState) {
        if let Some(s) = self.s.steps.get_mut(i) {
            *s = st;
        }
    }

    fn step(&self, i: usize) -> Option<&Step> {
        self.g.def.steps.get(i)
    }

    fn name(&self, i: usize) -> String {
        self.step(i)
            .map_or_else(|| format!("#{i}"), |s| s.name.clone())
    }

    fn has_compensation(&self, i: usize) -> bool {
        self.step(i).is_some_and(|s| s.compensation.is_some())
    }

    fn history(&mut self, event: HistoryEvent, step: Option<usize>, cmd: Option<Uuid>) {
        self.effects.push(Effect::History {
            event,
            step,
            command_id: cmd,
        });
    }

    fn finish(mut self) -> Transition {
        if self.effects.is_empty() {
            return Transition {
                state: self.s,
                effects: self.effects,
            };
        }
        self.settle();
        Transition {
            state: self.s,
            effects: self.effects,
        }
    }

    // ---- events ----

    fn start(&mut self) {
        if self.s.started || self.s.status != Status::Running {
            return;
        }
        self.s.started = true;
        let version = self.g.def.version;
        self.history(
            HistoryEvent::SagaStarted {
                definition_version: version,
            },
            None,
            None,
        );
        self.effects.push(Effect::Lifecycle(Status::Running));
    }

    fn reply(&mut self, command_id: Uuid, outcome: Outcome, answers: Option<(usize, Kind)>) {
        let current = self
            .s
            .steps
            .iter()
            .position(|st| st.command_id() == Some(command_id));
        let Some(i) = current.filter(|_| !self.s.status.is_terminal()) else {
            return self.late(command_id, outcome, answers);
        };
        self.effects.push(Effect::AttemptEnded {
            command_id,
            end: AttemptEnd::Replied(outcome.clone()),
        });
        match (self.at(i).clone(), outcome) {
            (StepState::Running { .. }, Outcome::Success { output }) => {
                self.action_succeeded(i, command_id, output)
            }
            (StepState::Running { attempt, .. }, Outcome::Failure { reason, retryable }) => {
                let event = HistoryEvent::StepFailed {
                    reason: reason.clone(),
                    retryable,
                };
                self.history(event, Some(i), Some(command_id));
                // The participant answered: its local transaction did not happen.
                self.action_failed(i, attempt, reason, retryable, false);
            }
            (_, Outcome::Success { .. }) => self.compensated(i, command_id),
            (st, Outcome::Failure { reason, .. }) => {
                let event = HistoryEvent::CompensationFailed {
                    reason: reason.clone(),
                };
                self.history(event, Some(i), Some(command_id));
                self.compensation_failed(i, st.attempt(), reason);
            }
        }
    }

    /// A reply to an attempt that is not current: it timed out, was superseded, or the saga
    /// ended. Kept for the operator; a success of the step (and kind) still being retried
    /// counts, rather than sending attempts that may each time out behind a backlog.
    fn late(&mut self, command_id: Uuid, outcome: Outcome, answers: Option<(usize, Kind)>) {
        self.effects.push(Effect::AttemptEnded {
            command_id,
            end: AttemptEnd::Replied(outcome.clone()),
        });
        let event = HistoryEvent::LateReply {
            outcome: outcome.clone(),
        };
        self.history(event, None, Some(command_id));
        let (Some((i, kind)), Outcome::Success { output }) = (answers, outcome) else {
            return;
        };
        if self.s.status.is_terminal() {
            return;
        }
        let newer = self.at(i).command_id();
        let counts = matches!(
            (kind, self.at(i)),
            (
                Kind::Action,
                StepState::Running { .. } | StepState::RetryWait { .. } | StepState::Held { .. }
            ) | (
                Kind::Compensation,
                StepState::Compensating { .. }
                    | StepState::CompRetryWait { .. }
                    | StepState::CompFailed { .. }
            )
        );
        if !counts {
            return;
        }
        if let Some(newer) = newer {
            self.effects.push(Effect::AttemptEnded {
                command_id: newer,
                end: AttemptEnd::Superseded,
            });
        }
        match kind {
            Kind::Action => self.action_succeeded(i, command_id, output),
            Kind::Compensation => self.compensated(i, command_id),
        }
    }

    /// Step `i`'s timer, if it is due.
    fn fire(&mut self, i: usize) {
        let now = self.ctx.now;
        let timeout = self.step(i).map(|s| s.timeout).unwrap_or_default();
        match self.at(i).clone() {
            StepState::Running {
                attempt,
                command_id,
                deadline,
            } if deadline <= now => {
                let reason = self.timed_out(i, Kind::Action, command_id, timeout);
                // Unlike a failure, a timeout leaves us not knowing whether the participant
                // applied the action: given up on, it is compensated too.
                self.action_failed(i, attempt, reason, true, true);
            }
            StepState::Compensating {
                attempt,
                command_id,
                deadline,
            } if deadline <= now => {
                let reason = self.timed_out(i, Kind::Compensation, command_id, timeout);
                self.compensation_failed(i, attempt, reason);
            }
            StepState::RetryWait { attempt, at, .. } if at <= now => {
                self.dispatch(i, Kind::Action, attempt.saturating_add(1));
            }
            StepState::CompRetryWait { attempt, at } if at <= now => {
                self.dispatch(i, Kind::Compensation, attempt.saturating_add(1));
            }
            _ => {}
        }
    }

    fn timed_out(
        &mut self,
        i: usize,
        kind: Kind,
        command_id: Uuid,
        timeout: std::time::Duration,
    ) -> String {
        self.effects.push(Effect::AttemptEnded {
            command_id,
            end: AttemptEnd::TimedOut,
        });
        let event = HistoryEvent::StepTimedOut {
            kind,
            timeout_ms: millis(timeout),
        };
        self.history(event, Some(i), Some(command_id));
        format!(
            "{} of step {} got no reply within {}",
            kind.as_str(),
            self.name(i),
            humantime::format_duration(timeout)
        )
    }

    // ---- per-step transitions ----

    fn action_succeeded(&mut self, i: usize, command_id: Uuid, output: Value) {
        let event = HistoryEvent::StepSucceeded {
            output: output.clone(),
        };
        self.history(event, Some(i), Some(command_id));
        self.effects.push(Effect::SaveOutput { step: i, output });
        self.set(i, StepState::Succeeded);
    }

    fn action_failed(&mut self, i: usize, attempt: u32, reason: String, retry: bool, maybe: bool) {
        let max = self.step(i).map_or(1, |s| s.retry.max_attempts);
        let gave_up = if maybe {
            StepState::Unknown
        } else {
            StepState::Failed
        };
        if self.s.turned {
            // Awaited after the saga turned: no new attempts.
            self.set(i, gave_up);
        } else if self.g.is_after_pivot(i) || (retry && attempt < max) {
            // Past the pivot the only way is forwards.
            self.retry_later(i, Kind::Action, attempt, &reason, maybe);
        } else {
            self.set(i, gave_up);
            self.turn(i, &reason, attempt);
        }
    }

    fn compensated(&mut self, i: usize, command_id: Uuid) {
        self.history(HistoryEvent::StepCompensated, Some(i), Some(command_id));
        self.set(i, StepState::Compensated);
    }

    fn compensation_failed(&mut self, i: usize, attempt: u32, reason: String) {
        if attempt >= self.g.def.compensation_max_attempts {
            // The saga stops for an operator once nothing independent of this step can run
            // (`derive_status`).
            self.set(i, StepState::CompFailed { attempt, reason });
        } else {
            self.retry_later(i, Kind::Compensation, attempt, &reason, false);
        }
    }

    fn retry_later(&mut self, i: usize, kind: Kind, attempt: u32, reason: &str, timed_out: bool) {
        let next_attempt = attempt.saturating_add(1);
        let delay = self
            .step(i)
            .map(|s| s.retry.backoff(next_attempt, self.ctx.jitter))
            .unwrap_or_default();
        let at = later(self.ctx.now, delay);
        self.set(
            i,
            match kind {
                Kind::Action => StepState::RetryWait {
                    attempt,
                    at,
                    timed_out,
                },
                Kind::Compensation => StepState::CompRetryWait { attempt, at },
            },
        );
        let event = HistoryEvent::RetryScheduled {
            kind,
            next_attempt,
            delay_ms: millis(delay),
            reason: reason.to_owned(),
        };
        self.history(event, Some(i), None);
    }

    /// Step `i` failed for good at or before the pivot: the saga turns around.
    fn turn(&mut self, i: usize, reason: &str, attempts: u32) {
        if self.s.turned {
            return;
        }
        self.s.turned = true;
        self.s.error = Some(format!("step {} failed: {reason}", self.name(i)));
        let event = HistoryEvent::CompensationStarted {
            reason: reason.to_owned(),
            attempts: Some(attempts),
        };
        self.history(event, Some(i), None);
        // Between attempts nothing is out: no new attempt goes; whether the step may have been
        // applied is what its last attempt said.
        for st in &mut self.s.steps {
            if let StepState::RetryWait { timed_out, .. } = st {
                *st = if *timed_out {
                    StepState::Unknown
                } else {
                    StepState::Failed
                };
            }
        }
    }

    /// The outputs this transition has saved so far (see [`Facts`]).
    fn saved(&self) -> Vec<(usize, &Value)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::SaveOutput { step, output } => Some((*step, output)),
                _ => None,
            })
            .collect()
    }

    /// Sends attempt `attempt` of step `i`'s `kind`, or fails the step if its input cannot be
    /// built (not retried: the data will not change).
    fn dispatch(&mut self, i: usize, kind: Kind, attempt: u32) {
        match self.facts.command_input(i, kind, &self.saved()) {
            Ok(input) => self.send(i, kind, attempt, input),
            Err(e) => {
                let reason = format!("{} input: {e}", kind.as_str());
                self.cannot_build(i, kind, attempt.saturating_sub(1), reason);
            }
        }
    }

    /// Step `i`'s `kind` cannot be sent (its condition or input failed to evaluate).
    fn cannot_build(&mut self, i: usize, kind: Kind, attempts: u32, reason: String) {
        match kind {
            Kind::Action => {
                let event = HistoryEvent::StepFailed {
                    reason: reason.clone(),
                    retryable: false,
                };
                self.history(event, Some(i), None);
                if self.g.is_after_pivot(i) {
                    self.set(
                        i,
                        StepState::Held {
                            attempt: attempts,
                            reason,
                        },
                    );
                } else {
                    self.set(i, StepState::Failed);
                    self.turn(i, &reason, attempts);
                }
            }
            Kind::Compensation => {
                let event = HistoryEvent::CompensationFailed {
                    reason: reason.clone(),
                };
                self.history(event, Some(i), None);
                self.set(
                    i,
                    StepState::CompFailed {
                        attempt: attempts,
                        reason,
                    },
                );
            }
        }
    }

    fn send(&mut self, i: usize, kind: Kind, attempt: u32, input: Option<Value>) {
        let command_id = command_id(self.ctx.next_command_id, self.sent);
        self.sent = self.sent.saturating_add(1);
        let timeout = self.step(i).map(|s| s.timeout).unwrap_or_default();
        let deadline = later(self.ctx.now, timeout);
        self.set(
            i,
            match kind {
                Kind::Action => StepState::Running {
                    attempt,
                    command_id,
                    deadline,
                },
                Kind::Compensation => StepState::Compensating {
                    attempt,
                    command_id,
                    deadline,
                },
            },
        );
        self.effects.push(Effect::Send(Command {
            command_id,
            step: i,
            kind,
            attempt,
            deadline,
            input,
        }));
        self.history(
            HistoryEvent::CommandSent { kind, attempt },
            Some(i),
            Some(command_id),
        );
    }

    // ---- the saga ----

    /// Dispatches what became ready, starts the compensations whose descendants are quiet, and
    /// derives the status.
    fn settle(&mut self) {
        if self.s.status.is_terminal() || !self.s.started {
            return;
        }
        if !self.s.turned {
            self.forward();
        }
        if self.s.turned {
            self.backward();
        }
        self.derive_status();
    }

    fn ready(&self, i: usize) -> bool {
        self.g.deps(i).iter().all(|&d| {
            matches!(
                self.s.steps.get(d),
                Some(StepState::Succeeded | StepState::Skipped)
            )
        })
    }

    /// Every ready step is evaluated first (its `when`, then its input), skipping cascading to
    /// the steps waiting for it; only if none failed at or before the pivot do the commands go,
    /// all in this transition.
    fn forward(&mut self) {
        let n = self.s.steps.len();
        let mut chosen: Vec<(usize, Option<Value>)> = Vec::new();
        let mut evaluated = vec![false; n];
        loop {
            let mut skipped = false;
            for i in 0..n {
                if self.s.turned {
                    break;
                }
                let fresh = evaluated.get(i) == Some(&false);
                if !fresh || *self.at(i) != StepState::Pending || !self.ready(i) {
                    continue;
                }
                if let Some(e) = evaluated.get_mut(i) {
                    *e = true;
                }
                let input = match self.facts.condition(i, &self.saved()) {
                    Ok(Some(false)) => {
                        self.set(i, StepState::Skipped);
                        self.history(HistoryEvent::StepSkipped, Some(i), None);
                        self.effects.push(Effect::SaveOutput {
                            step: i,
                            output: Value::Null,
                        });
                        skipped = true;
                        continue;
                    }
                    Err(e) => Err(e),
                    Ok(_) => self
                        .facts
                        .command_input(i, Kind::Action, &self.saved())
                        .map_err(|e| format!("action input: {e}")),
                };
                match input {
                    Ok(input) => chosen.push((i, input)),
                    Err(reason) => self.cannot_build(i, Kind::Action, 0, reason),
                }
            }
            if !skipped {
                break;
            }
        }
        if self.s.turned {
            return;
        }
        for (i, input) in chosen {
            self.send(i, Kind::Action, 1, input);
        }
    }

    fn needs_compensation(&self, i: usize) -> bool {
        matches!(self.at(i), StepState::Succeeded | StepState::Unknown) && self.has_compensation(i)
    }

    /// Nothing of step `i` is in flight or left to undo.
    fn quiet(&self, i: usize) -> bool {
        !self.at(i).is_current() && !self.needs_compensation(i)
    }

    fn backward(&mut self) {
        for i in (0..self.s.steps.len()).rev() {
            if self.needs_compensation(i) && self.g.descendants(i).iter().all(|&d| self.quiet(d)) {
                self.dispatch(i, Kind::Compensation, 1);
            }
        }
    }

    /// The steps that stop the saga for an operator: compensations that failed for good, steps
    /// past the pivot whose command cannot be built.
    fn blocking(&self) -> Vec<usize> {
        self.s
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, StepState::CompFailed { .. } | StepState::Held { .. }))
            .map(|(i, _)| i)
            .collect()
    }

    fn derive_status(&mut self) {
        let steps = &self.s.steps;
        let active = steps.iter().any(StepState::in_flight);
        let new = if active {
            if self.s.turned {
                Status::Compensating
            } else {
                Status::Running
            }
        } else if !self.s.turned {
            if steps
                .iter()
                .all(|s| matches!(s, StepState::Succeeded | StepState::Skipped))
            {
                Status::Completed
            } else {
                // Held steps, or steps waiting for steps that never come.
                Status::NeedsOperator
            }
        } else if (0..steps.len()).all(|i| self.quiet(i)) {
            Status::Compensated
        } else {
            Status::NeedsOperator
        };
        let old = self.s.status;
        self.s.status = new;
        if new == old {
            return;
        }
        match new {
            Status::Completed => {
                self.s.error = None;
                self.history(HistoryEvent::SagaCompleted, None, None);
            }
            Status::Compensated => {
                self.history(HistoryEvent::SagaCompensated, None, None);
            }
            Status::NeedsOperator => {
                let (at, reason) = self.why_stopped();
                self.history(HistoryEvent::NeedsOperator { reason }, at, None);
            }
            Status::Running | Status::Compensating | Status::Resolved => return,
        }
        self.effects.push(Effect::Lifecycle(new));
    }

    /// Sets the saga's error to why it needs an operator; returns the step and the last reason.
    fn why_stopped(&mut self) -> (Option<usize>, String) {
        let first = self.blocking().first().copied();
        let (error, reason) = match first.map(|i| (i, self.at(i).clone())) {
            Some((i, StepState::CompFailed { attempt: 0, reason })) => (
                format!(
                    "compensation of step {} cannot be sent: {reason}",
                    self.name(i)
                ),
                reason,
            ),
            Some((i, StepState::CompFailed { attempt, reason })) => (
                format!(
                    "compensation of step {} failed {attempt} times, last: {reason}",
                    self.name(i)
                ),
                reason,
            ),
            Some((i, StepState::Held { reason, .. })) => (
                format!("step {} cannot be sent: {reason}", self.name(i)),
                reason,
            ),
            _ => {
                let never: Vec<String> = (0..self.s.steps.len())
                    .filter(|&i| *self.at(i) == StepState::Pending)
                    .map(|i| self.name(i))
                    .collect();
                let reason = format!(
                    "steps {} can never run: they wait for steps that do not exist or for each \
                     other",
                    never.join(", ")
                );
                (reason.clone(), reason)
            }
        };
        self.s.error = Some(error);
        (first, reason)
    }

    // ---- repairs ----

    /// The step a repair acts on: the named one, or the only current one.
    fn target(&self, named: Option<usize>) -> Result<usize, Refused> {
        if let Some(i) = named {
            return match self.at(i) {
                st if st.is_current() => Ok(i),
                st => Err(Refused(format!(
                    "step {} is {}: only a step that is running, waiting to retry or blocked \
                     can be retried or skipped",
                    self.name(i),
                    st.as_str()
                ))),
            };
        }
        let current: Vec<usize> = self.s.current().collect();
        match current.as_slice() {
            [i] => Ok(*i),
            [] => Err(Refused(
                "no step is running, waiting to retry or blocked".into(),
            )),
            many => Err(Refused(format!(
                "steps {} are current: name the step to repair",
                many.iter()
                    .map(|&i| self.name(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn operator_action(&mut self, repair: &Repair, i: usize, kind: Kind, by: &Operator) {
        self.operator_action_at(repair, Some(i), kind, by);
    }

    fn operator_action_at(
        &mut self,
        repair: &Repair,
        at: Option<usize>,
        kind: Kind,
        by: &Operator,
    ) {
        let event = HistoryEvent::OperatorAction {
            action: repair.clone(),
            actor: by.actor.clone(),
            reason: by.reason.clone(),
            kind,
        };
        self.history(event, at, None);
    }

    /// Whatever the repair, a command of step `i` still in flight is abandoned: its reply, if it
    /// ever comes, is recorded as late and changes nothing.
    fn abandon(&mut self, i: usize) {
        if let Some(command_id) = self.at(i).command_id() {
            self.effects.push(Effect::AttemptEnded {
                command_id,
                end: AttemptEnd::Superseded,
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::definition::RetryPolicy;
    use crate::engine::HistoryKind;
    use serde_json::json;
    use std::collections::HashMap;
    use std::time::Duration;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    /// Steps as (name, after, compensated?); `after` None: the previous step.
    pub(crate) fn graph_def(steps: &[(&str, Option<&[usize]>, bool)], pivot: usize) -> Definition {
        Definition {
            name: "g".into(),
            version: 1,
            description: String::new(),
            steps: steps
                .iter()
                .map(|(name, after, comp)| Step {
                    name: (*name).into(),
                    participant: format!("p_{name}"),
                    action: format!("do_{name}"),
                    compensation: comp.then(|| format!("undo_{name}")),
                    timeout: Duration::from_secs(10),
                    retry: RetryPolicy {
                        max_attempts: 2,
                        initial_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(1),
                        multiplier: 2.0,
                    },
                    after: after.map(<[usize]>::to_vec),
                    when: None,
                    input: None,
                    compensation_input: None,
                })
                .collect(),
            pivot,
            compensation_max_attempts: 2,
        }
    }

    #[test]
    fn data_facts_evaluate_a_definitions_conditions_and_mappings_on_the_sagas_data() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas/food_delivery.toml");
        let def =
            crate::definition::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        let at = |name: &str| def.step_index(name).unwrap();
        let mut outputs = vec![None; def.steps.len()];
        outputs[at("create_order")] = Some(json!({"order_id": "o-1"}));
        outputs[at("authorize_payment")] = Some(json!({"authorization": "au-9"}));
        let facts = |input: &Value| {
            let data = crate::expr::Data {
                input,
                saga_id: Uuid::nil(),
                outputs: &outputs,
            };
            (
                DataFacts { def: &def, data }.condition(at("redeem_coupon"), &[]),
                DataFacts { def: &def, data }.command_input(
                    at("authorize_payment"),
                    Kind::Action,
                    &[],
                ),
                DataFacts { def: &def, data }.command_input(
                    at("authorize_payment"),
                    Kind::Compensation,
                    &[],
                ),
                DataFacts { def: &def, data }.condition(at("create_order"), &[]),
            )
        };
        let with = json!({"coupon": "TEN", "amount_cents": 4200});
        let (when, input, undo, none) = facts(&with);
        assert_eq!(when, Ok(Some(true)));
        assert_eq!(
            input,
            Ok(Some(
                json!({"order_id": "o-1", "amount_cents": 4200, "currency": "KRW"})
            ))
        );
        assert_eq!(undo, Ok(Some(json!({"authorization": "au-9"}))));
        assert_eq!(none, Ok(None), "a step without `when` has no condition");
        let (when, input, _, _) = facts(&json!({"coupon": ""}));
        assert_eq!(when, Ok(Some(false)));
        // A field the mapping reads is missing: an error naming the step, not a panic.
        let err = input.unwrap_err();
        assert!(err.starts_with("step authorize_payment: "), "{err}");

        // An output saved by the transition asking wins over the stored data.
        let input = json!({"amount_cents": 1});
        let data = crate::expr::Data {
            input: &input,
            saga_id: Uuid::nil(),
            outputs: &outputs,
        };
        let fresh = json!({"order_id": "o-2"});
        assert_eq!(
            DataFacts { def: &def, data }.command_input(
                at("authorize_payment"),
                Kind::Action,
                &[(at("create_order"), &fresh)]
            ),
            Ok(Some(
                json!({"order_id": "o-2", "amount_cents": 1, "currency": "KRW"})
            ))
        );
    }

    #[test]
    fn a_reply_output_reaches_the_mapped_inputs_of_the_steps_it_releases() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas/food_delivery.toml");
        let def =
            crate::definition::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        let at = |name: &str| def.step_index(name).unwrap();
        let input = json!({"customer_id": "c", "shop_id": "s", "items": [], "amount_cents": 5});
        let outputs = vec![None; def.steps.len()];
        let facts = DataFacts {
            def: &def,
            data: crate::expr::Data {
                input: &input,
                saga_id: Uuid::nil(),
                outputs: &outputs,
            },
        };
        let ctx = |n: u128| Ctx {
            now: OffsetDateTime::UNIX_EPOCH,
            next_command_id: Uuid::from_u128(n),
            jitter: 0.5,
        };
        let g = Graph::new(&def);
        let started = g.apply(&GraphState::new(&def), Event::Start, ctx(1), &facts);
        let order = at("create_order");
        let t = g.apply(
            &started.state,
            Event::Reply {
                command_id: Uuid::from_u128(1),
                outcome: Outcome::Success {
                    output: json!({"order_id": "o-9"}),
                },
                answers: Some((order, Kind::Action)),
            },
            ctx(2),
            &facts,
        );
        let sent: Vec<(usize, Option<Value>)> = t
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(c) => Some((c.step, c.input.clone())),
                _ => None,
            })
            .collect();
        assert!(
            sent.contains(&(
                at("authorize_payment"),
                Some(json!({"order_id": "o-9", "amount_cents": 5, "currency": "KRW"}))
            )),
            "{sent:?}"
        );
        assert_eq!(
            sent.len(),
            2,
            "payment and shop; no coupon in the input: {sent:?}"
        );
    }

    /// a -> (b ∥ c) -> d (pivot) -> e
    fn diamond() -> Definition {
        graph_def(
            &[
                ("a", Some(&[]), true),
                ("b", Some(&[0]), true),
                ("c", Some(&[0]), true),
                ("d", Some(&[1, 2]), true),
                ("e", Some(&[3]), false),
            ],
            3,
        )
    }

    #[derive(Default)]
    struct Script {
        conditions: HashMap<usize, Result<bool, String>>,
        inputs: HashMap<(usize, Kind), Result<Value, String>>,
    }

    impl Facts for Script {
        fn condition(&self, step: usize, _: &[(usize, &Value)]) -> Result<Option<bool>, String> {
            self.conditions.get(&step).cloned().transpose()
        }
        fn command_input(
            &self,
            step: usize,
            kind: Kind,
            _: &[(usize, &Value)],
        ) -> Result<Option<Value>, String> {
            self.inputs.get(&(step, kind)).cloned().transpose()
        }
    }

    struct H<'a> {
        g: Graph<'a>,
        s: GraphState,
        now: OffsetDateTime,
        ids: u128,
        facts: Script,
    }

    impl<'a> H<'a> {
        fn new(def: &'a Definition) -> Self {
            H {
                g: Graph::new(def),
                s: GraphState::new(def),
                now: T0,
                ids: 0,
                facts: Script::default(),
            }
        }

        fn ctx(&mut self) -> Ctx {
            self.ids += 1;
            Ctx {
                now: self.now,
                next_command_id: Uuid::from_u128(self.ids),
                jitter: 0.0,
            }
        }

        fn ix(&self, name: &str) -> usize {
            self.g.def().step_index(name).unwrap()
        }

        fn st(&self, name: &str) -> &StepState {
            &self.s.steps[self.ix(name)]
        }

        fn ev(&mut self, e: Event) -> Vec<Effect> {
            let ctx = self.ctx();
            let t = self.g.apply(&self.s, e, ctx, &self.facts);
            self.s = t.state;
            t.effects
        }

        fn start(&mut self) -> Vec<String> {
            sends(self.g.def(), &self.ev(Event::Start))
        }

        fn cmd(&self, name: &str) -> Uuid {
            self.st(name)
                .command_id()
                .unwrap_or_else(|| panic!("{name} has no command out: {:?}", self.st(name)))
        }

        fn reply(&mut self, name: &str, outcome: Outcome) -> Vec<String> {
            let command_id = self.cmd(name);
            let e = self.ev(Event::Reply {
                command_id,
                outcome,
                answers: None,
            });
            sends(self.g.def(), &e)
        }

        fn ok(&mut self, name: &str) -> Vec<String> {
            let out = json!({ "by": name });
            self.reply(name, Outcome::Success { output: out })
        }

        fn fail(&mut self, name: &str) -> Vec<String> {
            let reason = "no".into();
            self.reply(
                name,
                Outcome::Failure {
                    reason,
                    retryable: false,
                },
            )
        }

        fn transient(&mut self, name: &str) -> Vec<String> {
            let reason = "busy".into();
            self.reply(
                name,
                Outcome::Failure {
                    reason,
                    retryable: true,
                },
            )
        }

        /// Moves the clock to the saga's wake-up time and delivers the timer.
        fn tick(&mut self) -> Vec<String> {
            self.now = self.s.wake_at().expect("a timer is due");
            let e = self.ev(Event::Timer);
            sends(self.g.def(), &e)
        }
    }

    fn sends(def: &Definition, effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(c) => Some(format!(
                    "{}:{}:{}",
                    def.steps[c.step].name,
                    c.kind.as_str(),
                    c.attempt
                )),
                _ => None,
            })
            .collect()
    }

    fn kinds(effects: &[Effect]) -> Vec<HistoryKind> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::History { event, .. } => Some(event.kind()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ready_steps_leave_together_each_with_its_own_command_id() {
        let def = diamond();
        let mut h = H::new(&def);
        assert_eq!(h.start(), ["a:action:1"]);
        let e = h.ev(Event::Reply {
            command_id: h.cmd("a"),
            outcome: Outcome::Success { output: json!({}) },
            answers: None,
        });
        assert_eq!(sends(&def, &e), ["b:action:1", "c:action:1"]);
        let ids: Vec<Uuid> = e
            .iter()
            .filter_map(|e| match e {
                Effect::Send(c) => Some(c.command_id),
                _ => None,
            })
            .collect();
        // The first is the driver's id; the second is derived from it, the same on replay.
        assert_eq!(ids[0], Uuid::from_u128(2));
        assert_eq!(ids[1], command_id(Uuid::from_u128(2), 1));
        assert_ne!(ids[0], ids[1]);
        assert_eq!(h.s.status, Status::Running);
    }

    #[test]
    fn a_join_waits_for_every_branch() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        assert!(h.ok("c").is_empty());
        assert_eq!(*h.st("d"), StepState::Pending);
        assert_eq!(h.ok("b"), ["d:action:1"]);
        assert_eq!(h.ok("d"), ["e:action:1"]);
        assert!(h.ok("e").is_empty());
        assert_eq!(h.s.status, Status::Completed);
        assert_eq!(h.s.wake_at(), None);
    }

    #[test]
    fn a_step_whose_condition_is_false_is_skipped_never_sent_nor_compensated() {
        let def = diamond();
        let mut h = H::new(&def);
        h.facts.conditions.insert(2, Ok(false));
        h.start();
        let e = h.ev(Event::Reply {
            command_id: h.cmd("a"),
            outcome: Outcome::Success { output: json!({}) },
            answers: None,
        });
        assert_eq!(sends(&def, &e), ["b:action:1"]);
        assert!(kinds(&e).contains(&HistoryKind::StepSkipped));
        assert!(e.contains(&Effect::SaveOutput {
            step: 2,
            output: Value::Null
        }));
        assert_eq!(*h.st("c"), StepState::Skipped);
        // The join counts a skipped step as done.
        assert_eq!(h.ok("b"), ["d:action:1"]);
        assert_eq!(h.fail("d"), ["b:compensation:1"]);
        assert_eq!(h.ok("b"), ["a:compensation:1"]);
        assert!(h.ok("a").is_empty());
        assert_eq!(h.s.status, Status::Compensated);
        assert_eq!(*h.st("c"), StepState::Skipped);
    }

    #[test]
    fn skipping_cascades_and_a_condition_is_evaluated_once() {
        // a -> b(when) -> c: when b is skipped, c is ready in the same transition.
        let def = graph_def(
            &[("a", None, true), ("b", None, true), ("c", None, false)],
            2,
        );
        let mut h = H::new(&def);
        h.facts.conditions.insert(1, Ok(false));
        h.start();
        assert_eq!(h.ok("a"), ["c:action:1"]);
        // Changing the answer later changes nothing: it is never asked again.
        h.facts.conditions.insert(1, Ok(true));
        h.ok("c");
        assert_eq!(h.s.status, Status::Completed);
        assert_eq!(*h.st("b"), StepState::Skipped);
    }

    #[test]
    fn a_condition_or_input_that_fails_to_evaluate_fails_the_step_for_good() {
        for (cond, input) in [
            (Some(Err("no such key `coupon`".to_string())), None),
            (None, Some(Err("`order_id` missing".to_string()))),
        ] {
            let def = diamond();
            let mut h = H::new(&def);
            if let Some(c) = cond.clone() {
                h.facts.conditions.insert(2, c);
            }
            if let Some(i) = input.clone() {
                h.facts.inputs.insert((2, Kind::Action), i);
            }
            h.start();
            // Nothing goes out: the saga turns at once and undoes `a`.
            assert_eq!(h.ok("a"), ["a:compensation:1"]);
            assert_eq!(*h.st("b"), StepState::Pending);
            assert_eq!(*h.st("c"), StepState::Failed);
            let error = h.s.error.clone().unwrap();
            assert!(error.contains("step c failed"), "{error}");
            assert!(
                error.contains("missing") || error.contains("coupon"),
                "{error}"
            );
            h.ok("a");
            assert_eq!(h.s.status, Status::Compensated);
        }
    }

    #[test]
    fn mapped_inputs_travel_in_the_command() {
        let def = diamond();
        let mut h = H::new(&def);
        h.facts
            .inputs
            .insert((0, Kind::Action), Ok(json!({"amount": 5})));
        h.facts
            .inputs
            .insert((0, Kind::Compensation), Ok(json!({"refund": 5})));
        let e = h.ev(Event::Start);
        let Some(Effect::Send(c)) = e.iter().find(|e| matches!(e, Effect::Send(_))) else {
            panic!("{e:?}")
        };
        assert_eq!(c.input, Some(json!({"amount": 5})));
        h.ok("a");
        h.fail("b");
        h.ok("c");
        h.ok("c");
        let id = h.cmd("a");
        assert!(matches!(h.st("a"), StepState::Compensating { .. }), "{id}");
    }

    #[test]
    fn a_failure_in_one_branch_awaits_its_sibling_then_compensates_it_after_a_success() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        // b fails for good while c is out: nothing is undone yet, nothing new goes.
        assert!(h.fail("b").is_empty());
        assert_eq!(h.s.status, Status::Compensating);
        assert!(matches!(h.st("c"), StepState::Running { .. }));
        // c succeeds after all: it is undone first, then a.
        assert_eq!(h.ok("c"), ["c:compensation:1"]);
        assert_eq!(h.ok("c"), ["a:compensation:1"]);
        h.ok("a");
        assert_eq!(h.s.status, Status::Compensated);
        assert_eq!(*h.st("b"), StepState::Failed);
    }

    #[test]
    fn an_awaited_sibling_that_fails_is_not_compensated_and_is_not_retried() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        h.fail("b");
        // A retryable failure: the saga has turned, so no new attempt.
        assert_eq!(h.transient("c"), ["a:compensation:1"]);
        assert_eq!(*h.st("c"), StepState::Failed);
        h.ok("a");
        assert_eq!(h.s.status, Status::Compensated);
    }

    #[test]
    fn an_awaited_sibling_whose_deadline_passes_is_compensated() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        h.fail("b");
        assert_eq!(h.tick(), ["c:compensation:1"]);
        assert_eq!(h.ok("c"), ["a:compensation:1"]);
    }

    #[test]
    fn a_sibling_between_attempts_when_the_saga_turns_gets_no_new_attempt() {
        let mut def = diamond();
        def.steps[2].timeout = Duration::from_secs(3);
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        // c times out once (maybe applied) and waits to retry; b fails for good.
        h.now = h.s.steps[2].wake_at().unwrap();
        let e = h.ev(Event::Timer);
        assert!(sends(&def, &e).is_empty());
        assert!(matches!(
            h.st("c"),
            StepState::RetryWait {
                timed_out: true,
                ..
            }
        ));
        assert_eq!(h.fail("b"), ["c:compensation:1"]);
        assert_eq!(
            *h.st("c"),
            StepState::Compensating {
                attempt: 1,
                command_id: h.cmd("c"),
                deadline: h.now + time::Duration::seconds(3)
            }
        );
    }

    #[test]
    fn a_timer_that_turns_the_saga_sends_no_retry_due_at_the_same_time() {
        let mut def = diamond();
        def.steps[2].retry.max_attempts = 1;
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        // b waits to retry; c's only attempt runs out; both are due at the next timer.
        assert!(h.transient("b").is_empty());
        h.now = T0 + time::Duration::seconds(10);
        let e = h.ev(Event::Timer);
        assert_eq!(sends(&def, &e), ["c:compensation:1"]);
        assert_eq!(*h.st("b"), StepState::Failed);
        assert_eq!(
            *h.st("c"),
            StepState::Compensating {
                attempt: 1,
                command_id: h.cmd("c"),
                deadline: h.now + time::Duration::seconds(10)
            }
        );
    }

    #[test]
    fn compensation_runs_in_reverse_across_the_join_branches_in_parallel() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        h.ok("b");
        h.ok("c");
        // The pivot fails for good: both branches are undone together, a only after both.
        assert_eq!(h.fail("d"), ["c:compensation:1", "b:compensation:1"]);
        assert!(h.ok("b").is_empty());
        assert_eq!(h.ok("c"), ["a:compensation:1"]);
        h.ok("a");
        assert_eq!(h.s.status, Status::Compensated);
    }

    #[test]
    fn an_exhausted_compensation_stops_for_an_operator_once_independent_ones_ran() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        h.ok("b");
        h.ok("c");
        h.fail("d");
        // b's compensation fails twice (the maximum) while c's is still out.
        h.fail("b");
        assert_eq!(h.tick(), ["b:compensation:2"]);
        let e = h.ev(Event::Reply {
            command_id: h.cmd("b"),
            outcome: Outcome::Failure {
                reason: "locked".into(),
                retryable: true,
            },
            answers: None,
        });
        assert!(!kinds(&e).contains(&HistoryKind::NeedsOperator));
        assert_eq!(h.s.status, Status::Compensating);
        // c is undone; a is not (it depends on b's), and the saga waits for an operator.
        let e = h.ev(Event::Reply {
            command_id: h.cmd("c"),
            outcome: Outcome::Success { output: json!({}) },
            answers: None,
        });
        assert!(sends(&def, &e).is_empty());
        assert!(e.contains(&Effect::Lifecycle(Status::NeedsOperator)));
        assert_eq!(h.s.status, Status::NeedsOperator);
        assert_eq!(h.s.wake_at(), None);
        assert_eq!(*h.st("a"), StepState::Succeeded);
        assert_eq!(
            h.s.error.as_deref(),
            Some("compensation of step b failed 2 times, last: locked")
        );
        // Retrying it by hand carries on where it stopped.
        let by = Operator {
            actor: "ops".into(),
            reason: "unlocked".into(),
        };
        let ctx = h.ctx();
        let t =
            h.g.repair(&h.s, Repair::RetryNow, None, &by, ctx, &NoData)
                .unwrap();
        assert_eq!(sends(&def, &t.effects), ["b:compensation:3"]);
        assert_eq!(t.state.status, Status::Compensating);
    }

    #[test]
    fn a_compensation_whose_input_cannot_be_built_needs_an_operator() {
        let def = diamond();
        let mut h = H::new(&def);
        h.facts
            .inputs
            .insert((1, Kind::Compensation), Err("no authorization".into()));
        h.start();
        h.ok("a");
        h.ok("b");
        assert!(h.fail("c").is_empty());
        assert_eq!(h.s.status, Status::NeedsOperator);
        assert!(h.s.error.as_deref().unwrap().contains("cannot be sent"));
    }

    #[test]
    fn after_the_pivot_steps_are_retried_until_they_succeed() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        h.ok("b");
        h.ok("c");
        h.ok("d");
        for attempt in 2..7 {
            // Even a "definitive" failure, even a timeout, and beyond max_attempts.
            if attempt % 2 == 0 {
                assert!(h.fail("e").is_empty());
            } else {
                assert!(h.tick().is_empty());
            }
            assert_eq!(h.tick(), [format!("e:action:{attempt}")]);
        }
        h.ok("e");
        assert_eq!(h.s.status, Status::Completed);
        assert!(h.s.steps.iter().all(|s| *s == StepState::Succeeded));
    }

    #[test]
    fn after_the_pivot_an_input_that_cannot_be_built_holds_the_step_for_an_operator() {
        let def = diamond();
        let mut h = H::new(&def);
        h.facts.inputs.insert((4, Kind::Action), Err("bad".into()));
        h.start();
        h.ok("a");
        h.ok("b");
        h.ok("c");
        let e = h.ev(Event::Reply {
            command_id: h.cmd("d"),
            outcome: Outcome::Success { output: json!({}) },
            answers: None,
        });
        assert!(sends(&def, &e).is_empty());
        assert!(matches!(h.st("e"), StepState::Held { .. }));
        assert_eq!(h.s.status, Status::NeedsOperator);
        let by = Operator {
            actor: "ops".into(),
            reason: "fixed the data".into(),
        };
        h.facts.inputs.clear();
        let ctx = h.ctx();
        let t =
            h.g.repair(&h.s, Repair::RetryNow, Some("e"), &by, ctx, &h.facts)
                .unwrap();
        assert_eq!(sends(&def, &t.effects), ["e:action:1"]);
        assert_eq!(t.state.status, Status::Running);
    }

    #[test]
    fn the_timer_is_the_earliest_deadline_of_any_step() {
        let mut def = diamond();
        def.steps[2].timeout = Duration::from_secs(3);
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        assert_eq!(h.s.wake_at(), Some(T0 + time::Duration::seconds(3)));
        // Only c is due; b is left alone.
        let e = h.tick();
        assert!(e.is_empty());
        assert!(matches!(h.st("b"), StepState::Running { .. }));
        assert!(matches!(h.st("c"), StepState::RetryWait { .. }));
        let at = h.s.steps[2].wake_at().unwrap();
        assert_eq!(h.s.wake_at(), Some(at));
        assert_eq!(h.tick(), ["c:action:2"]);
        assert_eq!(h.s.wake_at(), Some(at + time::Duration::seconds(3)));
    }

    #[test]
    fn late_and_duplicate_replies_are_recorded_and_change_nothing_but_a_late_success() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        let first_b = h.cmd("b");
        h.now = T0 + time::Duration::seconds(10);
        h.ev(Event::Timer);
        // Both timed out; b's and c's retries are pending.
        assert!(matches!(h.st("b"), StepState::RetryWait { .. }));
        let before = h.s.clone();
        let late_failure = h.ev(Event::Reply {
            command_id: first_b,
            outcome: Outcome::Failure {
                reason: "late".into(),
                retryable: false,
            },
            answers: Some((1, Kind::Action)),
        });
        assert_eq!(kinds(&late_failure), [HistoryKind::LateReply]);
        assert_eq!(h.s, before);
        // A late success of a step being retried counts.
        let e = h.ev(Event::Reply {
            command_id: first_b,
            outcome: Outcome::Success { output: json!(1) },
            answers: Some((1, Kind::Action)),
        });
        assert_eq!(
            kinds(&e),
            [HistoryKind::LateReply, HistoryKind::StepSucceeded]
        );
        assert_eq!(*h.st("b"), StepState::Succeeded);
        // Its duplicate, or a late success of another kind, changes nothing.
        let before = h.s.clone();
        for answers in [Some((1, Kind::Action)), Some((2, Kind::Compensation)), None] {
            let e = h.ev(Event::Reply {
                command_id: first_b,
                outcome: Outcome::Success { output: json!(1) },
                answers,
            });
            assert_eq!(kinds(&e), [HistoryKind::LateReply]);
            assert_eq!(h.s, before);
        }
        // Once the saga ended, replies are only recorded.
        h.tick();
        h.ok("c");
        h.ok("d");
        h.ok("e");
        assert_eq!(h.s.status, Status::Completed);
        let done = h.s.clone();
        let e = h.ev(Event::Reply {
            command_id: first_b,
            outcome: Outcome::Success { output: json!(1) },
            answers: Some((4, Kind::Action)),
        });
        assert_eq!(kinds(&e), [HistoryKind::LateReply]);
        assert_eq!(h.s, done);
        for e in [Event::Start, Event::Timer] {
            assert!(h.ev(e).is_empty());
        }
    }

    #[test]
    fn repairs_name_the_step_when_several_are_current() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        let by = Operator {
            actor: "ops".into(),
            reason: "ticket 7".into(),
        };
        let ctx = h.ctx();
        let e =
            h.g.repair(&h.s, Repair::RetryNow, None, &by, ctx, &NoData)
                .unwrap_err();
        assert_eq!(e.0, "steps b, c are current: name the step to repair");
        let e =
            h.g.repair(&h.s, Repair::RetryNow, Some("zz"), &by, ctx, &NoData)
                .unwrap_err();
        assert!(e.0.contains("no step `zz`"), "{e}");
        let e =
            h.g.repair(&h.s, Repair::RetryNow, Some("d"), &by, ctx, &NoData)
                .unwrap_err();
        assert!(e.0.contains("step d is pending"), "{e}");

        let t =
            h.g.repair(
                &h.s,
                Repair::Skip {
                    output: json!({"by": "hand"}),
                },
                Some("c"),
                &by,
                ctx,
                &NoData,
            )
            .unwrap();
        assert!(t.effects.contains(&Effect::SaveOutput {
            step: 2,
            output: json!({"by": "hand"})
        }));
        assert!(t.effects.contains(&Effect::AttemptEnded {
            command_id: h.cmd("c"),
            end: AttemptEnd::Superseded
        }));
        h.s = t.state;
        assert_eq!(*h.st("c"), StepState::Succeeded);
        // Only b is current now: no name needed.
        let ctx = h.ctx();
        let t =
            h.g.repair(&h.s, Repair::RetryNow, None, &by, ctx, &NoData)
                .unwrap();
        assert_eq!(sends(&def, &t.effects), ["b:action:2"]);

        // Aborting undoes what is out too, in reverse order.
        let ctx = h.ctx();
        let t =
            h.g.repair(&t.state, Repair::Compensate, None, &by, ctx, &NoData)
                .unwrap();
        assert_eq!(
            sends(&def, &t.effects),
            ["c:compensation:1", "b:compensation:1"]
        );
        assert_eq!(t.state.status, Status::Compensating);
        let e =
            h.g.repair(&t.state, Repair::Resolve, None, &by, ctx, &NoData)
                .unwrap_err();
        assert!(e.0.contains("needs an operator"));
    }

    fn ops() -> Operator {
        Operator {
            actor: "ops".into(),
            reason: "ticket 9".into(),
        }
    }

    /// The diamond compensating after its pivot failed, b's compensation exhausted, c's done.
    fn stuck_on_b(def: &Definition) -> H<'_> {
        let mut h = H::new(def);
        h.start();
        h.ok("a");
        h.ok("b");
        h.ok("c");
        h.fail("d");
        h.ok("c");
        h.fail("b");
        h.tick();
        h.fail("b");
        assert_eq!(h.s.status, Status::NeedsOperator);
        h
    }

    #[test]
    fn a_late_success_of_an_exhausted_compensation_carries_the_saga_on() {
        let def = diamond();
        let mut h = stuck_on_b(&def);
        let e = h.ev(Event::Reply {
            command_id: Uuid::from_u128(999),
            outcome: Outcome::Success { output: json!({}) },
            answers: Some((1, Kind::Compensation)),
        });
        assert_eq!(sends(&def, &e), ["a:compensation:1"]);
        assert_eq!(*h.st("b"), StepState::Compensated);
        assert_eq!(h.s.status, Status::Compensating);
    }

    #[test]
    fn skipping_a_compensation_by_hand_moves_on_and_resolve_closes_a_stuck_saga() {
        let def = diamond();
        let mut h = stuck_on_b(&def);
        let ctx = h.ctx();
        let t =
            h.g.repair(
                &h.s,
                Repair::Skip {
                    output: Value::Null,
                },
                Some("b"),
                &ops(),
                ctx,
                &NoData,
            )
            .unwrap();
        assert_eq!(sends(&def, &t.effects), ["a:compensation:1"]);

        let h = stuck_on_b(&def);
        let t =
            h.g.repair(&h.s, Repair::Resolve, None, &ops(), ctx, &NoData)
                .unwrap();
        assert_eq!(t.state.status, Status::Resolved);
        assert_eq!(t.state.wake_at(), None);
        assert!(t.effects.contains(&Effect::Lifecycle(Status::Resolved)));
        let refused =
            h.g.repair(&t.state, Repair::RetryNow, Some("b"), &ops(), ctx, &NoData)
                .unwrap_err();
        assert!(refused.0.contains("resolved"), "{refused}");
    }

    #[test]
    fn compensate_is_refused_past_the_pivot_and_before_the_start() {
        let def = diamond();
        let mut h = H::new(&def);
        let ctx = h.ctx();
        let e =
            h.g.repair(&h.s, Repair::Compensate, None, &ops(), ctx, &NoData)
                .unwrap_err();
        assert!(e.0.contains("not started"), "{e}");
        h.start();
        h.ok("a");
        h.ok("b");
        h.ok("c");
        h.ok("d");
        let e =
            h.g.repair(&h.s, Repair::Compensate, None, &ops(), ctx, &NoData)
                .unwrap_err();
        assert!(e.0.contains("past its pivot (d)"), "{e}");
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let def = diamond();
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        h.fail("b");
        h.tick();
        let text = serde_json::to_string(&h.s).unwrap();
        let back: GraphState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h.s);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["status"], "compensating");
        assert_eq!(v["steps"][1], "failed");
        assert_eq!(v["steps"][0], "succeeded");
        assert_eq!(v["steps"][2]["compensating"]["attempt"], 1);
    }

    #[test]
    fn derived_command_ids_are_deterministic_and_distinct() {
        let base = Uuid::from_u128(0x0123_4567_89ab_cdef);
        let ids: Vec<Uuid> = (0..100).map(|n| command_id(base, n)).collect();
        assert_eq!(ids[0], base);
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 100);
        assert_eq!(
            ids,
            (0..100).map(|n| command_id(base, n)).collect::<Vec<_>>()
        );
        assert_eq!(ids[1].get_version_num(), 8);
    }

    #[test]
    fn steps_waiting_for_each_other_stop_the_saga_for_an_operator() {
        // Only a hand-built definition has a cycle (the loader refuses them).
        let def = graph_def(
            &[
                ("a", Some(&[]), true),
                ("b", Some(&[0, 2]), false),
                ("c", Some(&[1]), false),
            ],
            0,
        );
        let mut h = H::new(&def);
        h.start();
        h.ok("a");
        assert_eq!(h.s.status, Status::NeedsOperator);
        let error = h.s.error.as_deref().unwrap();
        assert!(error.contains("steps b, c can never run"), "{error}");
    }
}
