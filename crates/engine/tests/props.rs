//! Property tests: the definition loader and the state machine never panic, whatever they are
//! fed, and the engine keeps its invariants over arbitrary event sequences. Each property runs a
//! bounded number of cases so the whole file takes seconds.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use saga_engine::definition::{self, Definition, RetryPolicy, Step};
use saga_engine::engine::{
    self, Ctx, Effect, Event, HistoryEvent, Kind, Operator, Outcome, Repair, SagaState, Status,
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
    check_graph(d)
}

/// What validation promises about an accepted definition's graph.
fn check_graph(d: &Definition) -> Result<(), TestCaseError> {
    let n = d.steps.len();
    prop_assert!(n <= definition::MAX_STEPS);
    prop_assert_eq!(d.check_graph(), Ok(()));
    let order = d.topo_order();
    let mut position = vec![usize::MAX; n];
    for (k, &i) in order.iter().enumerate() {
        position[i] = k;
    }
    prop_assert!(position.iter().all(|&p| p < n), "{:?}", order);
    for i in 0..n {
        for dep in d.deps(i) {
            prop_assert!(position[dep] < position[i], "{} before {}", dep, i);
            prop_assert!(d.is_ancestor(dep, i));
        }
    }
    // Nothing runs alongside the pivot; nothing after it is compensated.
    let before = d.ancestors(d.pivot);
    let after = d.descendants(d.pivot);
    for j in (0..n).filter(|&j| j != d.pivot) {
        prop_assert!(before.contains(&j) != after.contains(&j), "step {}", j);
    }
    for &j in &after {
        prop_assert!(d.steps[j].compensation.is_none(), "step {}", j);
    }
    // Expressions read only what has run by the time they are evaluated.
    for (i, s) in d.steps.iter().enumerate() {
        let ancestors = d.ancestors(i);
        let index = |name: &str| d.step_index(name);
        let reads = s
            .when
            .iter()
            .flat_map(|w| w.steps_read())
            .chain(s.input.iter().flat_map(|m| m.steps_read()));
        for name in reads {
            prop_assert!(
                index(name).is_some_and(|j| ancestors.contains(&j)),
                "{}",
                name
            );
        }
        for name in s.compensation_input.iter().flat_map(|m| m.steps_read()) {
            prop_assert!(
                index(name).is_some_and(|j| j == i || ancestors.contains(&j)),
                "{}",
                name
            );
        }
        if s.compensation_input.is_some() {
            prop_assert!(s.compensation.is_some());
        }
    }
    let linear = (0..n).all(|i| d.deps(i) == i.checked_sub(1).into_iter().collect::<Vec<_>>());
    prop_assert_eq!(d.is_linear(), linear && !d.needs_data());
    // What is stored reads back the same.
    let stored = serde_json::to_value(d).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: Definition =
        serde_json::from_value(stored.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, d);
    prop_assert_eq!(serde_json::to_value(&back).ok(), Some(stored));
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

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The name of the `i`th step: mostly `s<i>`, the names the graph parts refer to.
fn step_name_text(i: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just(format!("s{i}")),
        1 => name_text(),
    ]
}

/// A name in `after`: mostly one of the steps, sometimes none of them.
fn after_name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["s0", "s1", "s2", "s3"]).prop_map(str::to_string),
        1 => name_text(),
    ]
}

