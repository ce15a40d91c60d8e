//! Properties of the graph machine (`graph.rs`):
//!
//! - differential: on linear definitions it is today's machine (`engine.rs`): the same effects
//!   (commands, attempts, deadlines, history kinds and details, lifecycle events) in the same
//!   order, the same status, error and wake-up time, whatever the replies, timers and repairs;
//! - on random graphs, whatever the order of replies, duplicates, late replies and timers, it
//!   keeps the checker's invariants (no command for a skipped step, compensations in reverse
//!   graph order, everything completed undone when compensated) and always ends once
//!   participants answer.

use std::time::Duration;

use proptest::prelude::*;
use saga_engine::definition::{Definition, RetryPolicy, Step};
use saga_engine::engine::{self, Ctx, Event, Kind, Operator, Outcome, Repair, SagaState};
use saga_engine::graph::{self, Graph, GraphState, NoData};
use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn extreme_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (1u64..10_000).prop_map(Duration::from_millis),
        1 => Just(Duration::ZERO),
        1 => Just(Duration::MAX),
        1 => any::<u64>().prop_map(Duration::from_secs),
    ]
}

fn extreme_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 1.0f64..10.0,
        1 => any::<f64>(),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, -1.0, 0.0]),
    ]
}

fn attempts() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 1u32..5, 1 => Just(0u32), 1 => Just(u32::MAX)]
}

fn step(i: usize, timeout: Duration, retry: RetryPolicy, comp: bool) -> Step {
    Step {
        name: format!("s{i}"),
        participant: format!("p{}", i % 2),
        action: format!("do{i}"),
        compensation: comp.then(|| format!("undo{i}")),
        timeout,
        retry,
        after: None,
    }
}

