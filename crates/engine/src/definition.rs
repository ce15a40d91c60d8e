//! Saga definitions: the TOML files in `sagas/`, parsed and validated into [`Definition`].
//!
//! Every error names the file, the line and the field, because the people reading it are
//! reviewing a pull request or watching `sagad` refuse to start.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

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
    /// Indices of the steps this one waits for; None: the previous step (see Definition::deps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<usize>>,
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

    /// The steps `i` waits for (resolves the None default to the previous step).
    pub fn deps(&self, i: usize) -> Vec<usize> {
        let mut deps: Vec<usize> = match self.steps.get(i).and_then(|s| s.after.as_ref()) {
            Some(after) => after
                .iter()
                .copied()
                .filter(|&d| d < self.steps.len() && d != i)
                .collect(),
            None => i.checked_sub(1).into_iter().collect(),
        };
        deps.sort_unstable();
        deps.dedup();
        deps
    }

    pub fn participants(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.participant.as_str())
    }
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
}

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
        });
    }

    // Without an explicit pivot every step may still be undone.
    let pivot = pivot.map_or(steps.len() - 1, |(i, _)| i);
    for (i, rs) in raw_steps.get_ref().iter().enumerate().skip(pivot + 1) {
        if let Some(c) = &rs.compensation {
            return Err(ctx.err(
                c,
                &format!("steps[{i}].compensation"),
                &format!(
                    "step `{}` comes after the pivot `{}`: it is retried until it succeeds and is \
                     never compensated, so it cannot have a compensation",
                    rs.name.get_ref(),
                    steps.get(pivot).map_or("?", |s| s.name.as_str())
                ),
            ));
        }
    }

    Ok(Definition {
        name,
        version: version as u32,
        description: raw.description,
        steps,
        pivot,
        compensation_max_attempts,
    })
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
}

impl Registry {
    /// Adds a version new sagas may start on (the newest such version wins).
    pub fn insert(&mut self, def: Definition) {
        let newest = self
            .startable
            .entry(def.name.clone())
            .or_insert(def.version);
        *newest = (*newest).max(def.version);
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

    pub fn all(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.by_key.values()
    }

    /// The names new sagas can start on, sorted.
    pub fn startable_names(&self) -> impl Iterator<Item = &str> {
        self.startable.keys().map(String::as_str)
    }

    /// Whether `name` is known only from the database: sagas still run on it, none start.
    pub fn is_retired(&self, name: &str) -> bool {
        !self.startable.contains_key(name)
            && self
                .by_key
                .range((name.to_string(), 0)..=(name.to_string(), u32::MAX))
                .next()
                .is_some()
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
    }
}
