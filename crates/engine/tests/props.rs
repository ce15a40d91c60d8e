//! Property tests: the definition loader and the state machine never panic, whatever they are
//! fed, and the engine keeps its invariants over arbitrary event sequences. Each property runs a
//! bounded number of cases so the whole file takes seconds.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use saga_engine::definition::{self, Definition, RetryPolicy, Step};
use saga_engine::engine::{
    self, Ctx, Effect, Event, HistoryKind, Kind, Operator, Outcome, Repair, SagaState, Status,
    Waiting,
};
use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const FILE: &str = "sagas/generated.toml";
const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // Crashing inputs found are kept as the explicit tests at the end of this file.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Checks what every loader error must carry: the file, and a line inside the text.
fn check_error(text: &str, e: &definition::DefinitionError) -> Result<(), TestCaseError> {
    prop_assert_eq!(&e.file, Path::new(FILE));
    let lines = text.lines().count().max(1) + 1;
    let line = e.line;
    prop_assert!(
        (1..=lines).contains(&line),
        "line {} outside 1..={}: {}",
        line,
        lines,
        e
    );
    let prefix = format!("{FILE}:{line}:");
    prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
    Ok(())
}

/// What validation promises about an accepted definition.
fn check_valid(d: &Definition) -> Result<(), TestCaseError> {
    prop_assert!(!d.steps.is_empty());
    prop_assert!(d.pivot < d.steps.len());
    prop_assert!((1..=definition::MAX_ATTEMPTS).contains(&d.compensation_max_attempts));
    for name in [&d.name]
        .into_iter()
        .chain(
            d.steps
                .iter()
                .flat_map(|s| [&s.name, &s.participant, &s.action]),
        )
        .chain(d.steps.iter().filter_map(|s| s.compensation.as_ref()))
    {
        prop_assert!(definition::is_name(name), "{name:?}");
    }
    let (tmin, tmax) = definition::TIMEOUT_RANGE;
    let (bmin, bmax) = definition::BACKOFF_RANGE;
    for s in &d.steps {
        prop_assert!((tmin..=tmax).contains(&s.timeout), "{:?}", s.timeout);
        prop_assert!((bmin..=bmax).contains(&s.retry.initial_backoff));
        prop_assert!((bmin..=bmax).contains(&s.retry.max_backoff));
        prop_assert!(s.retry.initial_backoff <= s.retry.max_backoff);
        prop_assert!((1..=definition::MAX_ATTEMPTS).contains(&s.retry.max_attempts));
        prop_assert!((1.0..=10.0).contains(&s.retry.multiplier));
        prop_assert_eq!(s.timeout.subsec_nanos() % 1_000_000, 0);
    }
    Ok(())
}

/// A duration as written in a file: mostly plausible, sometimes absurd or malformed.
fn duration_text() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec![
        "ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "",
    ]);
    let plausible = prop::sample::select(vec!["ms", "s", "m", "h"]);
    prop_oneof![
        6 => (1u64..1000, plausible).prop_map(|(n, u)| format!("{n}{u}")),
        2 => (0u64..100_000, unit.clone()).prop_map(|(n, u)| format!("{n}{u}")),
        1 => (any::<u64>(), unit).prop_map(|(n, u)| format!("{n}{u}")),
        1 => "[0-9a-z .-]{0,12}",
        1 => prop::sample::select(vec!["1ms 500us", "8000y", "20000y", "8d", "25h", "0s"])
            .prop_map(str::to_string),
    ]
}

/// A name: mostly valid, sometimes with characters routing keys interpret, or empty/long.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[a-z_][a-z0-9_-]{0,10}",
        1 => "[a-z.*# /\"\\\\é]{0,6}",
        1 => "[a-z]{120,140}",
    ]
}

fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (1i64..20).prop_map(|n| n.to_string()),
        2 => (-5i64..2000).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => prop::sample::select(vec!["nan", "inf", "-inf", "1e400", "0.5", "\"3\""])
            .prop_map(str::to_string),
    ]
}

fn float_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (1.0f64..10.0).prop_map(|f| format!("{f:?}")),
        2 => (0.0f64..20.0).prop_map(|f| format!("{f:?}")),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => prop::sample::select(vec!["nan", "inf", "-inf", "-1.0", "2"]).prop_map(str::to_string),
    ]
}

