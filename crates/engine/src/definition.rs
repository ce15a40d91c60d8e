//! Saga definitions: the TOML files in `sagas/`, parsed and validated into [`Definition`].
//!
//! Every error names the file, the line and the field, because the people reading it are
//! reviewing a pull request or watching `sagad` refuse to start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::expr::{self, Condition, Mapping, PathSeg};

/// A validated saga definition. Serialised into the database so that a saga always finishes on
/// the version it started with, even after the file changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub name: String,
    pub version: u32,
    pub description: String,
    pub steps: Vec<Step>,
    /// Index of the pivot: the last step whose failure still compensates.
    pub pivot: usize,
    /// Failed attempts of one compensation before the saga waits for an operator.
    pub compensation_max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub participant: String,
    pub action: String,
    pub compensation: Option<String>,
    #[serde(with = "millis")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Indices of the steps this one waits for. Parsed from `after = [names]`; when the file
    /// omits `after`, the previous step in the file (none for the first): today's corridor.
    /// Left out of the stored JSON when None, with the three fields below, so that a linear
    /// definition is stored exactly as before graphs existed (start-up compares the stored
    /// snapshot with the file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<usize>>,
    /// Evaluated once when the step becomes ready; false skips the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    /// The command's `input`, when mapped; None: the body carries the saga input and outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Mapping>,
    /// The compensation's `input`, when mapped; None: the step's own command input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_input: Option<Mapping>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts of an action before the saga gives up on it (steps up to the pivot).
    pub max_attempts: u32,
    #[serde(with = "millis")]
    pub initial_backoff: Duration,
    #[serde(with = "millis")]
    pub max_backoff: Duration,
    pub multiplier: f64,
}

impl RetryPolicy {
    /// Back-off before attempt `next_attempt` (2 for the first retry), capped, with "equal
    /// jitter": half the delay is fixed so retries never bunch at zero, half is random.
    /// `jitter` is in [0, 1) and comes from the caller so the engine stays deterministic.
    pub fn backoff(&self, next_attempt: u32, jitter: f64) -> Duration {
        let exp = next_attempt.saturating_sub(2).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let max = self.max_backoff.as_secs_f64();
        // A definition that did not go through validation (built in code, or stored by an
        // older loader) may have a NaN or negative multiplier: fall back to the cap.
        let capped = if base.is_finite() && base >= 0.0 {
            base.min(max)
        } else {
            max
        };
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.5
        };
        Duration::try_from_secs_f64(capped / 2.0 + capped / 2.0 * jitter)
            .unwrap_or(self.max_backoff)
    }
}

impl Definition {
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    pub fn participants(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.participant.as_str())
    }

    /// The steps `i` waits for (resolves the None default to the previous step), ascending.
    /// Indices that cannot be steps of this definition, or `i` itself (only a hand-built or
    /// corrupt definition has them: the loader refuses both), are left out, so that callers may
    /// index `steps` with the result.
    pub fn deps(&self, i: usize) -> Vec<usize> {
        let mut deps = match self.steps.get(i).and_then(|s| s.after.as_ref()) {
            Some(after) => after
                .iter()
                .copied()
                .filter(|&d| d < self.steps.len() && d != i)
                .collect(),
            None => default_deps(i),
        };
        deps.sort_unstable();
        deps.dedup();
        deps
    }

    /// The steps that wait for `i` (directly), ascending.
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&j| self.deps(j).contains(&i))
            .collect()
    }

    /// Every step `i` waits for, directly or not, ascending. Terminates on a cyclic definition.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        self.reach(i, |d, j| d.deps(j))
    }

    /// Every step waiting for `i`, directly or not, ascending.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut children = vec![Vec::new(); self.steps.len()];
        for j in 0..self.steps.len() {
            for d in self.deps(j) {
                if let Some(c) = children.get_mut(d) {
                    c.push(j);
                }
            }
        }
        self.reach(i, |_, j| children.get(j).cloned().unwrap_or_default())
    }

    /// Whether `a` is an ancestor of `b` (`b` waits for `a`, directly or not).
    pub fn is_ancestor(&self, a: usize, b: usize) -> bool {
        self.ancestors(b).binary_search(&a).is_ok()
    }

    fn reach(&self, i: usize, next: impl Fn(&Self, usize) -> Vec<usize>) -> Vec<usize> {
        let mut seen = vec![false; self.steps.len()];
        let mut stack = next(self, i);
        while let Some(j) = stack.pop() {
            match seen.get_mut(j) {
                Some(s) if !*s => {
                    *s = true;
                    stack.extend(next(self, j));
                }
                _ => {}
            }
        }
        seen.iter()
            .enumerate()
            .filter_map(|(j, s)| (*s && j != i).then_some(j))
            .collect()
    }

    /// The steps in an order where each comes after every step it waits for; among the steps
    /// ready at the same point, file order. A linear definition gives `0..len`. On a cyclic
    /// definition (which the loader refuses) the steps of the cycles come last, in file order.
    pub fn topo_order(&self) -> Vec<usize> {
        self.topo().0
    }

    /// Whether any step uses `when`, `input` or `compensation_input` (the driver then loads the
    /// saga's input and outputs before a transition; otherwise it need not).
    pub fn needs_data(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.when.is_some() || s.input.is_some() || s.compensation_input.is_some())
    }

    /// Whether this is a corridor as before graphs: every step waits for the previous one
    /// only, and no step has a condition or a mapped input.
    pub fn is_linear(&self) -> bool {
        !self.needs_data()
            && self.steps.iter().enumerate().all(|(i, s)| {
                s.after
                    .as_ref()
                    .is_none_or(|after| after.as_slice() == default_deps(i).as_slice())
            })
    }

    /// Checks the graph of a definition that did not come through [`parse`] (read back from
    /// the database, or built in code): a bounded number of steps, every `after` names another
    /// step, and there is no cycle.
    pub fn check_graph(&self) -> Result<(), String> {
        let n = self.steps.len();
        if n == 0 || n > MAX_STEPS || self.pivot >= n {
            return Err(format!(
                "{n} steps and pivot #{}: a definition has 1 to {MAX_STEPS} steps, the pivot \
                 one of them",
                self.pivot
            ));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if let Some(after) = &s.after
                && let Some(bad) = after.iter().find(|&&d| d >= n || d == i)
            {
                return Err(format!("step `{}` waits for a step #{bad}", s.name));
            }
        }
        let (order, sorted) = self.topo();
        match order.get(sorted).and_then(|&i| self.steps.get(i)) {
            Some(s) => Err(format!("step `{}` is on a cycle of `after`", s.name)),
            None => Ok(()),
        }
    }

    /// The topological order, and how many of its steps are really sorted (the rest, in file
    /// order, are on or behind a cycle).
    fn topo(&self) -> (Vec<usize>, usize) {
        let n = self.steps.len();
        let deps: Vec<Vec<usize>> = (0..n).map(|i| self.deps(i)).collect();
        let mut placed = vec![false; n];
        let mut order = Vec::with_capacity(n);
        // Quadratic, and definitions are small (MAX_STEPS): simpler than a queue of in-degrees,
        // and it yields the file order among ready steps for free.
        loop {
            let ready = (0..n).find(|&i| {
                placed.get(i) == Some(&false)
                    && deps
                        .get(i)
                        .is_some_and(|ds| ds.iter().all(|&d| placed.get(d) == Some(&true)))
            });
            let Some(i) = ready else { break };
            if let Some(p) = placed.get_mut(i) {
                *p = true;
            }
            order.push(i);
        }
        let sorted = order.len();
        order.extend((0..n).filter(|&i| placed.get(i) == Some(&false)));
        (order, sorted)
    }
}

/// What a step waits for when `after` is not written: the previous step in the file.
fn default_deps(i: usize) -> Vec<usize> {
    i.checked_sub(1).into_iter().collect()
}

/// Durations are stored as milliseconds in the database snapshot.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        // Saturates: `as` would wrap a duration built in code beyond u64 milliseconds.
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Why a definition file was rejected, located precisely enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not on one line (an unreadable file).
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: field `{}`: {}",
            self.file.display(),
            self.line,
            self.field,
            self.message
        )
    }
}

