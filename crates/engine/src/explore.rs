//! The exhaustive checker behind `sagad check`: drives the real [`graph`](crate::graph) machine,
//! with no I/O, through every order in which replies, final failures and timeouts can arrive, and
//! fails a definition when any path breaks what a saga promises.
//!
//! The search is a depth-first walk over the machine's states, memoised on the state with command
//! ids and times left out (the machine only compares times, and the checker fires timers one at a
//! time in every order instead of by the clock). From each state it tries: every in-flight command
//! answered with a success, a retryable failure, a final failure, or its deadline passing; every
//! back-off ending; a late success of every attempt that timed out while its step is still being
//! retried; every `when` true, false and failing, every mapped input built or failing (decided
//! the first time the machine asks, then fixed for the path: the data does not change).
//!
//! So that the walk ends and stays small:
//! - attempts are capped at 2 (one retry shows "retried then succeeded" and "exhausted" alike),
//!   and a step after the pivot, which is retried forever, is assumed to succeed from its second
//!   attempt (a participant that never answers is an outage, not a definition bug);
//! - once the saga turned, states the machine treats alike from then on are one (see
//!   `World::key`), and answers the machine will not ask again are forgotten;
//! - past [`MAX_STATES`] the walk stops and the report says the definition is not proven. The
//!   cost grows with the number of branches that run at the same time: three parallel branches
//!   with conditions and mappings take a few thousand states, five a few hundred thousand.
//!
//! A path fails the check when it
//! - sends a command for a skipped step, an action after the saga turned, or an action before
//!   the steps it waits for are done;
//! - starts a compensation while a descendant is still in flight or not yet compensated, or
//!   compensates a step that did not complete;
//! - ends compensated with a completed (or unknown) compensatable step not compensated, or
//!   waits for an operator with such a step that no failed compensation holds;
//! - stops without compensating a step whose action may have been applied (its last attempt
//!   succeeded or timed out), judged from what the walk saw happen, not from the machine's
//!   states;
//! - never ends: a state repeats, the path exceeds its length bound, or the saga is running with
//!   nothing in flight.
//!
//! [`check_transition`], [`check_end`] and [`check_trace`] are those rules as functions, usable
//! on any trace (the property tests run them on random interleavings).

use std::collections::HashSet;
use std::fmt;

use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::definition::Definition;
use crate::engine::{AttemptEnd, Ctx, Event, HistoryEvent, Kind, Outcome, Status};
use crate::graph::{Effect, Facts, Graph, GraphState, StepState};

/// Which steps use data. The checker cannot know what an expression will say, only that it is
/// there: it then tries every answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shape {
    /// Step `i` has a `when`.
    pub when: Vec<bool>,
    /// Step `i` maps its action's input.
    pub input: Vec<bool>,
    /// Step `i` maps its compensation's input (by default the step's own command input).
    pub compensation_input: Vec<bool>,
}

impl Shape {
    /// Which steps of a definition have a condition or mapped inputs.
    pub fn of(def: &Definition) -> Shape {
        Shape {
            when: def.steps.iter().map(|s| s.when.is_some()).collect(),
            input: def.steps.iter().map(|s| s.input.is_some()).collect(),
            compensation_input: def
                .steps
                .iter()
                .map(|s| s.compensation_input.is_some())
                .collect(),
        }
    }

    fn has_when(&self, i: usize) -> bool {
        self.when.get(i).copied().unwrap_or(false)
    }

    fn maps(&self, i: usize, kind: Kind) -> bool {
        let action = self.input.get(i).copied().unwrap_or(false);
        match kind {
            Kind::Action => action,
            Kind::Compensation => {
                action || self.compensation_input.get(i).copied().unwrap_or(false)
            }
        }
    }
}

/// Paths longer than this never end.
const MAX_DEPTH: usize = 1_000;
/// States beyond this: the definition is too large to check exhaustively.
pub const MAX_STATES: usize = 500_000;
/// Violations kept in a report (the first ones found).
const MAX_VIOLATIONS: usize = 5;
/// Attempts explored per action and compensation.
const ATTEMPTS: u32 = 2;

const T0: OffsetDateTime = time::macros::datetime!(2000-01-01 00:00 UTC);

/// What the checker found for one definition.
#[derive(Debug, Clone)]
pub struct Report {
    pub definition: String,
    pub version: u32,
    /// Distinct states visited.
    pub states: usize,
    /// Paths' ends reached (distinct final states).
    pub ends: usize,
    /// The state budget ran out before the walk finished: the definition is not proven.
    pub bounded: bool,
    pub violations: Vec<Violation>,
    /// One row per failure point, for `--explain`.
    pub explain: Vec<ExplainRow>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && !self.bounded
    }
}

/// A broken rule and the events that lead to it from the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub message: String,
    pub path: Vec<String>,
}

/// What happens when one thing goes wrong and everything else goes well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainRow {
    /// e.g. "authorize_payment fails", "dispatch_rider times out", "compensation of x fails".
    pub failure: String,
    /// The answers of the steps' `when` in this row ("-" when the definition has none).
    pub conditions: String,
    /// Compensations in the order they start: " ∥ " within one transition, " → " between.
    pub compensations: String,
    pub status: Status,
}

/// Checks a definition (see the module documentation).
pub fn check(def: &Definition) -> Report {
    check_shape(def, &Shape::of(def))
}

/// [`check`] with the data use given explicitly.
pub fn check_shape(def: &Definition, shape: &Shape) -> Report {
    let bounded_def = capped(def);
    let g = Graph::new(&bounded_def);
    let mut x = Explorer {
        g: &g,
        shape,
        visited: Keys::default(),
        on_stack: Keys::default(),
        path: Vec::new(),
        violations: Vec::new(),
        states: 0,
        ends: 0,
        bounded: false,
        ids: 0,
    };
    let start = World {
        state: GraphState::new(&bounded_def),
        answers: Answers::new(def.steps.len()),
        late: Vec::new(),
        applied: vec![Applied::NotSent; def.steps.len()],
    };
    for (next, effects, taken) in x.step(&start, Move::Start) {
        x.visit(&start, next, &effects, taken, 0);
    }
    Report {
        definition: def.name.clone(),
        version: def.version,
        states: x.states,
        ends: x.ends,
        bounded: x.bounded,
        violations: x.violations,
        explain: explain(&g, shape),
    }
}