/// A CEL expression: mostly plausible, sometimes of the wrong type, reading what it may not,
/// malformed, or too long.
fn expr_text() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        4 => prop::sample::select(vec![
            "input.x == 1",
            "has(input.coupon) && input.coupon != ''",
            "steps.s0.output.id == 'a'",
            "steps.s1.output != null",
            "steps.s2.output.n > 2",
            "saga.id != ''",
            "true",
            "input.items.all(i, i.n > 0)",
            "size(input.list) > 0 ? input.a : input.b",
            "input.x",
            "steps.s3.output.id",
        ])
        .prop_map(str::to_string),
        2 => prop::sample::select(vec![
            "1", "'x'", "input.x +", "(((", "steps.zz.output", "foo", "steps.s0", "saga.name",
            "1 / 0 == 1", "${input.x}", "", "pkg.M{a: 1}", "[1, 2]", "\"q\" == '\\'",
            "b'\\xff'", "1.0 / 0.0", "input.x.y.z[0]['k']", "-(-(-(1)))",
        ])
        .prop_map(str::to_string),
        1 => "[a-z0-9_.()\\[\\]{}=!&|<>+*/%?:' \"\\\\$-]{0,40}",
        1 => (1usize..60).prop_map(|n| format!("{}1{}", "(".repeat(n), ")".repeat(n))),
        1 => Just(format!("input.x == '{}'", "y".repeat(4100))),
    ];
    prop::collection::vec(atom, 1..3).prop_map(|parts| parts.join(" && "))
}