/// A `[[steps]]` table with random values; each optional key present or not.
fn step_text() -> impl Strategy<Value = String> {
    (
        name_text(),
        name_text(),
        name_text(),
        prop::option::weighted(0.3, name_text()),
        prop::option::of(duration_text()),
        prop::option::of((
            number_text(),
            duration_text(),
            duration_text(),
            float_text(),
        )),
        prop::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(|(name, participant, action, comp, timeout, retry, pivot)| {
            let mut s = format!(
                "[[steps]]\nname = \"{name}\"\nparticipant = \"{participant}\"\naction = \"{action}\"\n"
            );
            if let Some(c) = comp {
                s += &format!("compensation = \"{c}\"\n");
            }
            if let Some(t) = timeout {
                s += &format!("timeout = \"{t}\"\n");
            }
            if let Some((n, i, m, x)) = retry {
                s += &format!(
                    "retry = {{ max_attempts = {n}, initial_backoff = \"{i}\", max_backoff = \"{m}\", multiplier = {x} }}\n"
                );
            }
            if let Some(p) = pivot {
                s += &format!("pivot = {p}\n");
            }
            s
        })
}

fn near_valid_toml() -> impl Strategy<Value = String> {
    (
        name_text(),
        number_text(),
        prop::option::of(duration_text()),
        prop::option::of(number_text()),
        prop::collection::vec(step_text(), 0..3),
    )
        .prop_map(|(name, version, timeout, comp, steps)| {
            let mut s = format!("name = \"{name}\"\nversion = {version}\n");
            if let Some(t) = timeout {
                s += &format!("[defaults]\ntimeout = \"{t}\"\n");
            }
            if let Some(n) = comp {
                s += &format!("[compensation]\nmax_attempts = {n}\n");
            }
            for step in steps {
                s += &step;
            }
            s
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_loader_never_panics_on_arbitrary_text(text in any::<String>()) {
        if let Err(e) = definition::parse(Path::new(FILE), &text) {
            check_error(&text, &e)?;
        }
    }

    #[test]
    fn the_loader_never_panics_on_toml_shaped_text(text in "[a-z_\\[\\]=\"{}, .0-9\n#]{0,200}") {
        if let Err(e) = definition::parse(Path::new(FILE), &text) {
            check_error(&text, &e)?;
        }
    }

    #[test]
    fn near_valid_definitions_are_either_within_bounds_or_refused_with_a_line(
        text in near_valid_toml()
    ) {
        match definition::parse(Path::new(FILE), &text) {
            Ok(d) => check_valid(&d)?,
            Err(e) => check_error(&text, &e)?,
        }
    }
}

fn extreme_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_secs(8000 * 365 * 24 * 3600)),
        (0u64..10_000).prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_secs),
    ]
}

fn extreme_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 1.0f64..10.0,
        1 => any::<f64>(),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0]),
    ]
}

fn extreme_u32() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 0u32..6, 1 => any::<u32>(), 1 => Just(u32::MAX)]
}

/// Definitions as a program or an old database row could hold them: structurally sound (at
/// least one step, the pivot one of them), every number anything.
fn any_definition() -> impl Strategy<Value = Definition> {
    let step = (
        extreme_duration(),
        extreme_u32(),
        extreme_duration(),
        extreme_duration(),
        extreme_f64(),
        any::<bool>(),
    );
    (
        prop::collection::vec(step, 1..5),
        any::<prop::sample::Index>(),
        extreme_u32(),
    )
        .prop_map(|(steps, pivot, comp_max)| {
            let steps: Vec<Step> = steps
                .into_iter()
                .enumerate()
                .map(
                    |(i, (timeout, max_attempts, initial, max, multiplier, comp))| Step {
                        name: format!("s{i}"),
                        participant: format!("p{}", i % 2),
                        action: format!("do{i}"),
                        compensation: comp.then(|| format!("undo{i}")),
                        timeout,
                        retry: RetryPolicy {
                            max_attempts,
                            initial_backoff: initial,
                            max_backoff: max,
                            multiplier,
                        },
                        after: None,
                    },
                )
                .collect();
            let pivot = pivot.index(steps.len());
            Definition {
                name: "generated".into(),
                version: 1,
                description: String::new(),
                steps,
                pivot,
                compensation_max_attempts: comp_max,
            }
        })
}

#[derive(Debug, Clone)]
enum Op {
    /// A reply to the `n`-th command sent so far (modulo), or to an unknown one.
    Reply {
        to: Option<prop::sample::Index>,
        success: bool,
        retryable: bool,
        answers: Option<(usize, bool)>,
    },
    /// The same reply as the previous one, again.
    Duplicate,
    /// A timer at an arbitrary time: exactly the wake-up time, or a jump from the last clock.
    Timer {
        at_wake: bool,
        jump_secs: i64,
    },
    Repair(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop::option::of(any::<prop::sample::Index>()),
            any::<bool>(),
            any::<bool>(),
            prop::option::of((0usize..6, any::<bool>())),
        )
            .prop_map(|(to, success, retryable, answers)| Op::Reply {
                to,
                success,
                retryable,
                answers
            }),
        1 => Just(Op::Duplicate),
        3 => (any::<bool>(), prop_oneof![-10i64..100_000, any::<i64>()])
            .prop_map(|(at_wake, jump_secs)| Op::Timer { at_wake, jump_secs }),
        1 => (0u8..4).prop_map(Op::Repair),
    ]
}