/// The definition the walk runs on: attempts capped (see the module documentation).
fn capped(def: &Definition) -> Definition {
    let mut d = def.clone();
    for s in &mut d.steps {
        s.retry.max_attempts = s.retry.max_attempts.min(ATTEMPTS);
    }
    d.compensation_max_attempts = d.compensation_max_attempts.min(ATTEMPTS);
    d
}

fn name(g: &Graph, i: usize) -> String {
    g.def()
        .steps
        .get(i)
        .map_or_else(|| format!("#{i}"), |s| s.name.clone())
}

fn has_compensation(g: &Graph, i: usize) -> bool {
    g.def()
        .steps
        .get(i)
        .is_some_and(|s| s.compensation.is_some())
}

/// Step `i` completed (or may have) and has a compensation that has not run.
fn owes_compensation(g: &Graph, state: &GraphState, i: usize) -> bool {
    matches!(
        state.steps.get(i),
        Some(StepState::Succeeded | StepState::Unknown)
    ) && has_compensation(g, i)
}

/// Nothing of step `i` is in flight, blocked, or left to undo.
fn quiet(g: &Graph, state: &GraphState, i: usize) -> bool {
    !state.steps.get(i).is_some_and(StepState::is_current) && !owes_compensation(g, state, i)
}

/// The rules one transition must keep. `before` and `after` are the states around it, `effects`
/// what it emitted. Operator repairs may break "no action after the saga turned" on purpose:
/// check only transitions of events.
pub fn check_transition(
    g: &Graph,
    before: &GraphState,
    effects: &[Effect],
    after: &GraphState,
) -> Result<(), String> {
    for e in effects {
        let Effect::Send(c) = e else { continue };
        let i = c.step;
        let step = name(g, i);
        let was = before.steps.get(i);
        if was == Some(&StepState::Skipped) || after.steps.get(i) == Some(&StepState::Skipped) {
            return Err(format!("a command was sent for the skipped step {step}"));
        }
        match c.kind {
            Kind::Action => {
                if before.turned {
                    return Err(format!(
                        "the action of {step} was sent after the saga turned around"
                    ));
                }
                if let Some(&d) = g.deps(i).iter().find(|&&d| {
                    !matches!(
                        after.steps.get(d),
                        Some(StepState::Succeeded | StepState::Skipped)
                    )
                }) {
                    return Err(format!(
                        "the action of {step} was sent before {} completed",
                        name(g, d)
                    ));
                }
            }
            Kind::Compensation => {
                if !has_compensation(g, i) {
                    return Err(format!(
                        "a compensation was sent for {step}, which has none"
                    ));
                }
                let starts = !matches!(
                    was,
                    Some(
                        StepState::Compensating { .. }
                            | StepState::CompRetryWait { .. }
                            | StepState::CompFailed { .. }
                    )
                );
                // The step completed before, or this very transition saw it succeed (late
                // successes included) or time out; an action that failed has nothing to undo.
                let now_done = effects.iter().any(|e| match e {
                    Effect::History {
                        event:
                            HistoryEvent::StepSucceeded { .. } | HistoryEvent::StepTimedOut { .. },
                        step,
                        ..
                    } => *step == Some(i),
                    _ => false,
                });
                let completed = match was {
                    Some(StepState::Succeeded | StepState::Unknown) => true,
                    Some(StepState::RetryWait { timed_out, .. }) => *timed_out || now_done,
                    _ => now_done,
                };
                if starts && !completed {
                    return Err(format!(
                        "the compensation of {step} started though the step {}",
                        match was {
                            Some(StepState::Running { .. }) => "failed".to_string(),
                            other => format!("was {}", other.map_or("missing", StepState::as_str)),
                        }
                    ));
                }
                if starts && let Some(&d) = g.descendants(i).iter().find(|&&d| !quiet(g, after, d))
                {
                    return Err(format!(
                        "the compensation of {step} started before {} was compensated (it is {})",
                        name(g, d),
                        after.steps.get(d).map_or("missing", StepState::as_str)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The rules a saga that stopped (ended, or waits for an operator) must keep.
pub fn check_end(g: &Graph, state: &GraphState) -> Result<(), String> {
    let owed: Vec<usize> = (0..state.steps.len())
        .filter(|&i| owes_compensation(g, state, i))
        .collect();
    match state.status {
        Status::Compensated => match owed.first() {
            Some(&i) => Err(format!(
                "the saga ended compensated but {} ({}) was not compensated",
                name(g, i),
                state.steps.get(i).map_or("missing", StepState::as_str)
            )),
            None => Ok(()),
        },
        Status::Completed => match state
            .steps
            .iter()
            .position(|s| !matches!(s, StepState::Succeeded | StepState::Skipped))
        {
            Some(i) => Err(format!(
                "the saga completed but {} is {}",
                name(g, i),
                state.steps.get(i).map_or("missing", StepState::as_str)
            )),
            None => Ok(()),
        },
        Status::NeedsOperator => {
            let blocked = |i: usize| {
                g.descendants(i).iter().any(|&d| {
                    matches!(
                        state.steps.get(d),
                        Some(StepState::CompFailed { .. } | StepState::Held { .. })
                    )
                })
            };
            match owed.iter().find(|&&i| state.turned && !blocked(i)) {
                Some(&i) => Err(format!(
                    "the saga waits for an operator but {} was left uncompensated though no \
                     failed compensation blocks it",
                    name(g, i)
                )),
                None => Ok(()),
            }
        }
        Status::Running | Status::Compensating => {
            if state.steps.iter().any(|s| s.wake_at().is_some()) {
                Ok(())
            } else {
                Err(format!(
                    "the saga is {} with nothing in flight: it never ends",
                    state.status.as_str()
                ))
            }
        }
        Status::Resolved => Ok(()),
    }
}

/// Runs [`check_transition`] over a trace (`start`, then each transition's effects and state),
/// and, if the saga stopped at its last state, [`check_end`] and the rule that every step whose
/// action may have been applied (its last attempt succeeded or timed out, as the trace's effects
/// say) was compensated, unless a failed compensation holds it.
pub fn check_trace(
    g: &Graph,
    start: &GraphState,
    trace: &[(Vec<Effect>, GraphState)],
) -> Result<(), Violation> {
    let mut before = start;
    let mut path = Vec::new();
    let mut applied = vec![Applied::NotSent; start.steps.len()];
    for (n, (effects, after)) in trace.iter().enumerate() {
        path.push(format!("transition {n}"));
        check_transition(g, before, effects, after).map_err(|message| Violation {
            message,
            path: path.clone(),
        })?;
        for e in effects {
            let seen = match e {
                Effect::History {
                    event: HistoryEvent::StepSucceeded { .. },
                    step: Some(i),
                    ..
                } => Some((*i, Applied::Maybe)),
                Effect::AttemptEnded { command_id, end } => before
                    .steps
                    .iter()
                    .position(|s| {
                        matches!(s, StepState::Running { command_id: c, .. } if c == command_id)
                    })
                    .map(|i| match end {
                        AttemptEnd::Replied(Outcome::Failure { .. }) => (i, Applied::No),
                        _ => (i, Applied::Maybe),
                    }),
                _ => None,
            };
            if let Some((i, a)) = seen
                && let Some(slot) = applied.get_mut(i)
            {
                *slot = a;
            }
        }
        before = after;
    }
    let stopped = before.status != Status::Running && before.status != Status::Compensating;
    if stopped || before.wake_at().is_none() {
        check_end(g, before)
            .and_then(|()| check_undone(g, before, &applied))
            .map_err(|message| Violation { message, path })?;
    }
    Ok(())
}

// ---- the walk ----

/// An answer the machine may get from the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Answer {
    True,
    False,
    Fails,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Answers {
    when: Vec<Option<Answer>>,
    /// Per step: the action's and the compensation's input (True: built, Fails: not).
    input: Vec<[Option<Answer>; 2]>,
}

impl Answers {
    fn new(n: usize) -> Self {
        Answers {
            when: vec![None; n],
            input: vec![[None; 2]; n],
        }
    }

    fn slot(&mut self, q: Query) -> Option<&mut Option<Answer>> {
        match q {
            Query::When(i) => self.when.get_mut(i),
            Query::Input(i, k) => self.input.get_mut(i).and_then(|s| s.get_mut(k)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    When(usize),
    Input(usize, usize),
}

/// Answers the machine from the decisions of this path; the first question without a decision
/// is noted so the walk can branch on every answer.
struct Oracle<'a> {
    shape: &'a Shape,
    answers: &'a Answers,
    undecided: std::cell::Cell<Option<Query>>,
}

impl Oracle<'_> {
    fn ask(&self, q: Query, decided: Option<Answer>) -> Answer {
        decided.unwrap_or_else(|| {
            if self.undecided.get().is_none() {
                self.undecided.set(Some(q));
            }
            Answer::True
        })
    }
}

impl Facts for Oracle<'_> {
    fn condition(&self, step: usize, _: &[(usize, &Value)]) -> Result<Option<bool>, String> {
        if !self.shape.has_when(step) {
            return Ok(None);
        }
        let decided = self.answers.when.get(step).copied().flatten();
        match self.ask(Query::When(step), decided) {
            Answer::True => Ok(Some(true)),
            Answer::False => Ok(Some(false)),
            Answer::Fails => Err("the condition fails to evaluate".into()),
        }
    }

    fn command_input(
        &self,
        step: usize,
        kind: Kind,
        _: &[(usize, &Value)],
    ) -> Result<Option<Value>, String> {
        if !self.shape.maps(step, kind) {
            return Ok(None);
        }
        let k = kind_index(kind);
        let decided = self
            .answers
            .input
            .get(step)
            .and_then(|s| s.get(k))
            .copied()
            .flatten();
        match self.ask(Query::Input(step, k), decided) {
            Answer::Fails => Err("the mapping fails to evaluate".into()),
            Answer::True | Answer::False => Ok(Some(json!({}))),
        }
    }
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Action => 0,
        Kind::Compensation => 1,
    }
}

#[derive(Debug, Clone)]
struct World {
    state: GraphState,
    answers: Answers,
    /// Attempts that timed out and may still answer late: (step, kind, command).
    late: Vec<(usize, Kind, Uuid)>,
    /// Per step, what its last action attempt says about the participant, as the walk saw it
    /// happen (not as the machine recorded it): the check that what may have been applied is
    /// undone does not trust the machine's own bookkeeping.
    applied: Vec<Applied>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    NotSent,
    /// It succeeded, or its deadline passed (maybe applied).
    Maybe,
    /// Its participant answered with a failure.
    No,
}

/// A state packed into bytes with what does not matter to the machine left out (command ids,
/// times, reasons). Attempts never exceed [`ATTEMPTS`] here, so a byte holds them.
type Key = Vec<u8>;

fn byte(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

fn answer_byte(a: Option<Answer>) -> u8 {
    match a {
        None => 0,
        Some(Answer::True) => 1,
        Some(Answer::False) => 2,
        Some(Answer::Fails) => 3,
    }
}

impl World {
    fn key(&self) -> Key {
        let n = self.state.steps.len();
        let turned = self.state.turned;
        let mut k = Vec::with_capacity(n * 5 + 2 + self.late.len() * 3);
        for (i, s) in self.state.steps.iter().enumerate() {
            // Once the saga turned, the machine treats some states alike from then on: they are
            // one state here, which keeps wide graphs walkable. Pending and Failed steps never
            // run again; an Unknown step is undone like a Succeeded one; an awaited action gets
            // no new attempt, so its number no longer matters. Attempts of a compensation that
            // failed for good and of a held step are only for the operator.
            let (tag, attempt, flag) = match s {
                StepState::Pending => (0, 0, false),
                StepState::Failed if turned => (0, 0, false),
                StepState::Skipped => (1, 0, false),
                StepState::Running { .. } if turned => (2, 0, false),
                StepState::Running { attempt, .. } => (2, *attempt, false),
                StepState::RetryWait {
                    attempt, timed_out, ..
                } => (3, *attempt, *timed_out),
                StepState::Succeeded => (4, 0, false),
                StepState::Unknown if turned => (4, 0, false),
                StepState::Failed => (5, 0, false),
                StepState::Unknown => (6, 0, false),
                StepState::Held { .. } => (7, 0, false),
                StepState::Compensating { attempt, .. } => (8, *attempt, false),
                StepState::CompRetryWait { attempt, .. } => (9, *attempt, false),
                StepState::Compensated => (10, 0, false),
                StepState::CompFailed { .. } => (11, 0, false),
            };
            let input = self.answers.input.get(i).copied().unwrap_or([None; 2]);
            k.extend([
                tag,
                u8::try_from(attempt).unwrap_or(u8::MAX),
                u8::from(flag),
                answer_byte(self.answers.when.get(i).copied().flatten()),
                answer_byte(input[0]) << 2 | answer_byte(input[1]),
            ]);
        }
        k.push(u8::from(turned));
        k.push(byte(status_index(self.state.status)));
        k.extend(self.applied.iter().map(|&a| a as u8));
        for &(i, kind, _) in &self.late {
            k.extend(u16::try_from(i).unwrap_or(u16::MAX).to_le_bytes());
            k.push(byte(kind_index(kind)));
        }
        k
    }

    /// Forgets the answers the machine will never ask for again on this path (a `when` once its
    /// step left Pending, an input once its command can no longer be sent), so that paths that
    /// differ only in them meet.
    fn forget_dead_answers(&mut self) {
        for (i, st) in self.state.steps.iter().enumerate() {
            if *st != StepState::Pending
                && let Some(w) = self.answers.when.get_mut(i)
            {
                *w = None;
            }
            let Some([action, compensation]) = self.answers.input.get_mut(i) else {
                continue;
            };
            let action_again = matches!(
                st,
                StepState::Pending | StepState::Running { .. } | StepState::RetryWait { .. }
            ) && !self.state.turned;
            if !action_again {
                *action = None;
            }
            if matches!(
                st,
                StepState::Skipped
                    | StepState::Failed
                    | StepState::Compensated
                    | StepState::CompFailed { .. }
            ) || (self.state.turned && *st == StepState::Pending)
            {
                *compensation = None;
            }
        }
    }
}

fn status_index(s: Status) -> usize {
    match s {
        Status::Running => 0,
        Status::Compensating => 1,
        Status::Completed => 2,
        Status::Compensated => 3,
        Status::NeedsOperator => 4,
        Status::Resolved => 5,
    }
}

/// FNV-1a: keys are a few dozen bytes, hashed three times per state; SipHash dominated the walk.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type Keys = HashSet<Key, std::hash::BuildHasherDefault<Fnv>>;

#[derive(Debug, Clone, Copy)]
enum Move {
    Start,
    Success(usize),
    Failure(usize, bool),
    Fire(usize),
    Late(usize, Kind, Uuid),
}

/// One event of a path, described only when a violation is reported.
#[derive(Debug, Clone)]
struct Taken {
    mv: Move,
    kind: Kind,
    attempt: u32,
    between_attempts: bool,
    decided: Vec<(Query, Answer)>,
}

impl Taken {
    fn describe(&self, g: &Graph) -> String {
        let what = |i: usize| format!("{} {} {}", name(g, i), self.kind.as_str(), self.attempt);
        let mut text = match self.mv {
            Move::Start => "start".into(),
            Move::Success(i) => format!("{} succeeds", what(i)),
            Move::Failure(i, true) => format!("{} fails (retryable)", what(i)),
            Move::Failure(i, false) => format!("{} fails", what(i)),
            Move::Fire(i) if self.between_attempts => format!("{}: back-off ends", what(i)),
            Move::Fire(i) => format!("{}: deadline passes", what(i)),
            Move::Late(i, kind, _) => format!("late success of {} {}", name(g, i), kind.as_str()),
        };
        let decided: Vec<String> = self
            .decided
            .iter()
            .map(|&(q, a)| match q {
                Query::When(i) => format!("{} when {}", name(g, i), answer_text(a)),
                Query::Input(i, 0) => format!("{} action input {}", name(g, i), input_text(a)),
                Query::Input(i, _) => {
                    format!("{} compensation input {}", name(g, i), input_text(a))
                }
            })
            .collect();
        if !decided.is_empty() {
            text.push_str(&format!(" [{}]", decided.join(", ")));
        }
        text
    }
}

/// Whether a late success of `kind` would still count for a step in `st` (the machine's rule).
fn late_counts(kind: Kind, st: Option<&StepState>) -> bool {
    match kind {
        Kind::Action => matches!(
            st,
            Some(StepState::Running { .. } | StepState::RetryWait { .. } | StepState::Held { .. })
        ),
        Kind::Compensation => matches!(
            st,
            Some(
                StepState::Compensating { .. }
                    | StepState::CompRetryWait { .. }
                    | StepState::CompFailed { .. }
            )
        ),
    }
}

struct Explorer<'a> {
    g: &'a Graph<'a>,
    shape: &'a Shape,
    visited: Keys,
    on_stack: Keys,
    path: Vec<Taken>,
    violations: Vec<Violation>,
    states: usize,
    ends: usize,
    bounded: bool,
    ids: u128,
}

impl Explorer<'_> {
    fn violation(&mut self, message: String, last: Option<&Taken>) {
        if self.violations.len() < MAX_VIOLATIONS {
            let path = self
                .path
                .iter()
                .chain(last)
                .map(|t| t.describe(self.g))
                .collect();
            self.violations.push(Violation { message, path });
        }
    }

    fn done(&self) -> bool {
        self.bounded || self.violations.len() >= MAX_VIOLATIONS
    }

    fn moves(&self, w: &World) -> Vec<Move> {
        let mut out = Vec::new();
        if w.state.status.is_terminal() {
            return out;
        }
        for (i, st) in w.state.steps.iter().enumerate() {
            match st {
                StepState::Running { attempt, .. } => {
                    out.push(Move::Success(i));
                    let after_pivot = self.g.is_after_pivot(i);
                    // Past the pivot, a second attempt is assumed to get through.
                    if after_pivot && *attempt >= ATTEMPTS {
                        continue;
                    }
                    // A retryable failure of the last attempt is a final one, and past the pivot
                    // a final failure is retried: one of the two is enough there.
                    let max = self
                        .g
                        .def()
                        .steps
                        .get(i)
                        .map_or(1, |s| s.retry.max_attempts);
                    if !after_pivot && *attempt < max && !w.state.turned {
                        out.push(Move::Failure(i, true));
                    }
                    out.push(Move::Failure(i, false));
                    out.push(Move::Fire(i));
                }
                StepState::Compensating { .. } => {
                    out.push(Move::Success(i));
                    out.push(Move::Failure(i, true));
                    out.push(Move::Fire(i));
                }
                StepState::RetryWait { .. } | StepState::CompRetryWait { .. } => {
                    out.push(Move::Fire(i));
                }
                _ => {}
            }
        }
        for &(i, kind, id) in &w.late {
            out.push(Move::Late(i, kind, id));
        }
        out
    }

    /// The transitions one move may cause: one per answer of each question the machine asks.
    fn step(&mut self, w: &World, mv: Move) -> Vec<(World, Vec<Effect>, Taken)> {
        self.ids = self.ids.wrapping_add(1);
        let mut ctx = Ctx {
            now: T0,
            next_command_id: Uuid::from_u128(self.ids),
            jitter: 0.0,
        };
        let at = match mv {
            Move::Success(i) | Move::Failure(i, _) | Move::Fire(i) | Move::Late(i, ..) => {
                w.state.steps.get(i)
            }
            Move::Start => None,
        };
        let taken = Taken {
            mv,
            kind: at.and_then(StepState::kind).unwrap_or(Kind::Action),
            attempt: at.map_or(0, |s| match s {
                StepState::Running { attempt, .. }
                | StepState::Compensating { attempt, .. }
                | StepState::RetryWait { attempt, .. }
                | StepState::CompRetryWait { attempt, .. } => *attempt,
                _ => 0,
            }),
            between_attempts: matches!(
                at,
                Some(StepState::RetryWait { .. } | StepState::CompRetryWait { .. })
            ),
            decided: Vec::new(),
        };
        let event = match mv {
            Move::Start => Some(Event::Start),
            Move::Success(_) | Move::Failure(..) => {
                let command_id = at.and_then(StepState::command_id).unwrap_or_default();
                let outcome = match mv {
                    Move::Failure(_, retryable) => Outcome::Failure {
                        reason: "no".into(),
                        retryable,
                    },
                    _ => Outcome::Success {
                        output: Value::Null,
                    },
                };
                Some(Event::Reply {
                    command_id,
                    outcome,
                    answers: None,
                })
            }
            Move::Late(i, kind, command_id) => Some(Event::Reply {
                command_id,
                outcome: Outcome::Success {
                    output: Value::Null,
                },
                answers: Some((i, kind)),
            }),
            Move::Fire(_) => {
                ctx.now = at.and_then(StepState::wake_at).unwrap_or(T0);
                None
            }
        };
        let mut out = Vec::new();
        let mut todo = vec![(w.answers.clone(), Vec::new())];
        while let Some((answers, decided)) = todo.pop() {
            let oracle = Oracle {
                shape: self.shape,
                answers: &answers,
                undecided: std::cell::Cell::new(None),
            };
            let t = match (&event, mv) {
                (Some(e), _) => self.g.apply(&w.state, e.clone(), ctx, &oracle),
                (None, Move::Fire(i)) => self.g.fire_one(&w.state, i, ctx, &oracle),
                (None, _) => continue,
            };
            if let Some(q) = oracle.undecided.get() {
                let choices: &[Answer] = match q {
                    Query::When(_) => &[Answer::True, Answer::False, Answer::Fails],
                    Query::Input(..) => &[Answer::True, Answer::Fails],
                };
                for &a in choices {
                    let mut answers = answers.clone();
                    if let Some(slot) = answers.slot(q) {
                        *slot = Some(a);
                    }
                    let mut decided = decided.clone();
                    decided.push((q, a));
                    todo.push((answers, decided));
                }
                continue;
            }
            let mut late = w.late.clone();
            if let Move::Late(i, kind, _) = mv {
                late.retain(|&(j, k, _)| (j, k) != (i, kind));
            }
            if let Move::Fire(i) = mv {
                for e in &t.effects {
                    if let Effect::AttemptEnded {
                        command_id,
                        end: AttemptEnd::TimedOut,
                    } = e
                    {
                        late.retain(|&(j, k, _)| (j, k) != (i, taken.kind));
                        late.push((i, taken.kind, *command_id));
                    }
                }
            }
            // While a newer attempt is out, an older one's late success does what the newer
            // one's success does (explored anyway), and under the attempt caps a step that
            // sent its second attempt never waits to retry again: such entries are dropped.
            late.retain(|&(i, k, _)| {
                let st = t.state.steps.get(i);
                late_counts(k, st) && st.and_then(StepState::command_id).is_none()
            });
            late.sort_by_key(|&(i, k, _)| (i, kind_index(k)));
            let mut applied = w.applied.clone();
            if taken.kind == Kind::Action
                && let Some(a) = match mv {
                    Move::Success(i) | Move::Late(i, Kind::Action, _) => Some((i, Applied::Maybe)),
                    Move::Failure(i, _) => Some((i, Applied::No)),
                    Move::Fire(i) if !taken.between_attempts => Some((i, Applied::Maybe)),
                    _ => None,
                }
                && let Some(slot) = applied.get_mut(a.0)
            {
                *slot = a.1;
            }
            let mut next = World {
                state: t.state,
                answers,
                late,
                applied,
            };
            next.forget_dead_answers();
            let taken = Taken {
                decided,
                ..taken.clone()
            };
            out.push((next, t.effects, taken));
        }
        out
    }

    fn visit(&mut self, from: &World, w: World, effects: &[Effect], taken: Taken, depth: usize) {
        if self.done() {
            return;
        }
        if let Err(e) = check_transition(self.g, &from.state, effects, &w.state) {
            return self.violation(e, Some(&taken));
        }
        let key = w.key();
        if self.on_stack.contains(&key) {
            let message = "the saga never ends: it comes back to a state it was in".to_string();
            return self.violation(message, Some(&taken));
        }
        if self.visited.contains(&key) {
            return;
        }
        if depth >= MAX_DEPTH {
            let message = format!("the saga never ends: more than {MAX_DEPTH} events");
            return self.violation(message, Some(&taken));
        }
        if self.states >= MAX_STATES {
            self.bounded = true;
            return;
        }
        self.visited.insert(key.clone());
        self.states += 1;
        self.path.push(taken);
        let moves = self.moves(&w);
        if moves.is_empty() || w.state.status.is_terminal() {
            self.ends += 1;
            if let Err(e) = check_end(self.g, &w.state)
                .and_then(|()| check_undone(self.g, &w.state, &w.applied))
            {
                self.violation(e, None);
            }
        } else {
            self.on_stack.insert(key.clone());
            for mv in moves {
                for (next, effects, taken) in self.step(&w, mv) {
                    self.visit(&w, next, &effects, taken, depth.saturating_add(1));
                }
            }
            self.on_stack.remove(&key);
        }
        self.path.pop();
    }
}

/// Every step whose action may have been applied (its last attempt succeeded or timed out) is
/// undone when the saga ends compensated, or, when it waits for an operator, unless a failed
/// compensation of a descendant (or its own) holds it.
fn check_undone(g: &Graph, state: &GraphState, applied: &[Applied]) -> Result<(), String> {
    let stopped = matches!(state.status, Status::Compensated | Status::NeedsOperator);
    if !stopped || !state.turned {
        return Ok(());
    }
    let held = |i: usize| {
        g.descendants(i).iter().chain([&i]).any(|&d| {
            matches!(
                state.steps.get(d),
                Some(StepState::CompFailed { .. } | StepState::Held { .. })
            )
        })
    };
    for (i, a) in applied.iter().enumerate() {
        let undone = state.steps.get(i) == Some(&StepState::Compensated);
        if *a == Applied::Maybe && has_compensation(g, i) && !undone && !held(i) {
            return Err(format!(
                "the action of {} may have been applied (it succeeded or timed out) but the saga \
                 stopped {} without compensating it",
                name(g, i),
                state.status.as_str()
            ));
        }
    }
    Ok(())
}

fn answer_text(a: Answer) -> &'static str {
    match a {
        Answer::True => "true",
        Answer::False => "false",
        Answer::Fails => "fails",
    }
}

fn input_text(a: Answer) -> &'static str {
    match a {
        Answer::Fails => "fails",
        Answer::True | Answer::False => "built",
    }
}

// ---- --explain ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Nothing,
    Fails(usize),
    TimesOut(usize),
    /// The pivot times out (so everything before it, and it, is undone) and this step's
    /// compensation fails every attempt.
    CompensationFails(usize),
    /// The step's `when` fails to evaluate.
    WhenFails(usize),
    /// The step's mapped input cannot be built.
    InputFails(usize),
    /// The pivot times out and this step's compensation input cannot be built.
    CompensationInputFails(usize),
}

/// One row per failure point, each run with every other command succeeding, replies in the
/// order the commands left; for each condition, its steps are shown both ways.
fn explain(g: &Graph, shape: &Shape) -> Vec<ExplainRow> {
    let n = g.def().steps.len();
    let conditions: Vec<usize> = (0..n).filter(|&i| shape.has_when(i)).collect();
    let mut assignments: Vec<Vec<usize>> = vec![Vec::new()];
    assignments.extend(conditions.iter().map(|&i| vec![i]));
    let mut faults = vec![Fault::Nothing];
    for i in (0..n).filter(|&i| !g.is_after_pivot(i)) {
        faults.push(Fault::Fails(i));
        faults.push(Fault::TimesOut(i));
    }
    faults.extend(
        (0..n)
            .filter(|&i| has_compensation(g, i))
            .map(Fault::CompensationFails),
    );
    faults.extend(conditions.iter().map(|&i| Fault::WhenFails(i)));
    faults.extend(
        (0..n)
            .filter(|&i| shape.maps(i, Kind::Action))
            .map(Fault::InputFails),
    );
    faults.extend(
        (0..n)
            .filter(|&i| has_compensation(g, i) && shape.maps(i, Kind::Compensation))
            .map(Fault::CompensationInputFails),
    );
    let mut rows = Vec::new();
    for fault in faults {
        for falses in &assignments {
            // A skipped step sends nothing: it can neither fail nor be compensated.
            let target = match fault {
                Fault::Fails(i)
                | Fault::TimesOut(i)
                | Fault::CompensationFails(i)
                | Fault::InputFails(i)
                | Fault::CompensationInputFails(i) => Some(i),
                Fault::Nothing | Fault::WhenFails(_) => None,
            };
            if target.is_some_and(|i| falses.contains(&i)) {
                continue;
            }
            let mut answers = Answers::new(n);
            for &i in &conditions {
                let a = if falses.contains(&i) {
                    Answer::False
                } else {
                    Answer::True
                };
                if let Some(slot) = answers.when.get_mut(i) {
                    *slot = Some(a);
                }
            }
            for slot in &mut answers.input {
                *slot = [Some(Answer::True); 2];
            }
            let slot = match fault {
                Fault::WhenFails(i) => answers.slot(Query::When(i)),
                Fault::InputFails(i) => answers.slot(Query::Input(i, 0)),
                Fault::CompensationInputFails(i) => answers.slot(Query::Input(i, 1)),
                _ => None,
            };
            if let Some(slot) = slot {
                *slot = Some(Answer::Fails);
            }
            let (compensations, status) = scenario(g, shape, &answers, fault);
            let failure = match fault {
                Fault::Nothing => "nothing".to_string(),
                Fault::Fails(i) => format!("{} fails", name(g, i)),
                Fault::TimesOut(i) => format!("{} times out", name(g, i)),
                Fault::CompensationFails(i) => format!(
                    "{} times out, compensation of {} fails",
                    name(g, g.def().pivot),
                    name(g, i)
                ),
                Fault::WhenFails(i) => format!("when of {} fails", name(g, i)),
                Fault::InputFails(i) => format!("input of {} cannot be built", name(g, i)),
                Fault::CompensationInputFails(i) => format!(
                    "{} times out, compensation input of {} cannot be built",
                    name(g, g.def().pivot),
                    name(g, i)
                ),
            };
            let conditions = if conditions.is_empty() {
                "-".to_string()
            } else {
                conditions
                    .iter()
                    .map(|&i| {
                        let value = match fault {
                            Fault::WhenFails(f) if f == i => "fails",
                            _ if falses.contains(&i) => "false",
                            _ => "true",
                        };
                        format!("{}={value}", name(g, i))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let row = ExplainRow {
                failure,
                conditions,
                compensations,
                status,
            };
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
    }
    rows
}

fn scenario(g: &Graph, shape: &Shape, answers: &Answers, fault: Fault) -> (String, Status) {
    let oracle = Oracle {
        shape,
        answers,
        undecided: std::cell::Cell::new(None),
    };
    let mut ids = 0u128;
    let mut ctx = |now| {
        ids = ids.wrapping_add(1);
        Ctx {
            now,
            next_command_id: Uuid::from_u128(ids),
            jitter: 0.0,
        }
    };
    let mut state = GraphState::new(g.def());
    let mut groups: Vec<String> = Vec::new();
    // Commands in the order they left: replies come back in that order.
    let mut queue: Vec<(usize, Uuid)> = Vec::new();
    let mut t = g.apply(&state, Event::Start, ctx(T0), &oracle);
    for _ in 0..1_000 {
        let mut group = Vec::new();
        for e in &t.effects {
            if let Effect::Send(c) = e {
                queue.push((c.step, c.command_id));
                if c.kind == Kind::Compensation && c.attempt == 1 {
                    group.push(c.step);
                }
            }
        }
        if !group.is_empty() {
            // Within one transition the order means nothing: shown in definition order.
            group.sort_unstable();
            let names: Vec<String> = group.iter().map(|&i| name(g, i)).collect();
            groups.push(names.join(" ∥ "));
        }
        state = t.state;
        if state.status != Status::Running && state.status != Status::Compensating {
            break;
        }
        queue.retain(|&(i, id)| state.steps.get(i).and_then(StepState::command_id) == Some(id));
        t = if let Some(&(i, command_id)) = queue.first() {
            let st = state.steps.get(i).cloned().unwrap_or(StepState::Pending);
            let kind = st.kind().unwrap_or(Kind::Action);
            let pivot = g.def().pivot;
            let outcome = match (fault, kind) {
                (Fault::Fails(f), Kind::Action) if f == i => Some(false),
                (Fault::CompensationFails(f), Kind::Compensation) if f == i => Some(false),
                (Fault::TimesOut(f), Kind::Action) if f == i => None,
                (Fault::CompensationFails(_) | Fault::CompensationInputFails(_), Kind::Action)
                    if i == pivot =>
                {
                    None
                }
                _ => Some(true),
            };
            match outcome {
                Some(success) => {
                    let outcome = if success {
                        Outcome::Success { output: json!({}) }
                    } else {
                        Outcome::Failure {
                            reason: "no".into(),
                            retryable: true,
                        }
                    };
                    let event = Event::Reply {
                        command_id,
                        outcome,
                        answers: None,
                    };
                    g.apply(&state, event, ctx(T0), &oracle)
                }
                None => {
                    let now = st.wake_at().unwrap_or(T0);
                    g.fire_one(&state, i, ctx(now), &oracle)
                }
            }
        } else if let Some(i) = state.steps.iter().position(|s| s.wake_at().is_some()) {
            let now = state
                .steps
                .get(i)
                .and_then(StepState::wake_at)
                .unwrap_or(T0);
            g.fire_one(&state, i, ctx(now), &oracle)
        } else {
            break;
        };
    }
    let compensations = if groups.is_empty() {
        "(none)".to_string()
    } else {
        groups.join(" → ")
    };
    (compensations, state.status)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.ok() {
            "ok"
        } else if self.bounded {
            "NOT PROVEN (too many states)"
        } else {
            "FAILED"
        };
        writeln!(
            f,
            "{} v{}: {verdict}: {} states, {} ends explored",
            self.definition, self.version, self.states, self.ends
        )?;
        for v in &self.violations {
            writeln!(f, "  violation: {}", v.message)?;
            writeln!(f, "    after: {}", v.path.join(" / "))?;
        }
        let headers = ["failure", "conditions", "compensations, in order", "ends"];
        let cells: Vec<[String; 4]> = self
            .explain
            .iter()
            .map(|r| {
                [
                    r.failure.clone(),
                    r.conditions.clone(),
                    r.compensations.clone(),
                    r.status.as_str().to_string(),
                ]
            })
            .collect();
        let mut widths = headers.map(|h| h.chars().count());
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, row: [&str; 4]| -> fmt::Result {
            let mut text = String::from(" ");
            for (c, w) in row.iter().zip(widths) {
                let pad = w.saturating_sub(c.chars().count());
                text.push_str(&format!(" {c}{} |", " ".repeat(pad)));
            }
            writeln!(f, "{}", text.trim_end_matches('|').trim_end())
        };
        line(f, headers)?;
        let rule = widths.map(|w| "-".repeat(w));
        line(f, rule.each_ref().map(String::as_str))?;
        for row in &cells {
            line(f, row.each_ref().map(String::as_str))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Event;
    use crate::graph::{Command, NoData, Transition};
    use std::path::Path;
    use std::time::Instant;

    // The checker caps attempts itself, so the graph tests' definitions serve as they are.
    use crate::graph::tests::graph_def as def;

    /// create -> (pay ∥ accept ∥ coupon when ...) -> dispatch (pivot) -> notify
    fn food() -> (Definition, Shape) {
        let d = def(
            &[
                ("create_order", Some(&[]), true),
                ("authorize_payment", Some(&[0]), true),
                ("accept_order", Some(&[0]), true),
                ("redeem_coupon", Some(&[0]), true),
                ("dispatch_rider", Some(&[1, 2, 3]), true),
                ("notify_customer", Some(&[4]), false),
            ],
            4,
        );
        let mut shape = Shape::of(&d);
        shape.when[3] = true;
        shape.input[1] = true;
        shape.compensation_input[1] = true;
        (d, shape)
    }

    fn timed(def: &Definition, shape: &Shape) -> Report {
        let t = Instant::now();
        let r = check_shape(def, shape);
        let took = t.elapsed();
        println!("{}: {} states in {took:?}\n{r}", def.name, r.states);
        r
    }

    #[test]
    fn the_shipped_definitions_check() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas");
        for d in crate::definition::load_dir(&dir).unwrap() {
            let r = timed(&d, &Shape::of(&d));
            assert!(r.ok(), "{r}");
        }
    }

    #[test]
    fn the_food_delivery_saga_checks_with_its_condition_and_mappings() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas");
        let d = crate::definition::load_dir(&dir)
            .unwrap()
            .into_iter()
            .find(|d| d.name == "food_delivery")
            .unwrap();
        let shape = Shape::of(&d);
        assert!(
            shape.when.iter().any(|w| *w),
            "redeem_coupon has a condition"
        );
        let r = timed(&d, &shape);
        assert!(r.ok(), "{r}");
        let text = r.to_string();
        assert!(text.contains("redeem_coupon"), "{text}");
    }

    #[test]
    fn a_diamond_with_a_condition_and_mappings_checks_and_explains() {
        let (d, shape) = food();
        let r = timed(&d, &shape);
        assert!(r.ok(), "{r}");
        let row = |failure: &str, conditions: &str| {
            r.explain
                .iter()
                .find(|x| x.failure == failure && x.conditions == conditions)
                .unwrap_or_else(|| panic!("no row {failure} {conditions}:\n{r}"))
                .clone()
        };
        let fails = row("authorize_payment fails", "redeem_coupon=true");
        assert_eq!(
            fails.compensations,
            "accept_order ∥ redeem_coupon → create_order"
        );
        assert_eq!(fails.status, Status::Compensated);
        let skipped = row("dispatch_rider fails", "redeem_coupon=false");
        assert_eq!(
            skipped.compensations,
            "authorize_payment ∥ accept_order → create_order"
        );
        let timeout = row("dispatch_rider times out", "redeem_coupon=true");
        assert_eq!(
            timeout.compensations,
            "dispatch_rider → authorize_payment ∥ accept_order ∥ redeem_coupon → create_order"
        );
        let stuck = row(
            "dispatch_rider times out, compensation of accept_order fails",
            "redeem_coupon=true",
        );
        assert_eq!(
            stuck.compensations,
            "dispatch_rider → authorize_payment ∥ accept_order ∥ redeem_coupon"
        );
        assert_eq!(stuck.status, Status::NeedsOperator);
        assert_eq!(
            row("nothing", "redeem_coupon=true").status,
            Status::Completed
        );
        let when = row("when of redeem_coupon fails", "redeem_coupon=fails");
        assert_eq!(
            (when.compensations.as_str(), when.status),
            ("create_order", Status::Compensated)
        );
        let refund = row(
            "dispatch_rider times out, compensation input of authorize_payment cannot be built",
            "redeem_coupon=true",
        );
        assert_eq!(refund.status, Status::NeedsOperator);
        let shown = r.to_string();
        assert!(shown.contains("| compensations, in order"), "{shown}");
    }

    #[test]
    fn a_linear_definition_with_every_step_compensated_checks_quickly() {
        let d = def(
            &[
                ("a", None, true),
                ("b", None, true),
                ("c", None, true),
                ("d", None, true),
            ],
            3,
        );
        let r = timed(&d, &Shape::of(&d));
        assert!(r.ok(), "{r}");
        assert!(r.states > 20, "{}", r.states);
    }

    #[test]
    fn independent_roots_and_a_pivot_in_the_middle_check() {
        // Two roots join at the pivot, then two parallel steps after it.
        let d = def(
            &[
                ("a", Some(&[]), true),
                ("b", Some(&[]), true),
                ("p", Some(&[0, 1]), false),
                ("x", Some(&[2]), false),
                ("y", Some(&[2]), false),
            ],
            2,
        );
        let r = timed(&d, &Shape::of(&d));
        assert!(r.ok(), "{r}");
    }

    fn sent(step: usize, kind: Kind) -> Effect {
        Effect::Send(Command {
            command_id: Uuid::nil(),
            step,
            kind,
            attempt: 1,
            deadline: T0,
            input: None,
        })
    }

    fn compensating() -> StepState {
        StepState::Compensating {
            attempt: 1,
            command_id: Uuid::nil(),
            deadline: T0,
        }
    }

    /// a -> b, both compensated.
    fn pair() -> Definition {
        def(&[("a", None, true), ("b", None, true)], 1)
    }

    fn state(steps: Vec<StepState>, status: Status) -> GraphState {
        GraphState {
            status,
            started: true,
            turned: status != Status::Running,
            steps,
            error: None,
        }
    }

    #[test]
    fn the_rules_catch_a_compensation_before_its_descendants() {
        let d = pair();
        let g = Graph::new(&d);
        let before = state(
            vec![StepState::Succeeded, StepState::Succeeded],
            Status::Compensating,
        );
        // A broken machine undoing `a` while `b` is still done: caught.
        let after = state(
            vec![compensating(), StepState::Succeeded],
            Status::Compensating,
        );
        let trace = [(vec![sent(0, Kind::Compensation)], after)];
        let v = check_trace(&g, &before, &trace).unwrap_err();
        assert!(
            v.message
                .contains("compensation of a started before b was compensated"),
            "{v:?}"
        );
        // Undoing `b` first is fine.
        let after = state(
            vec![StepState::Succeeded, compensating()],
            Status::Compensating,
        );
        assert!(check_trace(&g, &before, &[(vec![sent(1, Kind::Compensation)], after)]).is_ok());
    }

    #[test]
    fn the_rules_catch_a_command_for_a_skipped_step_and_an_action_after_turning() {
        let d = pair();
        let g = Graph::new(&d);
        let running = |a| state(vec![a, StepState::Skipped], Status::Running);
        let v = check_trace(
            &g,
            &running(StepState::Succeeded),
            &[(vec![sent(1, Kind::Action)], running(StepState::Succeeded))],
        )
        .unwrap_err();
        assert!(v.message.contains("skipped step b"), "{v:?}");

        let turned = state(
            vec![StepState::Succeeded, StepState::Pending],
            Status::Compensating,
        );
        let v = check_trace(
            &g,
            &turned,
            &[(vec![sent(1, Kind::Action)], turned.clone())],
        )
        .unwrap_err();
        assert!(v.message.contains("after the saga turned"), "{v:?}");
    }

    #[test]
    fn the_rules_catch_an_end_with_a_step_left_uncompensated() {
        let d = pair();
        let g = Graph::new(&d);
        let end = state(
            vec![StepState::Unknown, StepState::Compensated],
            Status::Compensated,
        );
        let v = check_trace(&g, &end, &[]).unwrap_err();
        assert!(
            v.message.contains("a (unknown) was not compensated"),
            "{v:?}"
        );
        // Waiting for an operator is fine only for what a failed compensation blocks.
        let stuck = state(
            vec![
                StepState::Succeeded,
                StepState::CompFailed {
                    attempt: 2,
                    reason: "no".into(),
                },
            ],
            Status::NeedsOperator,
        );
        assert!(check_trace(&g, &stuck, &[]).is_ok());
        let wrong = state(
            vec![StepState::Succeeded, StepState::Compensated],
            Status::NeedsOperator,
        );
        assert!(check_trace(&g, &wrong, &[]).is_err());
        // Running with nothing in flight never ends.
        let idle = state(
            vec![StepState::Succeeded, StepState::Pending],
            Status::Running,
        );
        assert!(
            check_trace(&g, &idle, &[])
                .unwrap_err()
                .message
                .contains("never ends")
        );
    }

    #[test]
    fn a_real_run_passes_the_rules_transition_by_transition() {
        let (d, _) = food();
        let g = Graph::new(&d);
        let start = GraphState::new(&d);
        let ctx = |n: u128| Ctx {
            now: T0,
            next_command_id: Uuid::from_u128(n),
            jitter: 0.0,
        };
        let mut trace = Vec::new();
        let mut s = start.clone();
        let mut n = 0;
        let mut push = |t: Transition, s: &mut GraphState| {
            *s = t.state.clone();
            trace.push((t.effects, t.state));
        };
        n += 1;
        push(g.apply(&s, Event::Start, ctx(n), &NoData), &mut s);
        while let Some(i) = s.steps.iter().position(|x| x.command_id().is_some()) {
            n += 1;
            let command_id = s.steps[i].command_id().unwrap();
            let outcome = if i == 2 {
                Outcome::Failure {
                    reason: "closed".into(),
                    retryable: false,
                }
            } else {
                Outcome::Success { output: json!({}) }
            };
            let e = Event::Reply {
                command_id,
                outcome,
                answers: None,
            };
            push(g.apply(&s, e, ctx(n), &NoData), &mut s);
        }
        assert_eq!(s.status, Status::Compensated);
        check_trace(&g, &start, &trace).unwrap();
    }
}