/// Linear definitions as a program or an old database row could hold them.
fn linear_definition() -> impl Strategy<Value = Definition> {
    let s = (
        extreme_duration(),
        attempts(),
        extreme_duration(),
        extreme_duration(),
        extreme_f64(),
        any::<bool>(),
    );
    (
        prop::collection::vec(s, 1..5),
        any::<prop::sample::Index>(),
        attempts(),
    )
        .prop_map(|(steps, pivot, comp_max)| {
            let steps: Vec<Step> = steps
                .into_iter()
                .enumerate()
                .map(|(i, (timeout, max_attempts, ib, mb, multiplier, comp))| {
                    let retry = RetryPolicy {
                        max_attempts,
                        initial_backoff: ib,
                        max_backoff: mb,
                        multiplier,
                    };
                    step(i, timeout, retry, comp)
                })
                .collect();
            Definition {
                name: "linear".into(),
                version: 1,
                description: String::new(),
                pivot: pivot.index(steps.len()),
                steps,
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
    /// A timer exactly at the wake-up time, or after a jump of the clock.
    Timer {
        at_wake: bool,
        jump_secs: i64,
    },
    Repair(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (
            prop::option::weighted(0.9, any::<prop::sample::Index>()),
            any::<bool>(),
            any::<bool>(),
            prop::option::of((0usize..5, any::<bool>())),
        )
            .prop_map(|(to, success, retryable, answers)| Op::Reply { to, success, retryable, answers }),
        1 => Just(Op::Duplicate),
        3 => (any::<bool>(), prop_oneof![-10i64..100_000, any::<i64>()])
            .prop_map(|(at_wake, jump_secs)| Op::Timer { at_wake, jump_secs }),
        1 => (0u8..4).prop_map(Op::Repair),
    ]
}

fn engine_effect(e: &engine::Effect) -> String {
    match e {
        engine::Effect::Send(c) => format!(
            "send {} {} {:?} {} {} input=None",
            c.command_id, c.step, c.kind, c.attempt, c.deadline
        ),
        engine::Effect::AttemptEnded { command_id, end } => format!("ended {command_id} {end:?}"),
        engine::Effect::SaveOutput { step, output } => format!("output {step} {output}"),
        engine::Effect::History {
            kind,
            step,
            command_id,
            detail,
        } => format!("history {kind:?} {step:?} {command_id:?} {detail}"),
        engine::Effect::Lifecycle(s) => format!("lifecycle {s:?}"),
    }
}

fn graph_effect(e: &graph::Effect) -> String {
    match e {
        graph::Effect::Send(c) => format!(
            "send {} {} {:?} {} {} input={:?}",
            c.command_id, c.step, c.kind, c.attempt, c.deadline, c.input
        ),
        graph::Effect::AttemptEnded { command_id, end } => format!("ended {command_id} {end:?}"),
        graph::Effect::SaveOutput { step, output } => format!("output {step} {output}"),
        graph::Effect::History {
            kind,
            step,
            command_id,
            detail,
        } => format!("history {kind:?} {step:?} {command_id:?} {detail}"),
        graph::Effect::Lifecycle(s) => format!("lifecycle {s:?}"),
    }
}

fn same(
    what: &str,
    e: &[engine::Effect],
    es: &SagaState,
    g: &[graph::Effect],
    gs: &GraphState,
) -> Result<(), TestCaseError> {
    let e: Vec<String> = e.iter().map(engine_effect).collect();
    let g: Vec<String> = g.iter().map(graph_effect).collect();
    prop_assert_eq!(&e, &g, "effects differ after {}", what);
    prop_assert_eq!(es.status, gs.status, "status after {}: {:?}", what, gs);
    prop_assert_eq!(&es.error, &gs.error, "error after {}", what);
    prop_assert_eq!(
        es.wake_at(),
        gs.wake_at(),
        "wake-up after {}: {:?}",
        what,
        gs
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    /// A linear saga on the graph machine is today's saga, effect for effect.
    #[test]
    fn on_linear_definitions_the_graph_machine_is_the_linear_one(
        def in linear_definition(),
        ops in prop::collection::vec(op(), 0..40),
        jitter in extreme_f64(),
    ) {
        let g = Graph::new(&def);
        let mut es = SagaState::new();
        let mut gs = GraphState::new(&def);
        let mut now = T0;
        let mut ids = 0u128;
        let mut ctx = |now| {
            ids += 1;
            Ctx { now, next_command_id: Uuid::from_u128(ids), jitter }
        };
        let mut sent: Vec<Uuid> = Vec::new();
        let by = Operator { actor: "prop".into(), reason: "test".into() };
        let record = |t: &[engine::Effect], sent: &mut Vec<Uuid>| {
            for e in t {
                if let engine::Effect::Send(c) = e {
                    sent.push(c.command_id);
                }
            }
        };

        let c = ctx(now);
        let et = engine::apply(&def, &es, Event::Start, c);
        let gt = g.apply(&gs, Event::Start, c, &NoData);
        same("start", &et.effects, &et.state, &gt.effects, &gt.state)?;
        record(&et.effects, &mut sent);
        (es, gs) = (et.state, gt.state);
        let mut last: Option<Event> = None;

        for (n, op) in ops.into_iter().enumerate() {
            let what = format!("op {n}: {op:?}");
            let event = match op {
                Op::Reply { to, success, retryable, answers } => {
                    let command_id = match to {
                        Some(i) if !sent.is_empty() => sent[i.index(sent.len())],
                        _ => Uuid::from_u128(u128::MAX - n as u128),
                    };
                    let outcome = if success {
                        Outcome::Success { output: json!({"n": n}) }
                    } else {
                        Outcome::Failure { reason: "no".into(), retryable }
                    };
                    let answers = answers.map(|(s, c)| (s, if c { Kind::Compensation } else { Kind::Action }));
                    let e = Event::Reply { command_id, outcome, answers };
                    last = Some(e.clone());
                    Some(e)
                }
                Op::Duplicate => last.clone(),
                Op::Timer { at_wake, jump_secs } => {
                    now = match (at_wake, es.wake_at()) {
                        (true, Some(at)) => at,
                        _ => now.checked_add(time::Duration::seconds(jump_secs)).unwrap_or(engine::NEVER),
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
                    let c = ctx(now);
                    let et = engine::repair(&def, &es, repair.clone(), &by, c);
                    let gt = g.repair(&gs, repair, None, &by, c, &NoData);
                    match (et, gt) {
                        (Ok(et), Ok(gt)) => {
                            same(&what, &et.effects, &et.state, &gt.effects, &gt.state)?;
                            record(&et.effects, &mut sent);
                            (es, gs) = (et.state, gt.state);
                        }
                        (Err(e), Err(g)) => prop_assert_eq!(e, g, "refusals differ at {}", what),
                        (e, g) => prop_assert!(false, "{}: engine {:?}, graph {:?}", what, e, g),
                    }
                    None
                }
            };
            if let Some(event) = event {
                let c = ctx(now);
                let et = engine::apply(&def, &es, event.clone(), c);
                let gt = g.apply(&gs, event, c, &NoData);
                same(&what, &et.effects, &et.state, &gt.effects, &gt.state)?;
                record(&et.effects, &mut sent);
                (es, gs) = (et.state, gt.state);
            }
        }
    }
}