fn check_invariants(
    def: &Definition,
    before: &SagaState,
    after: &SagaState,
    effects: &[Effect],
    started: &mut HashSet<usize>,
) -> Result<(), TestCaseError> {
    if before.status.is_terminal() {
        // A late reply to an ended saga is still recorded (its attempt and a `late_reply`
        // history entry); nothing else may happen, and the state stays as it is.
        prop_assert!(
            effects.iter().all(|e| matches!(
                e,
                Effect::AttemptEnded { .. }
                    | Effect::History {
                        kind: HistoryKind::LateReply,
                        ..
                    }
            )),
            "a terminal saga changed: {effects:?}"
        );
        prop_assert_eq!(before, after);
    }
    for e in effects {
        if let Effect::Send(c) = e {
            prop_assert!(c.step < def.steps.len());
            match c.kind {
                Kind::Action => {
                    started.insert(c.step);
                }
                Kind::Compensation => prop_assert!(
                    started.contains(&c.step),
                    "compensation of step {} that never started",
                    c.step
                ),
            }
        }
    }
    prop_assert!(after.step < def.steps.len());
    let active = matches!(after.status, Status::Running | Status::Compensating);
    prop_assert_eq!(
        active,
        after.wake_at().is_some(),
        "status {:?} with waiting {:?}",
        after.status,
        after.waiting
    );
    if !matches!(after.waiting, Waiting::Nothing) {
        prop_assert!(after.attempt >= 1);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_engine_never_panics_and_keeps_its_invariants(
        def in any_definition(),
        ops in prop::collection::vec(op(), 0..40),
        jitter in extreme_f64(),
    ) {
        let mut state = SagaState::new();
        let mut now = T0;
        let ids = std::cell::Cell::new(0u128);
        let ctx = |now| {
            ids.set(ids.get() + 1);
            Ctx { now, next_command_id: Uuid::from_u128(ids.get()), jitter }
        };
        let mut started = HashSet::new();
        let mut sent: Vec<(Uuid, usize, Kind)> = Vec::new();
        let by = Operator { actor: "prop".into(), reason: "test".into() };

        let t = engine::apply(&def, &state, Event::Start, ctx(now));
        check_invariants(&def, &state, &t.state, &t.effects, &mut started)?;
        let record = |effects: &[Effect], sent: &mut Vec<(Uuid, usize, Kind)>| {
            for e in effects {
                if let Effect::Send(c) = e {
                    sent.push((c.command_id, c.step, c.kind));
                }
            }
        };
        record(&t.effects, &mut sent);
        state = t.state;
        let mut last_reply: Option<Event> = None;

        for op in ops {
            let event = match op {
                Op::Reply { to, success, retryable, answers } => {
                    let command_id = match to {
                        Some(i) if !sent.is_empty() => sent[i.index(sent.len())].0,
                        _ => Uuid::from_u128(u128::MAX - ids.get()),
                    };
                    let outcome = if success {
                        Outcome::Success { output: json!({"n": ids.get() as u64}) }
                    } else {
                        Outcome::Failure { reason: "no".into(), retryable }
                    };
                    let answers = answers.map(|(s, compensation)| {
                        (s, if compensation { Kind::Compensation } else { Kind::Action })
                    });
                    let e = Event::Reply { command_id, outcome, answers };
                    last_reply = Some(e.clone());
                    Some(e)
                }
                Op::Duplicate => last_reply.clone(),
                Op::Timer { at_wake, jump_secs } => {
                    now = match (at_wake, state.wake_at()) {
                        (true, Some(at)) => at,
                        _ => now
                            .checked_add(time::Duration::seconds(jump_secs))
                            .unwrap_or(engine::NEVER),
                    };
                    Some(Event::Timer)
                }
                Op::Repair(r) => {
                    let repair = match r {
                        0 => Repair::RetryNow,
                        1 => Repair::Skip { output: json!({"by": "hand"}) },
                        2 => Repair::Compensate,
                        _ => Repair::Resolve,
                    };
                    // A refusal changes nothing, so only an accepted repair is checked.
                    if let Ok(t) = engine::repair(&def, &state, repair, &by, ctx(now)) {
                        prop_assert!(!state.status.is_terminal());
                        check_invariants(&def, &state, &t.state, &t.effects, &mut started)?;
                        record(&t.effects, &mut sent);
                        state = t.state;
                    }
                    None
                }
            };
            if let Some(event) = event {
                let t = engine::apply(&def, &state, event, ctx(now));
                check_invariants(&def, &state, &t.state, &t.effects, &mut started)?;
                record(&t.effects, &mut sent);
                state = t.state;
            }
        }
    }
}

/// The structural guard: a state pointing past its definition's steps (rows out of step) is left
/// alone rather than indexed out of bounds.
#[test]
fn a_state_outside_its_definition_is_left_alone() {
    let def = Definition {
        name: "d".into(),
        version: 1,
        description: String::new(),
        steps: vec![],
        pivot: 0,
        compensation_max_attempts: 1,
    };
    let ctx = Ctx {
        now: T0,
        next_command_id: Uuid::nil(),
        jitter: 0.5,
    };
    let t = engine::apply(&def, &SagaState::new(), Event::Start, ctx);
    assert!(t.is_noop());
    let mut state = SagaState::new();
    state.step = 7;
    state.attempt = 1;
    let by = Operator {
        actor: "a".into(),
        reason: "r".into(),
    };
    assert!(engine::repair(&def, &state, Repair::RetryNow, &by, ctx).is_err());
}

/// The near-valid generator is only worth its name if a good share of its output gets through
/// the parser to the range checks.
#[test]
fn the_near_valid_generator_reaches_the_range_checks() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = near_valid_toml();
    let accepted = (0..256)
        .filter(|_| {
            let text = strategy.new_tree(&mut runner).unwrap().current();
            definition::parse(Path::new(FILE), &text).is_ok()
        })
        .count();
    assert!(accepted >= 10, "only {accepted} of 256 accepted");
}