impl std::error::Error for DefinitionError {}

// The file as written. Spans are kept on everything that is checked after parsing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: Spanned<String>,
    version: Spanned<i64>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default)]
    compensation: Option<RawCompensation>,
    #[serde(default)]
    steps: Option<Spanned<Vec<RawStep>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<Spanned<String>>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<Spanned<i64>>,
    initial_backoff: Option<Spanned<String>>,
    max_backoff: Option<Spanned<String>>,
    multiplier: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompensation {
    max_attempts: Spanned<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    participant: Spanned<String>,
    action: Spanned<String>,
    compensation: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    retry: Option<RawRetry>,
    #[serde(default)]
    pivot: Option<Spanned<bool>>,
    after: Option<Spanned<Vec<Spanned<String>>>>,
    when: Option<Spanned<String>>,
    input: Option<Spanned<RawNode>>,
    compensation_input: Option<Spanned<RawNode>>,
}

/// A TOML value with the position of every value inside it, so that an error deep in a mapping
/// still names its line.
enum RawNode {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Spanned<RawNode>>),
    Table(Vec<(String, Spanned<RawNode>)>),
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawNode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<RawNode, E> {
                Ok(RawNode::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawNode, E> {
                Ok(RawNode::Integer(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawNode, E> {
                i64::try_from(v)
                    .map(RawNode::Integer)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<RawNode, E> {
                Ok(RawNode::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawNode, E> {
                Ok(RawNode::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<RawNode, E> {
                Ok(RawNode::String(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawNode, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(RawNode::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawNode, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    // toml hands a datetime over as a one-entry table under a private key; in a
                    // command input it is the text it was written as.
                    if key == DATETIME_KEY {
                        return Ok(RawNode::String(map.next_value::<String>()?));
                    }
                    entries.push((key, map.next_value()?));
                }
                Ok(RawNode::Table(entries))
            }
        }
        d.deserialize_any(Visitor)
    }
}

const DATETIME_KEY: &str = "$__toml_private_datetime";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_COMPENSATION_MAX_ATTEMPTS: u32 = 10;

/// Bounds of a step timeout. Durations are stored in whole milliseconds; beyond a week a
/// participant that never answers is a saga nobody will look at again.
pub const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(7 * 24 * 3600));
/// Bounds of a retry back-off (initial and maximum).
pub const BACKOFF_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(24 * 3600));
/// Bounds of `retry.max_attempts` and `compensation.max_attempts`.
pub const MAX_ATTEMPTS: u32 = 1000;
/// Bounds of `retry.multiplier`.
pub const MULTIPLIER_RANGE: (f64, f64) = (1.0, 10.0);
/// Longest name (definition, step, participant, command).
pub const MAX_NAME_LEN: usize = 128;
/// Most steps in one saga. Graph checks are quadratic in it, and a saga beyond it is a
/// workflow nobody can review.
pub const MAX_STEPS: usize = 256;

const NAME_RULE: &str = "must be 1 to 128 of the characters A-Z, a-z, 0-9, '_' and '-' (it becomes \
     part of an AMQP routing key or queue name, where '.', '*', '#' and spaces have a meaning)";

/// Parses and validates one definition file's text. `file` is only used in errors.
pub fn parse(file: &Path, text: &str) -> Result<Definition, DefinitionError> {
    let ctx = Ctx { file, text };
    let raw: RawDefinition = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;

    let name = raw.name.get_ref().trim().to_string();
    if !is_name(&name) {
        return Err(ctx.err(&raw.name, "name", NAME_RULE));
    }
    let version = *raw.version.get_ref();
    if !(1..=i64::from(i32::MAX)).contains(&version) {
        return Err(ctx.err(&raw.version, "version", "must be a positive integer"));
    }

    let defaults = raw.defaults.unwrap_or_default();
    let default_timeout = match &defaults.timeout {
        Some(t) => ctx.duration(t, "defaults.timeout", TIMEOUT_RANGE)?,
        None => DEFAULT_TIMEOUT,
    };
    let base_retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(30),
        multiplier: 2.0,
    };
    let default_retry = match &defaults.retry {
        Some(r) => ctx.retry(r, &base_retry, "defaults.retry")?,
        None => base_retry,
    };
    let compensation_max_attempts = match &raw.compensation {
        Some(c) => ctx.attempts(&c.max_attempts, "compensation.max_attempts")?,
        None => DEFAULT_COMPENSATION_MAX_ATTEMPTS,
    };

    let Some(raw_steps) = raw.steps else {
        return Err(DefinitionError {
            file: file.to_path_buf(),
            line: 1,
            field: "steps".into(),
            message: "a saga needs at least one step ([[steps]])".into(),
        });
    };
    if raw_steps.get_ref().is_empty() {
        return Err(ctx.err(&raw_steps, "steps", "a saga needs at least one step"));
    }
    if raw_steps.get_ref().len() > MAX_STEPS {
        return Err(ctx.err(
            &raw_steps,
            "steps",
            &format!("a saga may have at most {MAX_STEPS} steps"),
        ));
    }

    let mut steps = Vec::new();
    let mut seen = HashSet::new();
    let mut pivot: Option<(usize, &Spanned<bool>)> = None;
    for (i, rs) in raw_steps.get_ref().iter().enumerate() {
        let field = |f: &str| format!("steps[{i}].{f}");
        let step_name = rs.name.get_ref().trim().to_string();
        if !is_name(&step_name) {
            return Err(ctx.err(&rs.name, &field("name"), NAME_RULE));
        }
        if !seen.insert(step_name.clone()) {
            return Err(ctx.err(
                &rs.name,
                &field("name"),
                &format!("duplicate step name `{step_name}`: step names must be unique"),
            ));
        }
        for (value, f) in [(&rs.participant, "participant"), (&rs.action, "action")] {
            if !is_name(value.get_ref().trim()) {
                return Err(ctx.err(value, &field(f), NAME_RULE));
            }
        }
        if let Some(c) = &rs.compensation
            && !is_name(c.get_ref().trim())
        {
            return Err(ctx.err(c, &field("compensation"), NAME_RULE));
        }
        if let Some(p) = &rs.pivot
            && *p.get_ref()
        {
            if let Some((first, _)) = pivot {
                return Err(ctx.err(
                    p,
                    &field("pivot"),
                    &format!("only one step can be the pivot; steps[{first}] already is"),
                ));
            }
            pivot = Some((i, p));
        }
        let timeout = match &rs.timeout {
            Some(t) => ctx.duration(t, &field("timeout"), TIMEOUT_RANGE)?,
            None => default_timeout,
        };
        let retry = match &rs.retry {
            Some(r) => ctx.retry(r, &default_retry, &field("retry"))?,
            None => default_retry.clone(),
        };
        steps.push(Step {
            name: step_name,
            participant: rs.participant.get_ref().trim().to_string(),
            action: rs.action.get_ref().trim().to_string(),
            compensation: rs
                .compensation
                .as_ref()
                .map(|c| c.get_ref().trim().to_string()),
            timeout,
            retry,
            after: None,
            when: None,
            input: None,
            compensation_input: None,
        });
    }

    // Without an explicit pivot every step may still be undone.
    let explicit_pivot = pivot.map(|(_, p)| p);
    let pivot = pivot.map_or(steps.len() - 1, |(i, _)| i);
    let mut def = Definition {
        name,
        version: version as u32,
        description: raw.description,
        steps,
        pivot,
        compensation_max_attempts,
    };
    ctx.graph(&mut def, raw_steps.get_ref())?;
    ctx.pivot(&def, raw_steps.get_ref(), explicit_pivot)?;
    Ok(def)
}

/// Loads every `*.toml` in `dir`. Fails on the first invalid file, and on two files declaring the
/// same name and version.
pub fn load_dir(dir: &Path) -> Result<Vec<Definition>, DefinitionError> {
    let io_err = |file: &Path, e: std::io::Error| DefinitionError {
        file: file.to_path_buf(),
        line: 0,
        field: "-".into(),
        message: format!("cannot read: {e}"),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut out: Vec<Definition> = Vec::new();
    let mut origin: BTreeMap<(String, u32), PathBuf> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| io_err(&file, e))?;
        let def = parse(&file, &text)?;
        if let Some(other) = origin.insert((def.name.clone(), def.version), file.clone()) {
            let line = line_of_key(&text, "version");
            return Err(DefinitionError {
                file,
                line,
                field: "version".into(),
                message: format!(
                    "{} version {} is also defined in {}",
                    def.name,
                    def.version,
                    other.display()
                ),
            });
        }
        out.push(def);
    }
    Ok(out)
}

/// The loaded definitions, every version, shared by the API and the engine driver.
///
/// Versions come in two kinds: those new sagas may start on (the definition files of this
/// start), and retired ones read back from the database, kept only so that the sagas started on
/// them can finish.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    by_key: BTreeMap<(String, u32), Arc<Definition>>,
    /// Per name, the newest version new sagas start on.
    startable: BTreeMap<String, u32>,
    /// The versions from the files of this start; every other one in `by_key` is retired.
    shipped: HashSet<(String, u32)>,
}

impl Registry {
    /// Adds a version new sagas may start on (the newest such version wins).
    pub fn insert(&mut self, def: Definition) {
        let newest = self
            .startable
            .entry(def.name.clone())
            .or_insert(def.version);
        *newest = (*newest).max(def.version);
        self.shipped.insert((def.name.clone(), def.version));
        self.by_key
            .insert((def.name.clone(), def.version), Arc::new(def));
    }

    /// Adds a version only for the sagas already running on it. A version also passed to
    /// [`Registry::insert`] stays startable.
    pub fn insert_retired(&mut self, def: Definition) {
        self.by_key
            .entry((def.name.clone(), def.version))
            .or_insert_with(|| Arc::new(def));
    }

    pub fn get(&self, name: &str, version: u32) -> Option<Arc<Definition>> {
        self.by_key.get(&(name.to_string(), version)).cloned()
    }

    /// The newest startable version: what new sagas start on.
    pub fn latest(&self, name: &str) -> Option<Arc<Definition>> {
        let version = self.startable.get(name)?;
        self.get(name, *version)
    }

    /// The newest version known, retired or not.
    pub fn newest(&self, name: &str) -> Option<Arc<Definition>> {
        self.versions(name).next_back().cloned()
    }

    /// Every version, by name then version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.by_key.values()
    }

    /// Every version of `name`, oldest first.
    pub fn versions(&self, name: &str) -> impl DoubleEndedIterator<Item = &Arc<Definition>> {
        self.by_key
            .range((name.to_string(), 0)..=(name.to_string(), u32::MAX))
            .map(|(_, def)| def)
    }

    /// The names new sagas can start on, sorted.
    pub fn startable_names(&self) -> impl Iterator<Item = &str> {
        self.startable.keys().map(String::as_str)
    }

    /// Whether `name` is known only from the database: sagas still run on it, none start.
    pub fn is_retired(&self, name: &str) -> bool {
        !self.startable.contains_key(name) && self.versions(name).next().is_some()
    }

    /// Whether this version is known only from the database. An older version whose file is
    /// still shipped is not retired, though new sagas start on the newest one.
    pub fn is_retired_version(&self, name: &str, version: u32) -> bool {
        self.by_key.contains_key(&(name.to_string(), version))
            && !self.shipped.contains(&(name.to_string(), version))
    }
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_at(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text[..offset].bytes().filter(|b| *b == b'\n').count() + 1
    }

    fn err<T>(&self, at: &Spanned<T>, field: &str, message: &str) -> DefinitionError {
        DefinitionError {
            file: self.file.to_path_buf(),
            line: self.line_at(at.span().start),
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> DefinitionError {
        let start = e.span().map_or(0, |s| s.start);
        let line = self.line_at(start);
        // toml reports the position but not the key; the key is what starts that line
        // (`key = value`), or the quoted name in "missing field `x`".
        let message = e.message().trim().to_string();
        let field = backticked(&message)
            .filter(|_| {
                message.starts_with("missing field") || message.starts_with("unknown field")
            })
            .or_else(|| key_of_line(self.text.lines().nth(line - 1).unwrap_or("")))
            .unwrap_or_else(|| "-".to_string());
        DefinitionError {
            file: self.file.to_path_buf(),
            line,
            field,
            message,
        }
    }

    fn duration(
        &self,
        value: &Spanned<String>,
        field: &str,
        (min, max): (Duration, Duration),
    ) -> Result<Duration, DefinitionError> {
        let d = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
            self.err(
                value,
                field,
                &format!(
                    "`{}` is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2m\"",
                    value.get_ref()
                ),
            )
        })?;
        let range = || {
            format!(
                "between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            )
        };
        if d < min {
            return Err(self.err(
                value,
                field,
                &format!(
                    "`{}` is too short: must be at least {}",
                    value.get_ref(),
                    range()
                ),
            ));
        }
        if d > max {
            return Err(self.err(
                value,
                field,
                &format!(
                    "`{}` is too long: must be at most {}",
                    value.get_ref(),
                    range()
                ),
            ));
        }
        // Stored in whole milliseconds: a finer value would silently change.
        if d.subsec_nanos() % 1_000_000 != 0 {
            return Err(self.err(
                value,
                field,
                &format!(
                    "`{}` must be a whole number of milliseconds",
                    value.get_ref()
                ),
            ));
        }
        Ok(d)
    }

    fn attempts(&self, value: &Spanned<i64>, field: &str) -> Result<u32, DefinitionError> {
        match u32::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_ATTEMPTS).contains(&n) => Ok(n),
            _ => Err(self.err(
                value,
                field,
                &format!("must be a positive integer, at most {MAX_ATTEMPTS}"),
            )),
        }
    }

    fn retry(
        &self,
        raw: &RawRetry,
        base: &RetryPolicy,
        field: &str,
    ) -> Result<RetryPolicy, DefinitionError> {
        let mut policy = base.clone();
        if let Some(n) = &raw.max_attempts {
            policy.max_attempts = self.attempts(n, &format!("{field}.max_attempts"))?;
        }
        if let Some(d) = &raw.initial_backoff {
            policy.initial_backoff =
                self.duration(d, &format!("{field}.initial_backoff"), BACKOFF_RANGE)?;
        }
        if let Some(d) = &raw.max_backoff {
            policy.max_backoff =
                self.duration(d, &format!("{field}.max_backoff"), BACKOFF_RANGE)?;
        }
        if let Some(m) = &raw.multiplier {
            let (lo, hi) = MULTIPLIER_RANGE;
            // `contains` is false for NaN, and the infinities are outside the range.
            if !(lo..=hi).contains(m.get_ref()) {
                return Err(self.err(
                    m,
                    &format!("{field}.multiplier"),
                    &format!("must be a number between {lo:.1} and {hi:.1}"),
                ));
            }
            policy.multiplier = *m.get_ref();
        }
        if policy.max_backoff < policy.initial_backoff {
            let at = raw.max_backoff.as_ref().or(raw.initial_backoff.as_ref());
            let message = "max_backoff must not be shorter than initial_backoff";
            return Err(match at {
                Some(at) => self.err(at, &format!("{field}.max_backoff"), message),
                None => DefinitionError {
                    file: self.file.to_path_buf(),
                    line: 0,
                    field: format!("{field}.max_backoff"),
                    message: message.into(),
                },
            });
        }
        Ok(policy)
    }
}

// The graph: `after`, `when`, mappings and the pivot, checked once every step is known.
impl Ctx<'_> {
    /// Resolves `after`, refuses cycles, compiles the expressions and checks what they read
    /// against the graph.
    fn graph(&self, def: &mut Definition, raws: &[RawStep]) -> Result<(), DefinitionError> {
        let names: Vec<String> = def.steps.iter().map(|s| s.name.clone()).collect();
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();

        for (i, rs) in raws.iter().enumerate() {
            let Some(after) = &rs.after else { continue };
            let field = format!("steps[{i}].after");
            let mut deps = Vec::new();
            for dep in after.get_ref() {
                let dep_name = dep.get_ref().trim();
                let Some(&d) = index.get(dep_name) else {
                    return Err(self.err(
                        dep,
                        &field,
                        &expr::bounded(format!(
                            "unknown step `{dep_name}`: the steps are {}",
                            listed(&names)
                        )),
                    ));
                };
                if d == i {
                    return Err(self.err(dep, &field, "a step cannot wait for itself"));
                }
                if deps.contains(&d) {
                    return Err(self.err(dep, &field, &format!("`{dep_name}` is listed twice")));
                }
                deps.push(d);
            }
            if let Some(step) = def.steps.get_mut(i) {
                step.after = Some(deps);
            }
        }

        if let Some(cycle) = find_cycle(def) {
            // A cycle needs an edge to a later step, and only an explicit `after` has one.
            let (at, dep) = cycle
                .iter()
                .enumerate()
                .find_map(|(k, &i)| {
                    let next = *cycle.get(k + 1).or(cycle.first())?;
                    (next > i).then_some((i, next))
                })
                .unwrap_or((0, 0));
            let shown: Vec<String> = cycle
                .iter()
                .chain(cycle.first())
                .map(|&i| format!("`{}`", names.get(i).map_or("?", String::as_str)))
                .collect();
            let message = expr::bounded(format!(
                "the steps wait for one another in a cycle: {} (each waits for the next)",
                shown.join(" -> ")
            ));
            let field = format!("steps[{at}].after");
            let raw_after = raws.get(at).and_then(|r| r.after.as_ref());
            let spot = raw_after.and_then(|a| {
                a.get_ref()
                    .iter()
                    .find(|n| index.get(n.get_ref().trim()) == Some(&dep))
            });
            return Err(match (spot, raw_after) {
                (Some(s), _) => self.err(s, &field, &message),
                (None, Some(a)) => self.err(a, &field, &message),
                (None, None) => self.err(&raws_name(raws, at), &field, &message),
            });
        }

        for (i, rs) in raws.iter().enumerate() {
            let ancestors = def.ancestors(i);
            let scope = |step: &str, own: bool| -> Result<(), String> {
                let Some(&d) = index.get(step) else {
                    return Err(format!(
                        "`steps.{step}`: there is no step `{step}`; the steps are {}",
                        listed(&names)
                    ));
                };
                if d == i && !own {
                    return Err(format!(
                        "`steps.{step}.output` is the step's own output, which it does not have \
                         yet (only its compensation_input may read it)"
                    ));
                }
                if d != i && ancestors.binary_search(&d).is_err() {
                    return Err(format!(
                        "`steps.{step}.output` is not available to step `{}`: `{step}` is not \
                         among the steps it waits for (`after`, directly or not), so it may not \
                         have run yet",
                        names.get(i).map_or("?", String::as_str)
                    ));
                }
                Ok(())
            };
            if let Some(w) = &rs.when {
                let field = format!("steps[{i}].when");
                let cond = Condition::compile(w.get_ref())
                    .and_then(|c| {
                        c.steps_read().try_for_each(|s| scope(s, false))?;
                        Ok(c)
                    })
                    .map_err(|m| self.err(w, &field, &expr::bounded(m)))?;
                if let Some(step) = def.steps.get_mut(i) {
                    step.when = Some(cond);
                }
            }
            for (raw, key, own) in [
                (&rs.input, "input", false),
                (&rs.compensation_input, "compensation_input", true),
            ] {
                let Some(raw) = raw else { continue };
                let field = format!("steps[{i}].{key}");
                let mapping = self.mapping(raw, &field, &|s| scope(s, own))?;
                if let Some(step) = def.steps.get_mut(i) {
                    if own {
                        step.compensation_input = Some(mapping);
                    } else {
                        step.input = Some(mapping);
                    }
                }
            }
            if rs.compensation_input.is_some() && rs.compensation.is_none() {
                let field = format!("steps[{i}].compensation_input");
                return Err(self.err(
                    &raws_name(raws, i),
                    &field,
                    "the step has no compensation to send it to",
                ));
            }
        }
        Ok(())
    }

    /// Builds and checks one mapping; every error names the line of the value at fault.
    fn mapping(
        &self,
        raw: &Spanned<RawNode>,
        field: &str,
        scope: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<Mapping, DefinitionError> {
        if !matches!(raw.get_ref(), RawNode::Table(_)) {
            return Err(self.err(
                raw,
                field,
                "must be a table of fields ([steps.input] or { … })",
            ));
        }
        let json = self.to_json(raw, field, &mut Vec::new())?;
        let at_path = |path: &[PathSeg], message: &str| {
            let text = expr::path_text(path);
            let field = if text.is_empty() {
                field.to_string()
            } else if text.starts_with('[') {
                format!("{field}{text}")
            } else {
                format!("{field}.{text}")
            };
            let node = node_at(raw, path);
            self.err(node, &field, &expr::bounded(message.to_string()))
        };
        let mapping = Mapping::compile(&json).map_err(|e| at_path(&e.path, &e.message))?;
        for (path, _, steps) in mapping.expressions() {
            for s in steps {
                scope(s).map_err(|m| at_path(&path, &m))?;
            }
        }
        Ok(mapping)
    }

    /// The JSON form of a mapping as written. Depth is bounded here already: the TOML may nest
    /// deeper than [`expr::MAX_MAPPING_DEPTH`], and this walk is recursive.
    fn to_json(
        &self,
        node: &Spanned<RawNode>,
        field: &str,
        path: &mut Vec<String>,
    ) -> Result<serde_json::Value, DefinitionError> {
        use serde_json::Value;
        let here = || {
            path.iter().fold(field.to_string(), |acc, p| {
                if p.starts_with('[') {
                    format!("{acc}{p}")
                } else {
                    format!("{acc}.{p}")
                }
            })
        };
        if path.len() >= expr::MAX_MAPPING_DEPTH
            && matches!(node.get_ref(), RawNode::Table(_) | RawNode::Array(_))
        {
            return Err(self.err(
                node,
                &here(),
                &format!(
                    "a mapping may nest at most {} levels of tables and arrays",
                    expr::MAX_MAPPING_DEPTH
                ),
            ));
        }
        Ok(match node.get_ref() {
            RawNode::String(s) => Value::String(s.clone()),
            RawNode::Integer(n) => Value::from(*n),
            RawNode::Bool(b) => Value::Bool(*b),
            RawNode::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => Value::Number(n),
                None => {
                    return Err(self.err(node, &here(), "must be a finite number"));
                }
            },
            RawNode::Array(items) => {
                let mut out = Vec::new();
                for (k, item) in items.iter().enumerate() {
                    path.push(format!("[{k}]"));
                    let v = self.to_json(item, field, path);
                    path.pop();
                    out.push(v?);
                }
                Value::Array(out)
            }
            RawNode::Table(entries) => {
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    path.push(k.clone());
                    let v = self.to_json(v, field, path);
                    path.pop();
                    out.insert(k.clone(), v?);
                }
                Value::Object(out)
            }
        })
    }

    /// Refuses a pivot that could run alongside another step, and compensations after it.
    fn pivot(
        &self,
        def: &Definition,
        raws: &[RawStep],
        explicit: Option<&Spanned<bool>>,
    ) -> Result<(), DefinitionError> {
        let p = def.pivot;
        let pivot_name = def.steps.get(p).map_or("?", |s| s.name.as_str());
        let ancestors = def.ancestors(p);
        let descendants = def.descendants(p);
        let concurrent = (0..def.steps.len()).find(|&j| {
            j != p && ancestors.binary_search(&j).is_err() && descendants.binary_search(&j).is_err()
        });
        if let Some(j) = concurrent {
            let other = def.steps.get(j).map_or("?", |s| s.name.as_str());
            let how = if explicit.is_some() {
                String::new()
            } else {
                " (no step has `pivot = true`, so the last step is the pivot)".to_string()
            };
            let message = expr::bounded(format!(
                "the pivot `{pivot_name}`{how} may run at the same time as `{other}`, which \
                 neither waits for it nor is waited for by it: every other step must come \
                 before or after the pivot"
            ));
            let field = format!("steps[{p}].pivot");
            return Err(match explicit {
                Some(at) => self.err(at, &field, &message),
                None => self.err(&raws_name(raws, p), &field, &message),
            });
        }
        for &i in &descendants {
            let Some(rs) = raws.get(i) else { continue };
            if let Some(c) = &rs.compensation {
                return Err(self.err(
                    c,
                    &format!("steps[{i}].compensation"),
                    &format!(
                        "step `{}` comes after the pivot `{pivot_name}`: it is retried until it \
                         succeeds and is never compensated, so it cannot have a compensation",
                        rs.name.get_ref().trim(),
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The span of a step's name, for errors about the step as a whole.
fn raws_name(raws: &[RawStep], i: usize) -> Spanned<()> {
    let span = raws.get(i).map_or(0..0, |r| r.name.span());
    Spanned::new(span, ())
}

/// The node at `path` in a mapping as written, or the closest enclosing one.
fn node_at<'a>(root: &'a Spanned<RawNode>, path: &[PathSeg]) -> &'a Spanned<RawNode> {
    let mut node = root;
    for seg in path {
        let next = match (node.get_ref(), seg) {
            (RawNode::Table(entries), PathSeg::Key(k)) => {
                entries.iter().find(|(key, _)| key == k).map(|(_, v)| v)
            }
            (RawNode::Array(items), PathSeg::Index(i)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    node
}

/// A cycle of `after`, in "waits for" order, starting at its first step in the file.
fn find_cycle(def: &Definition) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let n = def.steps.len();
    let mut mark = vec![Mark::New; n];
    for start in 0..n {
        if mark.get(start) != Some(&Mark::New) {
            continue;
        }
        // Iterative depth-first search: the path is the stack of open steps.
        // Deps are pushed in reverse so that the lowest is explored first: the cycle reported is
        // the one a reader finds first too.
        let deps_of = |i: usize| def.deps(i).into_iter().rev().collect::<Vec<_>>();
        let mut path: Vec<(usize, Vec<usize>)> = vec![(start, deps_of(start))];
        if let Some(m) = mark.get_mut(start) {
            *m = Mark::Open;
        }
        while let Some((_, pending)) = path.last_mut() {
            match pending.pop() {
                Some(d) => match mark.get(d) {
                    Some(Mark::New) => {
                        if let Some(m) = mark.get_mut(d) {
                            *m = Mark::Open;
                        }
                        path.push((d, deps_of(d)));
                    }
                    Some(Mark::Open) => {
                        let from = path.iter().position(|(s, _)| *s == d).unwrap_or(0);
                        let mut cycle: Vec<usize> =
                            path.iter().skip(from).map(|(s, _)| *s).collect();
                        let first = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| **s)
                            .map_or(0, |(k, _)| k);
                        cycle.rotate_left(first);
                        return Some(cycle);
                    }
                    _ => {}
                },
                None => {
                    if let Some((s, _)) = path.pop()
                        && let Some(m) = mark.get_mut(s)
                    {
                        *m = Mark::Done;
                    }
                }
            }
        }
    }
    None
}

fn listed(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A name that is safe inside AMQP routing keys and queue names (`saga.participant.<p>`,
/// `<definition>.<event>`): no '.', '*', '#' or whitespace, which topic bindings interpret.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

fn key_of_line(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    // Dotted keys (`retry.max_attempts = 3`) are keys too.
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    is_key.then(|| key.to_string())
}

fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| key_of_line(l).as_deref() == Some(key))
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "s"
version = 2

[defaults]
timeout = "5s"

[[steps]]
name = "a"
participant = "p"
action = "do_a"
compensation = "undo_a"

[[steps]]
name = "b"
participant = "q"
action = "do_b"
compensation = "undo_b"
pivot = true
retry = { max_attempts = 5 }

[[steps]]
name = "c"
participant = "p"
action = "do_c"
"#;

    fn parse_str(text: &str) -> Result<Definition, DefinitionError> {
        parse(Path::new("sagas/test.toml"), text)
    }

    #[test]
    fn parses_a_valid_definition_with_defaults_and_overrides() {
        let d = parse_str(GOOD).unwrap();
        assert_eq!(d.name, "s");
        assert_eq!(d.version, 2);
        assert_eq!(d.pivot, 1);
        assert_eq!(d.steps.len(), 3);
        assert_eq!(d.steps[0].timeout, Duration::from_secs(5));
        assert_eq!(d.steps[1].retry.max_attempts, 5);
        assert_eq!(d.steps[0].retry.max_attempts, 3);
        assert_eq!(d.steps[2].compensation, None);
        assert_eq!(
            d.compensation_max_attempts,
            DEFAULT_COMPENSATION_MAX_ATTEMPTS
        );
    }

    #[test]
    fn the_shipped_order_saga_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas");
        let defs = load_dir(&dir).unwrap();
        let order = defs.iter().find(|d| d.name == "order_fulfillment").unwrap();
        let names: Vec<_> = order.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "create_order",
                "authorize_payment",
                "schedule_delivery",
                "approve_order"
            ]
        );
        assert_eq!(order.steps[order.pivot].name, "schedule_delivery");
    }

    #[test]
    fn without_a_pivot_the_last_step_is_the_pivot() {
        let d = parse_str(&GOOD.replace("pivot = true", "")).unwrap();
        assert_eq!(d.pivot, 2);
    }

    fn rejects(text: &str, line: usize, field: &str, needle: &str) {
        let e = parse_str(text).expect_err("must be rejected");
        assert_eq!(e.file, Path::new("sagas/test.toml"));
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
        assert!(
            e.message.contains(needle),
            "message {:?} lacks {needle:?}",
            e.message
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("sagas/test.toml:{line}: field `{field}`")),
            "{shown}"
        );
    }

    #[test]
    fn invalid_definitions_name_file_line_and_field() {
        // Unknown field in a step.
        rejects(
            &GOOD.replace("action = \"do_b\"", "action = \"do_b\"\nparticipnt = \"x\""),
            18,
            "participnt",
            "unknown field",
        );
        // Duplicate step names.
        rejects(
            &GOOD.replace("name = \"c\"", "name = \"a\""),
            23,
            "steps[2].name",
            "duplicate step name `a`",
        );
        // A compensation after the pivot.
        rejects(
            &GOOD.replace(
                "action = \"do_c\"",
                "action = \"do_c\"\ncompensation = \"undo_c\"",
            ),
            26,
            "steps[2].compensation",
            "after the pivot",
        );
        // A bad duration.
        rejects(
            &GOOD.replace("timeout = \"5s\"", "timeout = \"five seconds\""),
            6,
            "defaults.timeout",
            "not a duration",
        );
        // An empty saga.
        rejects(
            "name = \"s\"\nversion = 1\nsteps = []\n",
            3,
            "steps",
            "at least one step",
        );
        rejects(
            "name = \"s\"\nversion = 1\n",
            1,
            "steps",
            "at least one step",
        );
        // A missing required field.
        rejects(
            "name = \"s\"\nversion = 1\n[[steps]]\nname = \"a\"\nparticipant = \"p\"\n",
            3,
            "action",
            "missing field",
        );
        // A wrong type.
        rejects(
            "name = \"s\"\nversion = \"one\"\n",
            2,
            "version",
            "invalid type",
        );
        // Two pivots.
        rejects(
            &GOOD.replace("action = \"do_a\"", "action = \"do_a\"\npivot = true"),
            20,
            "steps[1].pivot",
            "only one step",
        );
        // A zero or negative number.
        rejects(
            &GOOD.replace("max_attempts = 5", "max_attempts = 0"),
            20,
            "steps[1].retry.max_attempts",
            "positive",
        );
        // Backoff bounds the wrong way round.
        rejects(
            &GOOD.replace(
                "max_attempts = 5",
                "initial_backoff = \"1m\", max_backoff = \"1s\"",
            ),
            20,
            "steps[1].retry.max_backoff",
            "shorter",
        );
    }

    #[test]
    fn out_of_range_numbers_durations_and_names_are_refused() {
        let timeout = |v: &str| GOOD.replace("timeout = \"5s\"", &format!("timeout = \"{v}\""));
        rejects(&timeout("8000y"), 6, "defaults.timeout", "at most");
        rejects(&timeout("8d"), 6, "defaults.timeout", "at most");
        rejects(&timeout("500us"), 6, "defaults.timeout", "at least");
        rejects(
            &timeout("1ms 500us"),
            6,
            "defaults.timeout",
            "whole number of milliseconds",
        );
        assert!(parse_str(&timeout("7days")).is_ok());
        assert!(parse_str(&timeout("1ms")).is_ok());
        let retry = |v: &str| GOOD.replace("max_attempts = 5", v);
        rejects(
            &retry("initial_backoff = \"20000y\", max_backoff = \"20000y\""),
            20,
            "steps[1].retry.initial_backoff",
            "at most",
        );
        rejects(
            &retry("max_backoff = \"25h\""),
            20,
            "steps[1].retry.max_backoff",
            "at most",
        );
        rejects(
            &retry("max_attempts = 1001"),
            20,
            "steps[1].retry.max_attempts",
            "at most 1000",
        );
        for m in ["nan", "inf", "-inf", "0.5", "11.0"] {
            rejects(
                &retry(&format!("multiplier = {m}")),
                20,
                "steps[1].retry.multiplier",
                "between 1.0 and 10.0",
            );
        }
        rejects(
            &GOOD.replace(
                "version = 2",
                "version = 2\n[compensation]\nmax_attempts = 100000",
            ),
            5,
            "compensation.max_attempts",
            "at most 1000",
        );
        for bad in ["p.q", "p*", "p#", "p q", "p/q", "é"] {
            rejects(
                &GOOD.replace("participant = \"q\"", &format!("participant = \"{bad}\"")),
                16,
                "steps[1].participant",
                "routing key",
            );
        }
        rejects(
            &GOOD.replace("name = \"s\"", "name = \"s.v1\""),
            2,
            "name",
            "routing key",
        );
        rejects(
            &GOOD.replace("name = \"a\"", "name = \"a b\""),
            9,
            "steps[0].name",
            "routing key",
        );
        rejects(
            &GOOD.replace("\"do_a\"", "\"do.a\""),
            11,
            "steps[0].action",
            "routing key",
        );
        rejects(
            &GOOD.replace("\"undo_a\"", "\"undo#a\""),
            12,
            "steps[0].compensation",
            "routing key",
        );
    }

    #[test]
    fn backoff_never_panics_on_values_validation_would_refuse() {
        let p = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            multiplier: f64::NAN,
        };
        assert_eq!(p.backoff(u32::MAX, 1.0), Duration::MAX);
        assert!(p.backoff(2, f64::NAN) < Duration::MAX);
        let p = RetryPolicy {
            multiplier: -3.0,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..p
        };
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(3, f64::NAN), Duration::from_millis(750));
    }

    #[test]
    fn backoff_grows_exponentially_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
        };
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 0.0), Duration::from_millis(100));
        assert_eq!(p.backoff(30, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(30, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn registry_serves_latest_and_pinned_versions() {
        let mut r = Registry::default();
        let mut d = parse_str(GOOD).unwrap();
        r.insert(d.clone());
        d.version = 10;
        r.insert(d);
        assert_eq!(r.latest("s").unwrap().version, 10);
        assert_eq!(r.get("s", 2).unwrap().version, 2);
        assert!(r.latest("t").is_none());
    }

    #[test]
    fn retired_versions_serve_running_sagas_but_never_new_ones() {
        let mut r = Registry::default();
        let mut d = parse_str(GOOD).unwrap();
        let v2 = d.clone();
        d.version = 10;
        r.insert_retired(d.clone());
        r.insert(v2.clone());
        r.insert_retired(v2);
        assert_eq!(r.latest("s").unwrap().version, 2);
        assert_eq!(r.get("s", 10).unwrap().version, 10);
        d.name = "gone".into();
        r.insert_retired(d);
        assert!(r.latest("gone").is_none());
        assert!(r.get("gone", 10).is_some());
        assert!(r.is_retired("gone") && !r.is_retired("s") && !r.is_retired("never"));
        assert_eq!(r.startable_names().collect::<Vec<_>>(), ["s"]);
        // Per version: v10 is retired even though it is the newest; v2 was also inserted.
        assert!(r.is_retired_version("s", 10) && !r.is_retired_version("s", 2));
        assert!(r.is_retired_version("gone", 10) && !r.is_retired_version("s", 3));
        assert_eq!(r.newest("s").unwrap().version, 10);
        assert_eq!(r.newest("gone").unwrap().version, 10);
        assert!(r.newest("never").is_none());
        let versions = |name| {
            r.versions(name)
                .rev()
                .map(|d| d.version)
                .collect::<Vec<_>>()
        };
        assert_eq!((versions("s"), versions("never")), (vec![10, 2], vec![]));
    }

    /// a -> (b when …, c) -> d (pivot) -> e, with mapped inputs.
    const GRAPH: &str = r#"
name = "g"
version = 1

[[steps]]
name = "a"
participant = "p"
action = "do_a"
compensation = "undo_a"

[[steps]]
name = "b"
after = ["a"]
when = "input.go == true"
participant = "p"
action = "do_b"
compensation = "undo_b"
[steps.input]
id = "${steps.a.output.id}"
[steps.compensation_input]
ref = "${steps.b.output.ref}"

[[steps]]
name = "c"
after = ["a"]
participant = "p"
action = "do_c"
compensation = "undo_c"

[[steps]]
name = "d"
after = ["b", "c"]
participant = "p"
action = "do_d"
pivot = true

[[steps]]
name = "e"
participant = "p"
action = "do_e"
[steps.input]
total = "${steps.d.output.total}"
nested = { list = [1, "${input.x}"], deeper = { id = "${steps.a.output.id}" } }
"#;

    /// The 1-based line of the first line containing `needle`.
    fn at(text: &str, needle: &str) -> usize {
        text.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{needle:?} not in the text"))
    }

    /// `GRAPH` with `from` replaced by `to`, and the line where `to` now is.
    fn graph_with(from: &str, to: &str) -> (String, usize) {
        assert!(GRAPH.contains(from), "{from:?}");
        let text = GRAPH.replacen(from, to, 1);
        let line = at(&text, to.lines().next().unwrap_or(to));
        (text, line)
    }

    #[test]
    fn a_graph_parses_into_deps_ancestors_and_an_order() {
        let d = parse_str(GRAPH).unwrap();
        assert_eq!(d.pivot, 3);
        let deps: Vec<Vec<usize>> = (0..5).map(|i| d.deps(i)).collect();
        assert_eq!(deps, [vec![], vec![0], vec![0], vec![1, 2], vec![3]]);
        assert_eq!(d.steps[4].after, None, "e keeps the default");
        assert_eq!(d.ancestors(3), [0, 1, 2]);
        assert_eq!(d.ancestors(4), [0, 1, 2, 3]);
        assert_eq!(d.descendants(0), [1, 2, 3, 4]);
        assert_eq!(d.descendants(1), [3, 4]);
        assert_eq!(d.dependents(0), [1, 2]);
        assert!(d.is_ancestor(2, 4) && !d.is_ancestor(1, 2) && !d.is_ancestor(2, 1));
        assert_eq!(d.topo_order(), [0, 1, 2, 3, 4]);
        assert!(d.needs_data() && !d.is_linear());
        assert_eq!(d.check_graph(), Ok(()));
        assert_eq!(
            d.steps[1].when.as_ref().unwrap().source(),
            "input.go == true"
        );
        assert_eq!(
            d.steps[4].input.as_ref().unwrap().source(),
            &serde_json::json!({
                "total": "${steps.d.output.total}",
                "nested": {"list": [1, "${input.x}"], "deeper": {"id": "${steps.a.output.id}"}},
            })
        );
    }

    #[test]
    fn steps_may_wait_for_later_ones_and_the_order_follows_the_graph() {
        let text = GOOD
            .replace("name = \"a\"", "name = \"a\"\nafter = [\"c\"]")
            .replace("name = \"c\"", "name = \"c\"\nafter = []")
            .replace("compensation = \"undo_b\"\npivot = true", "pivot = true")
            .replace("compensation = \"undo_a\"", "");
        let d = parse_str(&text).unwrap();
        assert_eq!(d.topo_order(), [2, 0, 1]);
        assert_eq!(d.deps(2), Vec::<usize>::new());
        assert!(!d.is_linear() && !d.needs_data());
    }

    #[test]
    fn today_s_files_are_linear_and_mean_what_they_meant() {
        let d = parse_str(GOOD).unwrap();
        assert!(d.is_linear() && !d.needs_data());
        assert_eq!(
            (0..3).map(|i| d.deps(i)).collect::<Vec<_>>(),
            [vec![], vec![0], vec![1]]
        );
        assert!(d.steps.iter().all(|s| s.after.is_none()));
        // Writing the default out is still a corridor.
        let explicit = GOOD
            .replace("name = \"b\"", "name = \"b\"\nafter = [\"a\"]")
            .replace("name = \"a\"", "name = \"a\"\nafter = []");
        let e = parse_str(&explicit).unwrap();
        assert!(e.is_linear());
        assert_eq!(e.steps[1].after, Some(vec![0]));
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas");
        let shipped: Vec<(String, bool)> = load_dir(&dir)
            .unwrap()
            .iter()
            .map(|d| (d.name.clone(), d.is_linear()))
            .collect();
        assert_eq!(
            shipped,
            [
                ("food_delivery".to_string(), false),
                ("order_fulfillment".to_string(), true)
            ]
        );
    }

    #[test]
    fn graph_errors_name_file_line_and_field() {
        let cases: [(&str, &str, &str, &str); 22] = [
            // `after`
            (
                "after = [\"b\", \"c\"]",
                "after = [\"b\", \"x\"]",
                "steps[3].after",
                "unknown step `x`",
            ),
            (
                "after = [\"b\", \"c\"]",
                "after = [\"b\", \"b\"]",
                "steps[3].after",
                "listed twice",
            ),
            (
                "after = [\"b\", \"c\"]",
                "after = [\"d\"]",
                "steps[3].after",
                "cannot wait for itself",
            ),
            (
                "name = \"a\"\n",
                "name = \"a\"\nafter = [\"d\"]\n",
                "steps[0].after",
                "cycle: `a` -> `d` -> `b` -> `a` (each waits for the next)",
            ),
            // `when`
            (
                "when = \"input.go == true\"",
                "when = \"input.go ==\"",
                "steps[1].when",
                "syntax error",
            ),
            (
                "when = \"input.go == true\"",
                "when = \"'yes'\"",
                "steps[1].when",
                "must be a bool",
            ),
            (
                "when = \"input.go == true\"",
                "when = \"input.go + 1\"",
                "steps[1].when",
                "must be a bool",
            ),
            (
                "when = \"input.go == true\"",
                "when = \"go == true\"",
                "steps[1].when",
                "unknown variable `go`",
            ),
            (
                "when = \"input.go == true\"",
                "when = \"steps.c.output.x\"",
                "steps[1].when",
                "not among the steps it waits for",
            ),
            (
                "when = \"input.go == true\"",
                "when = \"steps.b.output.x\"",
                "steps[1].when",
                "own output",
            ),
            (
                "when = \"input.go == true\"",
                "when = \"steps.z.output.x\"",
                "steps[1].when",
                "there is no step `z`",
            ),
            // mappings
            (
                "id = \"${steps.a.output.id}\"",
                "id = \"${steps.c.output.id}\"",
                "steps[1].input.id",
                "not among the steps",
            ),
            (
                "id = \"${steps.a.output.id}\"",
                "id = \"${steps.b.output.id}\"",
                "steps[1].input.id",
                "own output",
            ),
            (
                "id = \"${steps.a.output.id}\"",
                "id = \"${steps.a.outputs.id}\"",
                "steps[1].input.id",
                "`steps.a.outputs` is not available",
            ),
            (
                "id = \"${steps.a.output.id}\"",
                "id = \"${saga.name}\"",
                "steps[1].input.id",
                "saga.id",
            ),
            (
                "id = \"${steps.a.output.id}\"",
                "id = \"${steps.a.output.id +}\"",
                "steps[1].input.id",
                "syntax error",
            ),
            (
                "id = \"${steps.a.output.id}\"",
                "id = inf",
                "steps[1].input.id",
                "finite",
            ),
            (
                "ref = \"${steps.b.output.ref}\"",
                "ref = \"${steps.c.output.ref}\"",
                "steps[1].compensation_input.ref",
                "not among the steps",
            ),
            (
                "deeper = { id = \"${steps.a.output.id}\" }",
                "deeper = { id = [\"${steps.x.output.id}\"] }",
                "steps[4].input.nested.deeper.id[0]",
                "no step `x`",
            ),
            // pivot
            (
                "pivot = true",
                "pivot = true\ncompensation = \"undo_d\"",
                "steps[3].pivot",
                "",
            ),
            (
                "participant = \"p\"\naction = \"do_e\"",
                "participant = \"p\"\naction = \"do_e\"\ncompensation = \"undo_e\"",
                "steps[4].compensation",
                "after the pivot",
            ),
            (
                "after = [\"b\", \"c\"]\nparticipant = \"p\"\naction = \"do_d\"\npivot = true",
                "after = [\"b\"]\nparticipant = \"p\"\naction = \"do_d\"\npivot = true",
                "steps[3].pivot",
                "at the same time as `c`",
            ),
        ];
        for (from, to, field, needle) in cases {
            let (text, line) = graph_with(from, to);
            if needle.is_empty() {
                // Not an error: the pivot may have a compensation.
                assert!(parse_str(&text).is_ok(), "{to}");
                continue;
            }
            let line = match field {
                "steps[3].pivot" => at(&text, "pivot = true"),
                "steps[0].after" => at(&text, "after = [\"d\"]"),
                "steps[4].compensation" => at(&text, "undo_e"),
                _ => line,
            };
            rejects(&text, line, field, needle);
        }
    }

    #[test]
    fn more_graph_errors_name_their_line() {
        // A pivot by default (the last step) that runs alongside another step.
        let text = GRAPH
            .replace("pivot = true\n", "")
            .replace("name = \"e\"\n", "name = \"e\"\nafter = [\"a\"]\n")
            .replace("${steps.d.output.total}", "${input.total}");
        rejects(
            &text,
            at(&text, "name = \"e\""),
            "steps[4].pivot",
            "no step has `pivot = true`",
        );
        // A compensation on a descendant of the pivot that is not after it in the file.
        let text = GOOD
            .replace("name = \"c\"", "name = \"c\"\nafter = [\"a\"]")
            .replace("compensation = \"undo_b\"\npivot = true\n", "")
            .replace("name = \"a\"", "name = \"a\"\npivot = true")
            .replace(
                "action = \"do_c\"",
                "action = \"do_c\"\ncompensation = \"undo_c\"",
            );
        rejects(
            &text,
            at(&text, "undo_c"),
            "steps[2].compensation",
            "after the pivot `a`",
        );
        // A mapping that is not a table.
        let text = GOOD.replace(
            "action = \"do_c\"",
            "action = \"do_c\"\ninput = \"${input}\"",
        );
        rejects(
            &text,
            at(&text, "input = "),
            "steps[2].input",
            "must be a table",
        );
        // Nested too deep.
        let deep = format!("input = {{ a = {}1{} }}", "[".repeat(8), "]".repeat(8));
        let text = GOOD.replace("action = \"do_c\"", &format!("action = \"do_c\"\n{deep}"));
        rejects(
            &text,
            at(&text, "input = "),
            "steps[2].input.a[0][0][0][0][0][0][0]",
            "nest",
        );
        // A compensation input without a compensation.
        let text = GOOD.replace(
            "action = \"do_c\"",
            "action = \"do_c\"\ncompensation_input = { a = 1 }",
        );
        rejects(
            &text,
            at(&text, "name = \"c\""),
            "steps[2].compensation_input",
            "no compensation",
        );
        // Too many steps.
        let step = "[[steps]]\nname = \"s{i}\"\nparticipant = \"p\"\naction = \"a\"\n";
        let many: String = (0..=MAX_STEPS)
            .map(|i| step.replace("{i}", &i.to_string()))
            .collect();
        let text = format!("name = \"s\"\nversion = 1\n{many}");
        rejects(&text, 3, "steps", "at most 256 steps");
        let most: String = (0..MAX_STEPS)
            .map(|i| step.replace("{i}", &i.to_string()))
            .collect();
        let text = format!("name = \"s\"\nversion = 1\n{most}");
        assert!(parse_str(&text).is_ok());
    }

    #[test]
    fn deeply_nested_toml_in_a_mapping_is_refused_without_overflowing() {
        for n in [9, 100, 10_000] {
            let deep = format!("input = {{ a = {}1{} }}", "[".repeat(n), "]".repeat(n));
            let text = GOOD.replace("action = \"do_c\"", &format!("action = \"do_c\"\n{deep}"));
            let handle = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || parse_str(&text).map(|_| ()))
                .unwrap();
            assert!(handle.join().unwrap().is_err(), "{n}");
        }
    }

    #[test]
    fn each_graph_key_makes_a_definition_more_than_a_corridor() {
        for (from, to) in [
            ("name = \"c\"", "name = \"c\"\nafter = [\"a\", \"b\"]"),
            ("name = \"c\"", "name = \"c\"\nwhen = \"input.x == 1\""),
            ("action = \"do_c\"", "action = \"do_c\"\ninput = { x = 1 }"),
            (
                "action = \"do_a\"",
                "action = \"do_a\"\ncompensation_input = { x = \"${steps.a.output.x}\" }",
            ),
        ] {
            let d = parse_str(&GOOD.replace(from, to)).unwrap();
            assert!(!d.is_linear(), "{to}");
        }
        assert!(parse_str(GOOD).unwrap().is_linear());
        // Writing the default out is still a corridor.
        let text = GOOD.replace("name = \"b\"", "name = \"b\"\nafter = [\"a\"]");
        assert!(parse_str(&text).unwrap().is_linear());
    }

    #[test]
    fn an_expression_too_long_is_refused() {
        let long = format!("when = \"input.x == '{}'\"", "y".repeat(expr::MAX_EXPR_LEN));
        let (text, line) = graph_with("when = \"input.go == true\"", &long);
        rejects(&text, line, "steps[1].when", "at most 4096 bytes");
    }

    #[test]
    fn definitions_round_trip_through_their_stored_json() {
        for text in [GRAPH, GOOD] {
            let d = parse_str(text).unwrap();
            let json = serde_json::to_value(&d).unwrap();
            let back: Definition = serde_json::from_value(json.clone()).unwrap();
            assert_eq!(back, d);
            assert_eq!(serde_json::to_value(&back).unwrap(), json);
        }
    }

    /// A definition as stored by the loader before graphs: no `after`, `when` or mappings.
    const STORED_BEFORE_GRAPHS: &str = r#"{"name":"order_fulfillment","version":1,
        "description":"Create an order, take payment, schedule delivery, approve the order",
        "steps":[
          {"name":"create_order","participant":"order","action":"create_order",
           "compensation":"cancel_order","timeout":10000,
           "retry":{"max_attempts":3,"initial_backoff":200,"max_backoff":30000,"multiplier":2.0}},
          {"name":"authorize_payment","participant":"payment","action":"authorize_payment",
           "compensation":"refund_payment","timeout":15000,
           "retry":{"max_attempts":3,"initial_backoff":200,"max_backoff":30000,"multiplier":2.0}},
          {"name":"schedule_delivery","participant":"delivery","action":"schedule_delivery",
           "compensation":"cancel_delivery","timeout":10000,
           "retry":{"max_attempts":3,"initial_backoff":200,"max_backoff":30000,"multiplier":2.0}},
          {"name":"approve_order","participant":"order","action":"approve_order",
           "compensation":null,"timeout":10000,
           "retry":{"max_attempts":3,"initial_backoff":200,"max_backoff":30000,"multiplier":2.0}}],
        "pivot":2,"compensation_max_attempts":10}"#;

    #[test]
    fn a_snapshot_stored_before_graphs_reads_back_as_the_same_corridor() {
        let stored: serde_json::Value = serde_json::from_str(STORED_BEFORE_GRAPHS).unwrap();
        let d: Definition = serde_json::from_value(stored.clone()).unwrap();
        assert!(d.is_linear() && !d.needs_data());
        assert_eq!(
            (0..4).map(|i| d.deps(i)).collect::<Vec<_>>(),
            [vec![], vec![0], vec![1], vec![2]]
        );
        assert_eq!(d.topo_order(), [0, 1, 2, 3]);
        assert_eq!(d.check_graph(), Ok(()));
        // Start-up compares the stored body with the file's: the shipped file must still
        // serialize to exactly what was stored.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas/order_fulfillment.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let parsed = parse(&file, &text).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), stored);
        assert_eq!(parsed, d);
    }

    #[test]
    fn check_graph_refuses_what_a_corrupt_snapshot_could_hold() {
        let mut d = parse_str(GRAPH).unwrap();
        d.steps[0].after = Some(vec![4]);
        assert!(d.check_graph().unwrap_err().contains("cycle"));
        // deps and topo_order stay usable on it.
        assert_eq!(d.deps(0), [4]);
        assert_eq!(d.topo_order().len(), 5);
        assert_eq!(
            d.ancestors(0),
            [0, 1, 2, 3, 4]
                .into_iter()
                .filter(|&i| i != 0)
                .collect::<Vec<_>>()
        );
        d.steps[0].after = Some(vec![9, 0]);
        assert!(d.check_graph().is_err());
        assert_eq!(d.deps(0), Vec::<usize>::new());
    }

    #[test]
    fn the_food_delivery_saga_is_a_valid_graph() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas/food_delivery.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let d = parse(&file, &text).unwrap();
        let names: Vec<&str> = d.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "create_order",
                "authorize_payment",
                "shop_accepts",
                "redeem_coupon",
                "dispatch_rider",
                "notify_customer"
            ]
        );
        assert_eq!(d.steps[d.pivot].name, "dispatch_rider");
        assert_eq!(d.deps(4), [1, 2, 3]);
        for branch in 1..=3 {
            assert_eq!(d.deps(branch), [0]);
        }
        assert!(d.steps[3].when.is_some());
        assert!(d.steps.iter().all(|s| s.input.is_some()));
        // Rendered as a command would be: the branches get only what they need.
        let input = serde_json::json!({"customer_id": "c-1", "shop_id": "s-9", "items": [{"sku": "x", "qty": 2}],
            "amount_cents": 12900, "address": "1 Main St", "coupon": "WELCOME"});
        let outputs = [
            Some(serde_json::json!({"order_id": "o-7"})),
            Some(serde_json::json!({})),
            Some(serde_json::json!({})),
            Some(serde_json::Value::Null),
            None,
            None,
        ];
        let data = expr::Data {
            input: &input,
            saga_id: uuid::Uuid::nil(),
            outputs: &outputs,
        };
        let pay = d.steps[1]
            .input
            .as_ref()
            .unwrap()
            .render(&d, 1, &data)
            .unwrap();
        assert_eq!(
            pay,
            serde_json::json!({"order_id": "o-7", "amount_cents": 12900, "currency": "KRW"})
        );
        assert_eq!(
            d.steps[3].when.as_ref().unwrap().eval(&d, 3, &data),
            Ok(true)
        );
        let no_coupon = serde_json::json!({"customer_id": "c-1"});
        let data2 = expr::Data {
            input: &no_coupon,
            ..data
        };
        assert_eq!(
            d.steps[3].when.as_ref().unwrap().eval(&d, 3, &data2),
            Ok(false)
        );
        let rider = d.steps[4]
            .input
            .as_ref()
            .unwrap()
            .render(&d, 4, &data)
            .unwrap();
        assert_eq!(
            rider["coupon_applied"],
            serde_json::json!(false),
            "a skipped coupon reads null"
        );
    }
}
