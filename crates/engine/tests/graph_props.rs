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
use saga_engine::engine::{self, Ctx, Event, Kind, Operator, Outcome, Repair, SagaState, Status};
use saga_engine::explore;
use saga_engine::graph::{self, Facts, Graph, GraphState, NoData, StepState};
use serde_json::{Value, json};
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
        when: None,
        input: None,
        compensation_input: None,
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
            event,
            step,
            command_id,
        } => format!("history {event:?} {step:?} {command_id:?}"),
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
            event,
            step,
            command_id,
        } => format!("history {event:?} {step:?} {command_id:?}"),
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
        convert_at in prop::option::of(0usize..40),
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
            if convert_at == Some(n) {
                // A saga stored on the old shape, migrated: it carries on exactly as it would
                // have.
                gs = GraphState::from_linear(&def, &es);
                prop_assert_eq!(gs.status, es.status);
                prop_assert_eq!(gs.wake_at(), es.wake_at());
            }
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

/// A graph as `after` lists can draw it, with a pivot comparable with every step: the steps
/// before it (by index) are its ancestors' closure, the ones after it descend from it.
#[derive(Debug, Clone)]
struct Dag {
    def: Definition,
    /// Per step: the `when` answer (None: no condition), and whether its action's and its
    /// compensation's inputs fail to build.
    when: Vec<Option<Result<bool, String>>>,
    input_fails: Vec<(bool, bool)>,
}

fn dag(max_steps: usize) -> impl Strategy<Value = Dag> {
    (1usize..=max_steps)
        .prop_flat_map(|n| {
            (
                Just(n),
                0..n,
                prop::collection::vec(any::<u8>(), n),
                prop::collection::vec(
                    (
                        1u32..4,
                        1u64..20,
                        any::<bool>(),
                        prop::option::weighted(
                            0.3,
                            prop_oneof![
                                3 => any::<bool>().prop_map(Ok),
                                1 => Just(Err("no such key".to_string())),
                            ],
                        ),
                        prop::bool::weighted(0.05),
                        prop::bool::weighted(0.05),
                    ),
                    n,
                ),
                1u32..4,
            )
        })
        .prop_map(|(_, pivot, masks, steps, comp_max)| {
            let mut after: Vec<Vec<usize>> = Vec::new();
            for (i, &mask) in masks.iter().enumerate() {
                let mut deps: Vec<usize> = if i <= pivot { 0..i } else { pivot..i }
                    .filter(|&j| mask & (1 << (j % 8)) != 0)
                    .collect();
                if i == pivot {
                    // Every step before the pivot must be its ancestor: it waits for all sinks.
                    for j in 0..pivot {
                        let is_sink = !after[..pivot].iter().any(|d| d.contains(&j));
                        if is_sink && !deps.contains(&j) {
                            deps.push(j);
                        }
                    }
                } else if i > pivot && deps.is_empty() {
                    deps.push(pivot);
                }
                deps.sort_unstable();
                after.push(deps);
            }
            let mut def_steps = Vec::new();
            let mut when = Vec::new();
            let mut input_fails = Vec::new();
            for (i, ((max, timeout, comp, cond, in_a, in_c), deps)) in
                steps.into_iter().zip(after).enumerate()
            {
                let retry = RetryPolicy {
                    max_attempts: max,
                    initial_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    multiplier: 2.0,
                };
                let mut s = step(i, Duration::from_secs(timeout), retry, comp && i <= pivot);
                s.after = Some(deps);
                def_steps.push(s);
                when.push(cond);
                input_fails.push((in_a, in_c));
            }
            Dag {
                def: Definition {
                    name: "dag".into(),
                    version: 1,
                    description: String::new(),
                    steps: def_steps,
                    pivot,
                    compensation_max_attempts: comp_max,
                },
                when,
                input_fails,
            }
        })
}

impl Facts for Dag {
    fn condition(&self, step: usize, _: &[(usize, &Value)]) -> Result<Option<bool>, String> {
        self.when.get(step).cloned().flatten().transpose()
    }

    fn command_input(
        &self,
        step: usize,
        kind: Kind,
        _: &[(usize, &Value)],
    ) -> Result<Option<Value>, String> {
        let (a, c) = self.input_fails.get(step).copied().unwrap_or_default();
        match (kind, a, c) {
            (Kind::Action, true, _) | (Kind::Compensation, _, true) => Err("missing".into()),
            _ => Ok(Some(json!({"step": step}))),
        }
    }
}

#[derive(Debug, Clone)]
enum DagOp {
    /// A reply to the `n`-th command still in flight.
    Reply {
        to: prop::sample::Index,
        outcome: u8,
    },
    /// A reply to the `n`-th command ever sent: late, duplicate, or current.
    Again {
        to: prop::sample::Index,
        success: bool,
    },
    /// The timer at the wake-up time, or after a jump.
    Timer { at_wake: bool, jump_secs: i64 },
}