fn issue_definition(timeout: Duration, backoff: Duration) -> Definition {
    Definition {
        name: "d".into(),
        version: 1,
        description: String::new(),
        steps: vec![Step {
            name: "s".into(),
            participant: "p".into(),
            action: "a".into(),
            compensation: None,
            timeout,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: backoff,
                max_backoff: backoff,
                multiplier: 2.0,
            },
            after: None,
        }],
        pivot: 0,
        compensation_max_attempts: 1,
    }
}

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// The values of the original reports: a step timeout of 8000 years overflowed the deadline of
/// the first command; a back-off of 20000 years overflowed the retry time after a timeout and
/// after a retryable failure. Both now saturate at `NEVER`.
#[test]
fn absurd_timeouts_and_back_offs_saturate_at_never() {
    let ctx = |n| Ctx {
        now: T0,
        next_command_id: Uuid::from_u128(n),
        jitter: 0.5,
    };
    let def = issue_definition(8000 * YEAR, Duration::from_millis(1));
    let t = engine::apply(&def, &SagaState::new(), Event::Start, ctx(1));
    assert_eq!(t.state.wake_at(), Some(engine::NEVER));

    let def = issue_definition(Duration::from_millis(1), 20000 * YEAR);
    let started = engine::apply(&def, &SagaState::new(), Event::Start, ctx(1)).state;
    let mut later = ctx(2);
    later.now = T0 + time::Duration::seconds(1);
    let timed_out = engine::apply(&def, &started, Event::Timer, later);
    assert_eq!(timed_out.state.wake_at(), Some(engine::NEVER));
    let failed = engine::apply(
        &def,
        &started,
        Event::Reply {
            command_id: Uuid::from_u128(1),
            outcome: Outcome::Failure {
                reason: "busy".into(),
                retryable: true,
            },
            answers: None,
        },
        ctx(3),
    );
    assert_eq!(failed.state.wake_at(), Some(engine::NEVER));

    // The history reports such delays saturated, not wrapped.
    let def = issue_definition(Duration::from_millis(1), Duration::MAX);
    let started = engine::apply(&def, &SagaState::new(), Event::Start, ctx(1)).state;
    let mut at_deadline = ctx(2);
    at_deadline.jitter = 1.0;
    at_deadline.now = T0 + time::Duration::seconds(1);
    let retried = engine::apply(&def, &started, Event::Timer, at_deadline);
    let delays: Vec<_> = retried
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::History { detail, .. } => detail.get("delay_ms").cloned(),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [json!(u64::MAX)]);

    // Stored as whole milliseconds without wrapping, and read back the same.
    let def = issue_definition(Duration::MAX, Duration::MAX);
    let body = serde_json::to_value(&def).unwrap();
    assert_eq!(body["steps"][0]["timeout"], json!(u64::MAX));
    let back: Definition = serde_json::from_value(body).unwrap();
    assert_eq!(back.steps[0].timeout, Duration::from_millis(u64::MAX));
}