/// An inline TOML value for a mapping: literals, `${…}` strings, nested tables and arrays,
/// sometimes deeper than allowed.
fn mapping_value_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => expr_text().prop_map(|e| toml_str(&format!("${{{e}}}"))),
        1 => "[a-z ${}.]{0,12}".prop_map(|s| toml_str(&s)),
        1 => number_text(),
        1 => float_text(),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
    ];
    leaf.prop_recursive(10, 40, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..4).prop_map(|kv| {
                let fields: Vec<String> =
                    kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

/// A mapping, as `[steps.<key>]` table or inline table; keys may repeat (a TOML error).
fn mapping_text(key: &'static str) -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::collection::vec(("[a-z_]{1,6}", mapping_value_text()), 0..4),
        prop::option::weighted(0.05, mapping_value_text()),
    )
        .prop_map(move |(table, fields, whole)| {
            if let Some(v) = whole {
                return format!("{key} = {v}\n");
            }
            if table {
                let body: String = fields.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                format!("[steps.{key}]\n{body}")
            } else {
                let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{key} = {{ {} }}\n", body.join(", "))
            }
        })
}

/// The graph keys of a step (`after`, `when`, `input`, `compensation_input`), each present
/// with a probability scaled by `weight`. Mappings come last: after a `[steps.input]` header,
/// keys belong to that table.
fn graph_keys_text(weight: f64) -> impl Strategy<Value = String> {
    (
        prop::option::weighted(0.5 * weight, prop::collection::vec(after_name_text(), 0..4)),
        prop::option::weighted(0.4 * weight, expr_text()),
        prop::option::weighted(0.4 * weight, mapping_text("input")),
        prop::option::weighted(0.2 * weight, mapping_text("compensation_input")),
    )
        .prop_map(|(after, when, input, comp_input)| {
            let mut s = String::new();
            if let Some(after) = after {
                let names: Vec<String> = after.iter().map(|n| toml_str(n)).collect();
                s += &format!("after = [{}]\n", names.join(", "));
            }
            if let Some(w) = when {
                s += &format!("when = {}\n", toml_str(&w));
            }
            let mut tables = Vec::new();
            for m in [input, comp_input].into_iter().flatten() {
                if m.starts_with('[') {
                    tables.push(m);
                } else {
                    s += &m;
                }
            }
            for t in tables {
                s += &t;
            }
            s
        })
}

/// A `[[steps]]` table with random values; each optional key present or not.
fn step_text(i: usize) -> impl Strategy<Value = String> {
    (
        step_name_text(i),
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
        // Rare here, so that the other keys still reach their range checks; graph_toml is
        // about them.
        graph_keys_text(0.15),
    )
        .prop_map(|(name, participant, action, comp, timeout, retry, pivot, graph)| {
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
            s + &graph
        })
}

/// A definition whose plain keys are valid and whose graph keys are anything: references to
/// steps that exist or not, earlier or later, expressions good and bad, mappings of any shape.
fn graph_toml() -> impl Strategy<Value = String> {
    let step = |i: usize| {
        (
            prop::option::weighted(0.6, Just(format!("undo{i}"))),
            prop::option::weighted(0.15, Just(true)),
            graph_keys_text(1.0),
        )
            .prop_map(move |(comp, pivot, graph)| {
                let mut s = format!(
                    "[[steps]]\nname = \"s{i}\"\nparticipant = \"p\"\naction = \"do{i}\"\n"
                );
                if let Some(c) = comp {
                    s += &format!("compensation = \"{c}\"\n");
                }
                if pivot.is_some() {
                    s += "pivot = true\n";
                }
                s + &graph
            })
    };
    (1usize..6)
        .prop_flat_map(move |n| (0..n).map(step).collect::<Vec<_>>())
        .prop_map(|steps| format!("name = \"g\"\nversion = 1\n{}", steps.concat()))
}

fn near_valid_toml() -> impl Strategy<Value = String> {
    (
        name_text(),
        number_text(),
        prop::option::of(duration_text()),
        prop::option::of(number_text()),
        (0usize..3).prop_flat_map(|n| (0..n).map(step_text).collect::<Vec<_>>()),
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

/// A graph as the generator meant it, to compare with what the loader decides.
#[derive(Debug, Clone)]
struct GraphSpec {
    /// Per step: explicit `after` (indices), or the default.
    after: Vec<Option<Vec<usize>>>,
    /// Per step: the step read by its `when`, by its input and by its compensation input.
    when: Vec<Option<usize>>,
    input: Vec<Option<usize>>,
    comp_input: Vec<Option<usize>>,
    compensated: Vec<bool>,
    pivot: Option<usize>,
}

impl GraphSpec {
    fn deps(&self, i: usize) -> Vec<usize> {
        self.after[i]
            .clone()
            .unwrap_or_else(|| i.checked_sub(1).into_iter().collect())
    }

    /// Reachability by the definition of `after`, independently of the loader's code.
    fn ancestors(&self) -> Vec<Vec<bool>> {
        let n = self.after.len();
        let mut reach = vec![vec![false; n]; n];
        for (i, row) in reach.iter_mut().enumerate() {
            for d in self.deps(i) {
                row[d] = true;
            }
        }
        for k in 0..n {
            for i in 0..n {
                for j in 0..n {
                    if reach[i][k] && reach[k][j] {
                        reach[i][j] = true;
                    }
                }
            }
        }
        reach
    }

    /// Why the loader must refuse it, if it must.
    // Indices name steps in several parallel tables here: an iterator over one would hide that.
    #[allow(clippy::needless_range_loop)]
    fn fault(&self) -> Option<&'static str> {
        let n = self.after.len();
        let anc = self.ancestors();
        if (0..n).any(|i| anc[i][i]) {
            return Some("cycle");
        }
        for i in 0..n {
            for r in [self.when[i], self.input[i]].into_iter().flatten() {
                if !anc[i][r] {
                    return Some("read");
                }
            }
            if let Some(r) = self.comp_input[i]
                && r != i
                && !anc[i][r]
            {
                return Some("read");
            }
            if self.comp_input[i].is_some() && !self.compensated[i] {
                return Some("no compensation");
            }
        }
        let p = self.pivot.unwrap_or(n - 1);
        if (0..n).any(|j| j != p && !anc[p][j] && !anc[j][p]) {
            return Some("pivot");
        }
        if (0..n).any(|j| anc[j][p] && self.compensated[j]) {
            return Some("compensation after the pivot");
        }
        None
    }

    fn toml(&self) -> String {
        let mut s = String::from("name = \"g\"\nversion = 1\n");
        for i in 0..self.after.len() {
            s += &format!("[[steps]]\nname = \"s{i}\"\nparticipant = \"p\"\naction = \"do{i}\"\n");
            if self.compensated[i] {
                s += &format!("compensation = \"undo{i}\"\n");
            }
            if self.pivot == Some(i) {
                s += "pivot = true\n";
            }
            if let Some(after) = &self.after[i] {
                let names: Vec<String> = after.iter().map(|d| format!("\"s{d}\"")).collect();
                s += &format!("after = [{}]\n", names.join(", "));
            }
            if let Some(r) = self.when[i] {
                s += &format!("when = \"steps.s{r}.output.ok == true || input.force\"\n");
            }
            if let Some(r) = self.input[i] {
                s += &format!(
                    "input = {{ v = \"${{steps.s{r}.output.v}}\", n = 1, at = \"${{saga.id}}\" }}\n"
                );
            }
            if let Some(r) = self.comp_input[i] {
                s +=
                    &format!("compensation_input = {{ ref = [\"${{steps.s{r}.output.ref}}\"] }}\n");
            }
        }
        s
    }
}

/// Graphs of up to 6 steps: `after` mostly pointing backwards (sometimes forwards, making
/// cycles possible), reads of random steps, a random pivot.
fn graph_spec() -> impl Strategy<Value = GraphSpec> {
    (1usize..7).prop_flat_map(|n| {
        let after = prop::collection::vec(
            prop::option::weighted(
                0.7,
                prop::collection::btree_set(0..n, 0..3).prop_map(|s| s.into_iter().collect()),
            ),
            n,
        );
        let read = || prop::collection::vec(prop::option::weighted(0.3, 0..n), n);
        (
            after,
            read(),
            read(),
            read(),
            prop::collection::vec(any::<bool>(), n),
            prop::option::weighted(0.6, 0..n),
            any::<u8>(),
        )
            .prop_map(
                move |(after, when, input, comp_input, compensated, pivot, seed)| {
                    // Mostly acyclic: keep forward edges only for some seeds.
                    let after = after
                        .into_iter()
                        .enumerate()
                        .map(|(i, a): (usize, Option<Vec<usize>>)| {
                            a.map(|v| {
                                v.into_iter()
                                    .filter(|&d| d != i && (d < i || seed % 4 == 0))
                                    .collect()
                            })
                        })
                        .collect();
                    GraphSpec {
                        after,
                        when,
                        input,
                        comp_input,
                        compensated,
                        pivot,
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_loader_decides_graphs_as_their_definition_says(spec in graph_spec()) {
        let text = spec.toml();
        let parsed = definition::parse(Path::new(FILE), &text);
        match (spec.fault(), parsed) {
            (None, Ok(d)) => {
                check_valid(&d)?;
                for i in 0..spec.after.len() {
                    let mut want = spec.deps(i);
                    want.sort_unstable();
                    prop_assert_eq!(d.deps(i), want);
                }
            }
            (Some(fault), Err(e)) => {
                check_error(&text, &e)?;
                if fault == "cycle" {
                    prop_assert!(e.message.contains("cycle"), "{}", e);
                }
            }
            (fault, result) => {
                prop_assert!(false, "expected {:?}, got {:?}\n{}", fault, result.map(|_| ()), text);
            }
        }
    }

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
    fn graph_definitions_are_either_sound_or_refused_with_a_line(text in graph_toml()) {
        match definition::parse(Path::new(FILE), &text) {
            Ok(d) => check_valid(&d)?,
            Err(e) => check_error(&text, &e)?,
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
                        when: None,
                        input: None,
                        compensation_input: None,
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
                        event: HistoryEvent::LateReply { .. },
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

/// The graph generator too: a good share accepted, and graphs among them.
#[test]
fn the_graph_generator_reaches_accepted_graphs() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = graph_toml();
    let accepted: Vec<Definition> = (0..512)
        .filter_map(|_| {
            let text = strategy.new_tree(&mut runner).unwrap().current();
            definition::parse(Path::new(FILE), &text).ok()
        })
        .collect();
    let graphs = accepted.iter().filter(|d| !d.is_linear()).count();
    let with_data = accepted.iter().filter(|d| d.needs_data()).count();
    assert!(
        accepted.len() >= 25 && graphs >= 10 && with_data >= 5,
        "{} accepted, {graphs} graphs, {with_data} with expressions",
        accepted.len()
    );
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
            when: None,
            input: None,
            compensation_input: None,
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
            Effect::History { event, .. } => event.detail().get("delay_ms").cloned(),
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