fn dag_op() -> impl Strategy<Value = DagOp> {
    prop_oneof![
        6 => (any::<prop::sample::Index>(), 0u8..4).prop_map(|(to, outcome)| DagOp::Reply { to, outcome }),
        2 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(to, success)| DagOp::Again { to, success }),
        3 => (any::<bool>(), -5i64..30).prop_map(|(at_wake, jump_secs)| DagOp::Timer { at_wake, jump_secs }),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// Whatever the order of replies, duplicates, late replies and timers, every transition keeps
    /// the checker's rules, and once participants answer the saga ends keeping them.
    #[test]
    fn on_random_graphs_every_interleaving_keeps_the_invariants_and_ends(
        dag in dag(6),
        ops in prop::collection::vec(dag_op(), 0..60),
    ) {
        let def = &dag.def;
        let g = Graph::new(def);
        let mut s = GraphState::new(def);
        let mut now = T0;
        let mut ids = 0u128;
        let mut sent: Vec<(Uuid, usize, Kind)> = Vec::new();
        let start = s.clone();
        let mut trace: Vec<(Vec<graph::Effect>, GraphState)> = Vec::new();
        let mut apply = |s: &mut GraphState, event: Event, now, sent: &mut Vec<(Uuid, usize, Kind)>| -> Result<(), TestCaseError> {
            ids += 1;
            let ctx = Ctx { now, next_command_id: Uuid::from_u128(ids), jitter: 0.5 };
            let t = g.apply(s, event, ctx, &dag);
            if let Err(e) = explore::check_transition(&g, s, &t.effects, &t.state) {
                prop_assert!(false, "{}\nbefore {:?}\neffects {:?}\nafter {:?}", e, s, t.effects, t.state);
            }
            for e in &t.effects {
                if let graph::Effect::Send(c) = e {
                    prop_assert!(sent.iter().all(|(id, ..)| *id != c.command_id), "id reused");
                    sent.push((c.command_id, c.step, c.kind));
                }
            }
            trace.push((t.effects, t.state.clone()));
            *s = t.state;
            Ok(())
        };
        apply(&mut s, Event::Start, now, &mut sent)?;
        for op in ops {
            let event = match op {
                DagOp::Reply { to, outcome } => {
                    let out: Vec<(usize, Uuid)> = s.steps.iter().enumerate()
                        .filter_map(|(i, st)| st.command_id().map(|id| (i, id))).collect();
                    if out.is_empty() {
                        continue;
                    }
                    let (_, command_id) = out[to.index(out.len())];
                    let outcome = match outcome {
                        0 | 1 => Outcome::Success { output: json!({}) },
                        2 => Outcome::Failure { reason: "busy".into(), retryable: true },
                        _ => Outcome::Failure { reason: "no".into(), retryable: false },
                    };
                    Event::Reply { command_id, outcome, answers: None }
                }
                DagOp::Again { to, success } => {
                    if sent.is_empty() {
                        continue;
                    }
                    let (command_id, step, kind) = sent[to.index(sent.len())];
                    let outcome = if success {
                        Outcome::Success { output: json!({"late": true}) }
                    } else {
                        Outcome::Failure { reason: "late".into(), retryable: false }
                    };
                    Event::Reply { command_id, outcome, answers: Some((step, kind)) }
                }
                DagOp::Timer { at_wake, jump_secs } => {
                    now = match (at_wake, s.wake_at()) {
                        (true, Some(at)) => at,
                        _ => now + time::Duration::seconds(jump_secs),
                    };
                    Event::Timer
                }
            };
            apply(&mut s, event, now, &mut sent)?;
        }
        // Participants now answer everything with a success, in order.
        for _ in 0..500 {
            if s.status != Status::Running && s.status != Status::Compensating {
                break;
            }
            let first = s.steps.iter().find_map(StepState::command_id);
            let event = match first {
                Some(command_id) => Event::Reply { command_id, outcome: Outcome::Success { output: json!({}) }, answers: None },
                None => {
                    let at = s.wake_at();
                    prop_assert!(at.is_some(), "{:?} with nothing to wait for: {:?}", s.status, s);
                    now = now.max(at.unwrap_or(now));
                    Event::Timer
                }
            };
            apply(&mut s, event, now, &mut sent)?;
        }
        prop_assert!(
            matches!(s.status, Status::Completed | Status::Compensated | Status::NeedsOperator),
            "never ended: {:?}", s
        );
        if let Err(e) = explore::check_trace(&g, &start, &trace) {
            prop_assert!(false, "{:?}: {:?}", e, s);
        }
        // Without failing inputs or conditions, a saga whose participants all answer never
        // needs an operator unless a compensation was exhausted.
        let data_fails = dag.when.iter().any(|w| matches!(w, Some(Err(_))))
            || dag.input_fails.iter().any(|&(a, c)| a || c);
        if s.status == Status::NeedsOperator && !data_fails {
            prop_assert!(s.steps.iter().any(|x| matches!(x, StepState::CompFailed { .. })), "{:?}", s);
        }
        let text = serde_json::to_string(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: GraphState = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, s);
    }

}

proptest! {
    // Each case walks every interleaving of a graph: fewer cases, each thorough.
    #![proptest_config(config(128))]

    /// The checker accepts every such graph (small enough to walk), conditions and mappings
    /// included.
    #[test]
    fn the_checker_accepts_random_graphs(dag in dag(5)) {
        let mut shape = explore::Shape::of(&dag.def);
        for (i, w) in dag.when.iter().enumerate() {
            shape.when[i] = w.is_some();
            shape.input[i] = dag.input_fails[i].0;
            shape.compensation_input[i] = dag.input_fails[i].1;
        }
        let r = explore::check_shape(&dag.def, &shape);
        prop_assert!(r.ok(), "{}", r);
    }
}
