//! Expressions in saga definitions: `when` conditions and the `${…}` fields of mapped inputs,
//! written in CEL.
//!
//! The `cel` crate is pre-1.0: everything this crate needs from it goes through this module, so
//! a change of its API is a change here and nowhere else. What an expression may read is decided
//! when it is compiled ([`Condition::compile`], [`Mapping::compile`]): the definition loader
//! checks those reads against the graph, and evaluation exposes only the steps the graph allows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::Definition;

/// Longest expression, in bytes. Conditions and field mappings are one-liners: anything longer
/// is a program, which belongs in a participant, and would slow every load down.
pub const MAX_EXPR_LEN: usize = 4096;
/// Deepest nesting of brackets, and of operations in the parsed expression. The `cel` crate's
/// parser and evaluator recurse on it, with frames of tens of kilobytes in a debug build: the
/// bound keeps evaluation within the 2 MiB of a tokio worker's stack, and parsing runs on a
/// thread of its own with room to spare ([`PARSE_STACK`]).
pub const MAX_EXPR_DEPTH: usize = 32;
/// Stack of the thread that parses an expression.
const PARSE_STACK: usize = 64 << 20;
/// Deepest nesting of tables and arrays in one mapping (the mapping itself is depth 1).
pub const MAX_MAPPING_DEPTH: usize = 8;
/// Most values (leaves, tables and arrays together) in one mapping.
pub const MAX_MAPPING_NODES: usize = 256;
/// Longest error string: errors end up in history rows, replies to operators and logs.
pub const MAX_ERROR_LEN: usize = 500;

/// The variables an expression may read at the top level.
const VARIABLES: &str = "input, saga.id and steps.<name>.output";

/// The values an expression may read. `outputs[i]` is Some(output) for a step that succeeded,
/// Some(Value::Null) for a skipped step, None for a step without output (yet).
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    pub input: &'a Value,
    pub saga_id: Uuid,
    pub outputs: &'a [Option<Value>],
}

/// One compiled CEL expression and what it reads.
#[derive(Clone)]
struct Compiled {
    source: String,
    program: Arc<cel::Program>,
    /// Names of the steps read through `steps.<name>.output`.
    steps: BTreeSet<String>,
    /// Whether it reads anything at all; one that does not is evaluated once at load.
    constant: bool,
}

impl fmt::Debug for Compiled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

/// A `when` condition: a CEL expression that must evaluate to a bool.
#[derive(Clone)]
pub struct Condition(Compiled);

impl Condition {
    /// Parses `source` and checks what it reads (but not against a graph: the loader does that
    /// with [`Condition::steps_read`]). The error is bounded and says what is wrong.
    pub fn compile(source: &str) -> Result<Condition, String> {
        if source.trim_start().starts_with("${") {
            return Err(bounded(
                "a condition is a CEL expression as it is: write it without `${…}`".into(),
            ));
        }
        let compiled = compile(source, Purpose::Condition)?;
        Ok(Condition(compiled))
    }

    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// Names of the steps whose output it reads.
    pub fn steps_read(&self) -> impl Iterator<Item = &str> {
        self.0.steps.iter().map(String::as_str)
    }

    /// Evaluates the condition for step `step` of `def`: only the outputs of the step's
    /// ancestors are visible (a skipped one's is null).
    pub fn eval(&self, def: &Definition, step: usize, data: &Data) -> Result<bool, String> {
        let failed = |e: String| bounded(format!("`when` ({}): {e}", excerpt(&self.0.source)));
        match execute(&self.0, Some(def), step, data).map_err(failed)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(failed(format!(
                "a condition must be a bool, and this is {}",
                kind_of(&other)
            ))),
        }
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({:?})", self.0.source)
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.0.source == other.0.source
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.source)
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        Condition::compile(&source).map_err(serde::de::Error::custom)
    }
}

/// One step of the path to a value inside a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// Renders a path as written in TOML: `order.items[0].sku`.
pub fn path_text(path: &[PathSeg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            PathSeg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Why a mapping was refused: where in it, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    pub path: Vec<PathSeg>,
    pub message: String,
}

#[derive(Clone)]
enum Node {
    Literal(Value),
    Expr(Box<Compiled>),
    Object(BTreeMap<String, Node>),
    Array(Vec<Node>),
}

/// A mapped command input (`[steps.input]`, `[steps.compensation_input]`): a JSON object whose
/// whole-string `"${…}"` values are CEL expressions, replaced by their results (of whatever type
/// they are: numbers stay numbers); everything else is copied as it is.
#[derive(Clone)]
pub struct Mapping {
    /// As written: what is stored and shown.
    source: Value,
    root: Node,
    /// Every step read by any of its expressions.
    steps: BTreeSet<String>,
}

impl Mapping {
    /// Compiles a mapping from its JSON form (an object). Bounded: at most
    /// [`MAX_MAPPING_DEPTH`] levels and [`MAX_MAPPING_NODES`] values.
    pub fn compile(source: &Value) -> Result<Mapping, MappingError> {
        if !source.is_object() {
            return Err(MappingError {
                path: vec![],
                message: "a mapping must be a table of fields".into(),
            });
        }
        let mut path = Vec::new();
        let mut nodes = 0;
        let mut steps = BTreeSet::new();
        let root = compile_node(source, &mut path, &mut nodes, &mut steps)?;
        Ok(Mapping {
            source: source.clone(),
            root,
            steps,
        })
    }

    /// The mapping as written, `${…}` strings included.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// Names of the steps whose output any of its expressions reads.
    pub fn steps_read(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(String::as_str)
    }

    /// Every expression with its path, for checks against the graph.
    pub fn expressions(&self) -> Vec<(Vec<PathSeg>, &str, Vec<&str>)> {
        let mut out = Vec::new();
        let mut path = Vec::new();
        collect_exprs(&self.root, &mut path, &mut out);
        out
    }

    /// Renders the mapping for step `step` of `def`. Visible: `input`, `saga.id`, and the
    /// outputs of the step's ancestors and of the step itself (its own output is there only once
    /// it has one, i.e. for its compensation; the loader keeps `input` from reading it).
    pub fn render(&self, def: &Definition, step: usize, data: &Data) -> Result<Value, String> {
        let ctx = context(&self.steps, Some(def), step, data)?;
        let mut path = Vec::new();
        render_node(&self.root, &ctx, &mut path)
    }
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mapping({})", self.source)
    }
}

impl PartialEq for Mapping {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Mapping {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.source.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = Value::deserialize(d)?;
        Mapping::compile(&source).map_err(|e| {
            serde::de::Error::custom(bounded(format!(
                "mapping field `{}`: {}",
                path_text(&e.path),
                e.message
            )))
        })
    }
}

/// The expression inside a whole-string `${…}`, if the string is one.
fn embedded(s: &str) -> Option<&str> {
    s.strip_prefix("${")?.strip_suffix('}')
}

fn compile_node(
    value: &Value,
    path: &mut Vec<PathSeg>,
    nodes: &mut usize,
    steps: &mut BTreeSet<String>,
) -> Result<Node, MappingError> {
    let err = |path: &[PathSeg], message: String| MappingError {
        path: path.to_vec(),
        message: bounded(message),
    };
    *nodes += 1;
    if *nodes > MAX_MAPPING_NODES {
        return Err(err(
            path,
            format!("a mapping may hold at most {MAX_MAPPING_NODES} values"),
        ));
    }
    // The root is depth 1, its fields depth 2…
    if path.len() >= MAX_MAPPING_DEPTH && (value.is_object() || value.is_array()) {
        return Err(err(
            path,
            format!("a mapping may nest at most {MAX_MAPPING_DEPTH} levels of tables and arrays"),
        ));
    }
    Ok(match value {
        Value::String(s) => match embedded(s) {
            Some(expr) => {
                let compiled = compile(expr, Purpose::Value).map_err(|e| err(path, e))?;
                steps.extend(compiled.steps.iter().cloned());
                Node::Expr(Box::new(compiled))
            }
            None => Node::Literal(value.clone()),
        },
        Value::Object(map) => {
            let mut out = BTreeMap::new();
            for (k, v) in map {
                path.push(PathSeg::Key(k.clone()));
                let node = compile_node(v, path, nodes, steps);
                path.pop();
                out.insert(k.clone(), node?);
            }
            Node::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len().min(MAX_MAPPING_NODES));
            for (i, v) in items.iter().enumerate() {
                path.push(PathSeg::Index(i));
                let node = compile_node(v, path, nodes, steps);
                path.pop();
                out.push(node?);
            }
            Node::Array(out)
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Node::Literal(value.clone()),
    })
}

fn collect_exprs<'a>(
    node: &'a Node,
    path: &mut Vec<PathSeg>,
    out: &mut Vec<(Vec<PathSeg>, &'a str, Vec<&'a str>)>,
) {
    match node {
        Node::Literal(_) => {}
        Node::Expr(c) => out.push((
            path.clone(),
            c.source.as_str(),
            c.steps.iter().map(String::as_str).collect(),
        )),
        Node::Object(map) => {
            for (k, v) in map {
                path.push(PathSeg::Key(k.clone()));
                collect_exprs(v, path, out);
                path.pop();
            }
        }
        Node::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(PathSeg::Index(i));
                collect_exprs(v, path, out);
                path.pop();
            }
        }
    }
}

fn render_node(node: &Node, ctx: &cel::Context, path: &mut Vec<PathSeg>) -> Result<Value, String> {
    match node {
        Node::Literal(v) => Ok(v.clone()),
        Node::Expr(c) => c
            .program
            .execute(ctx)
            .map_err(|e| e.to_string())
            .and_then(|v| to_json(&v))
            .map_err(|e| {
                bounded(format!(
                    "mapped field `{}` (`${{{}}}`): {e}",
                    path_text(path),
                    excerpt(&c.source)
                ))
            }),
        Node::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                path.push(PathSeg::Key(k.clone()));
                let value = render_node(v, ctx, path);
                path.pop();
                out.insert(k.clone(), value?);
            }
            Ok(Value::Object(out))
        }
        Node::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                path.push(PathSeg::Index(i));
                let value = render_node(v, ctx, path);
                path.pop();
                out.push(value?);
            }
            Ok(Value::Array(out))
        }
    }
}

/// The standard environment, built once: building it registers every standard function.
fn env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

/// What an expression is for: a condition must be a bool, a mapped value anything JSON holds.
#[derive(Clone, Copy, PartialEq)]
enum Purpose {
    Condition,
    Value,
}

fn compile(source: &str, purpose: Purpose) -> Result<Compiled, String> {
    if source.len() > MAX_EXPR_LEN {
        return Err(format!(
            "an expression may be at most {MAX_EXPR_LEN} bytes long, and this one is {}",
            source.len()
        ));
    }
    if source.trim().is_empty() {
        return Err("the expression is empty".into());
    }
    if nesting(source) > MAX_EXPR_DEPTH {
        return Err(format!(
            "brackets may nest at most {MAX_EXPR_DEPTH} deep in an expression"
        ));
    }
    // The parser is generated code with its own runtime, deeply recursive: it runs on a thread
    // with a stack of its own, and a panic in it becomes a refused expression.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel-parse".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(scope, || compile_here(source, purpose))
            .map_err(|e| format!("cannot start the expression parser: {e}"))?
            .join()
            .map_err(|_| "the expression cannot be parsed".to_string())?
    })
    .map_err(bounded)
}

fn compile_here(source: &str, purpose: Purpose) -> Result<Compiled, String> {
    let program = env().compile(source).map_err(|e| {
        let mut out = String::from("syntax error");
        for (i, err) in e.errors.iter().take(3).enumerate() {
            out.push_str(if i == 0 { ": " } else { "; " });
            out.push_str(&format!("{}:{}: {}", err.pos.0, err.pos.1, err.msg));
        }
        out
    })?;
    let mut reads = Reads::default();
    walk(program.expression(), 1, &mut Vec::new(), &mut reads)?;
    for (name, method) in &reads.functions {
        if !function_exists(name, *method) {
            return Err(format!("unknown function `{name}`"));
        }
    }
    if purpose == Purpose::Condition
        && let Some(kind) = not_bool(program.expression())
    {
        return Err(format!("a condition must be a bool, and this is {kind}"));
    }
    let compiled = Compiled {
        source: source.to_string(),
        program: Arc::new(program),
        constant: !reads.any,
        steps: reads.steps,
    };
    if compiled.constant {
        // Nothing to read: whatever it yields, it yields now, so say it now.
        let empty = Data {
            input: &Value::Null,
            saga_id: Uuid::nil(),
            outputs: &[],
        };
        let value = execute(&compiled, None, 0, &empty)?;
        match purpose {
            Purpose::Condition if !matches!(value, cel::Value::Bool(_)) => {
                return Err(format!(
                    "a condition must be a bool, and this is {}",
                    kind_of(&value)
                ));
            }
            Purpose::Value => {
                to_json(&value)?;
            }
            Purpose::Condition => {}
        }
    }
    Ok(compiled)
}

/// Whether the standard environment has a function `name` (a method when `method`). The `cel`
/// crate does not list its functions, so this asks it: calling an unknown function fails as an
/// undeclared reference, a known one with no arguments as anything else.
fn function_exists(name: &str, method: bool) -> bool {
    let probe = if method {
        format!("null.{name}()")
    } else {
        format!("{name}()")
    };
    let Ok(program) = env().compile(&probe) else {
        return false;
    };
    let ctx = cel::Context::with_env(env());
    !matches!(
        program.execute(&ctx),
        Err(cel::ExecutionError::UndeclaredReference(r)) if r.as_str() == name
    )
}

/// How deep brackets nest, outside string literals.
fn nesting(source: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' | '[' | '{' => {
                    depth += 1;
                    max = max.max(depth);
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    max
}

#[derive(Default)]
struct Reads {
    steps: BTreeSet<String>,
    any: bool,
    /// Named functions called, and whether as a method (`x.f()`).
    functions: BTreeSet<(String, bool)>,
}

/// Collects what an expression reads, refusing anything but `input…`, `saga.id` and
/// `steps.<name>.output…`. `bound` holds the variables of enclosing comprehensions
/// (`list.map(x, …)`), which are the expression's own.
fn walk(
    e: &IdedExpr,
    depth: usize,
    bound: &mut Vec<String>,
    reads: &mut Reads,
) -> Result<(), String> {
    if depth > MAX_EXPR_DEPTH {
        return Err(format!(
            "the expression nests more than {MAX_EXPR_DEPTH} operations deep; split it, or \
             compute the value in a participant"
        ));
    }
    let next = depth + 1;
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => Ok(()),
        Expr::Ident(name) => read(name, &[], bound, reads),
        Expr::Select(_) => {
            let mut fields = Vec::new();
            let mut cur = e;
            while let Expr::Select(s) = &cur.expr {
                fields.push(s.field.as_str());
                cur = &s.operand;
            }
            fields.reverse();
            // Each field is one more level for the evaluator.
            let below = depth + fields.len();
            if below > MAX_EXPR_DEPTH {
                return walk(cur, below, bound, reads);
            }
            match &cur.expr {
                Expr::Ident(name) => read(name, &fields, bound, reads),
                _ => walk(cur, below, bound, reads),
            }
        }
        Expr::Call(call) => {
            // Operators are spelled `_+_`, `!_`, `@in`…: only named functions can be misspelt.
            if call
                .func_name
                .starts_with(|c: char| c.is_ascii_alphabetic())
            {
                reads
                    .functions
                    .insert((call.func_name.clone(), call.target.is_some()));
            }
            if let Some(target) = &call.target {
                walk(target, next, bound, reads)?;
            }
            call.args
                .iter()
                .try_for_each(|a| walk(a, next, bound, reads))
        }
        Expr::List(list) => list
            .elements
            .iter()
            .try_for_each(|a| walk(a, next, bound, reads)),
        Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
            EntryExpr::MapEntry(m) => {
                walk(&m.key, next, bound, reads)?;
                walk(&m.value, next, bound, reads)
            }
            EntryExpr::StructField(f) => walk(&f.value, next, bound, reads),
        }),
        Expr::Struct(s) => Err(format!(
            "`{}{{…}}`: message types are not available here; build a map with {{…}}",
            s.type_name
        )),
        Expr::Comprehension(c) => {
            walk(&c.iter_range, next, bound, reads)?;
            walk(&c.accu_init, next, bound, reads)?;
            let outer = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.iter().cloned());
            bound.push(c.accu_var.clone());
            let inner = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .try_for_each(|x| walk(x, next, bound, reads));
            bound.truncate(outer);
            inner
        }
    }
}

fn read(name: &str, fields: &[&str], bound: &[String], reads: &mut Reads) -> Result<(), String> {
    if bound.iter().any(|b| b == name) {
        return Ok(());
    }
    match name {
        "input" => {
            reads.any = true;
            Ok(())
        }
        "saga" => match fields.first() {
            Some(&"id") => {
                reads.any = true;
                Ok(())
            }
            Some(other) => Err(format!(
                "`saga.{other}` is not available: of the saga, an expression may read saga.id"
            )),
            None => Err("`saga` may only be read as saga.id".into()),
        },
        "steps" => match fields {
            [step, "output", ..] => {
                reads.any = true;
                reads.steps.insert((*step).to_string());
                Ok(())
            }
            [step, other, ..] => Err(format!(
                "`steps.{step}.{other}` is not available: of a step, an expression may read \
                 steps.{step}.output"
            )),
            _ => Err("read a step's output as steps.<name>.output".into()),
        },
        // Type names, for `type(x) == int`.
        "bool" | "int" | "uint" | "double" | "string" | "bytes" | "list" | "map" | "null_type"
        | "type" => Ok(()),
        other => Err(format!(
            "unknown variable `{other}`: an expression may read {VARIABLES}"
        )),
    }
}

/// What a condition's top-level expression certainly is when it is not a bool.
fn not_bool(e: &IdedExpr) -> Option<&'static str> {
    match &e.expr {
        Expr::Literal(LiteralValue::Boolean(_)) => None,
        Expr::Literal(LiteralValue::Int(_) | LiteralValue::UInt(_)) => Some("an integer"),
        Expr::Literal(LiteralValue::Double(_)) => Some("a double"),
        Expr::Literal(LiteralValue::String(_)) => Some("a string"),
        Expr::Literal(LiteralValue::Bytes(_)) => Some("bytes"),
        Expr::Literal(LiteralValue::Null) => Some("null"),
        Expr::List(_) => Some("a list"),
        Expr::Map(_) | Expr::Struct(_) => Some("a map"),
        Expr::Call(c) => match c.func_name.as_str() {
            "_+_" | "_-_" | "_*_" | "_/_" | "_%_" | "-_" => Some("arithmetic"),
            "size" | "int" | "uint" | "double" => Some("a number"),
            "string" => Some("a string"),
            "bytes" => Some("bytes"),
            _ => None,
        },
        _ => None,
    }
}

/// Evaluates one expression. With `def`, `steps` holds only what step `step` may see.
fn execute(
    c: &Compiled,
    def: Option<&Definition>,
    step: usize,
    data: &Data,
) -> Result<cel::Value, String> {
    let ctx = context(&c.steps, def, step, data)?;
    c.program.execute(&ctx).map_err(|e| bounded(e.to_string()))
}

/// The variables for an evaluation: `input`, `saga` and, of the `wanted` steps, those visible
/// from `step` that have an output.
fn context(
    wanted: &BTreeSet<String>,
    def: Option<&Definition>,
    step: usize,
    data: &Data,
) -> Result<cel::Context<'static, 'static>, String> {
    let mut ctx = cel::Context::with_env(env());
    bind(&mut ctx, "input", to_cel(data.input))?;
    let saga = HashMap::from([("id", cel::Value::from(data.saga_id.to_string()))]);
    bind(&mut ctx, "saga", cel::Value::from(saga))?;
    let mut steps: HashMap<String, cel::Value> = HashMap::new();
    if let Some(def) = def {
        let visible = def.ancestors(step);
        for name in wanted {
            let Some(i) = def.step_index(name) else {
                continue;
            };
            if i != step && visible.binary_search(&i).is_err() {
                continue;
            }
            if let Some(Some(output)) = data.outputs.get(i) {
                let fields = HashMap::from([("output", to_cel(output))]);
                steps.insert(name.clone(), cel::Value::from(fields));
            }
        }
    }
    bind(&mut ctx, "steps", cel::Value::from(steps))?;
    Ok(ctx)
}

fn bind(ctx: &mut cel::Context<'static, 'static>, name: &str, v: cel::Value) -> Result<(), String> {
    let v: Box<dyn cel::common::value::Val> = v.try_into().map_err(|e: cel::ExecutionError| {
        bounded(format!("cannot pass `{name}` to an expression: {e}"))
    })?;
    ctx.add_variable_as_val(name, v);
    Ok(())
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                // Beyond 64-bit integers (stored as text under arbitrary_precision) a double is
                // the closest CEL has.
                cel::Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => cel::Value::from(s.as_str()),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let map: HashMap<cel::objects::Key, cel::Value> = map
                .iter()
                .map(|(k, v)| (cel::objects::Key::from(k.as_str()), to_cel(v)))
                .collect();
            cel::Value::from(map)
        }
    }
}

fn to_json(v: &cel::Value) -> Result<Value, String> {
    Ok(match v {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::from(*i),
        cel::Value::UInt(u) => Value::from(*u),
        cel::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("{f} is not a number JSON can hold"))?,
        cel::Value::String(s) => Value::String(s.as_str().to_string()),
        cel::Value::List(items) => {
            Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?)
        }
        cel::Value::Map(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.map.iter() {
                let key = match k {
                    cel::objects::Key::String(s) => s.as_str().to_string(),
                    cel::objects::Key::Int(i) => i.to_string(),
                    cel::objects::Key::Uint(u) => u.to_string(),
                    cel::objects::Key::Bool(b) => b.to_string(),
                };
                out.insert(key, to_json(v)?);
            }
            Value::Object(out)
        }
        other => return Err(format!("{} cannot be sent as JSON", kind_of(other))),
    })
}

fn kind_of(v: &cel::Value) -> String {
    match v {
        cel::Value::Null => "null".into(),
        cel::Value::Bool(_) => "a bool".into(),
        cel::Value::Int(_) | cel::Value::UInt(_) => "an integer".into(),
        cel::Value::Float(_) => "a double".into(),
        cel::Value::String(_) => "a string".into(),
        cel::Value::List(_) => "a list".into(),
        cel::Value::Map(_) => "a map".into(),
        other => format!("a value of type {}", other.type_of()),
    }
}

/// The start of an expression, for an error message.
fn excerpt(source: &str) -> String {
    const MAX: usize = 120;
    if source.chars().count() <= MAX {
        source.to_string()
    } else {
        format!("{}…", source.chars().take(MAX).collect::<String>())
    }
}

/// Cuts a message to [`MAX_ERROR_LEN`] bytes, on a character boundary.
pub(crate) fn bounded(message: String) -> String {
    if message.len() <= MAX_ERROR_LEN {
        return message;
    }
    let mut cut = MAX_ERROR_LEN - '…'.len_utf8();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", message.get(..cut).unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition;
    use serde_json::json;
    use std::path::Path;

    /// a -> (b, c) -> d, where b and c are independent.
    fn diamond() -> Definition {
        let text = r#"
name = "d"
version = 1
[[steps]]
name = "a"
participant = "p"
action = "a"
[[steps]]
name = "b"
after = ["a"]
participant = "p"
action = "b"
[[steps]]
name = "c"
after = ["a"]
participant = "p"
action = "c"
[[steps]]
name = "d"
after = ["b", "c"]
participant = "p"
action = "d"
"#;
        definition::parse(Path::new("d.toml"), text).unwrap()
    }

    fn mapping(v: Value) -> Mapping {
        Mapping::compile(&v).unwrap()
    }

    #[test]
    fn whole_string_expressions_keep_their_type_and_the_rest_is_literal() {
        let def = diamond();
        let input =
            json!({"amount": 1200, "ratio": 0.5, "big": u64::MAX, "tags": ["x"], "ok": true});
        let outputs = [Some(json!({"id": "o-1", "n": {"k": 3}})), None, None, None];
        let saga_id = Uuid::from_u128(7);
        let data = Data {
            input: &input,
            saga_id,
            outputs: &outputs,
        };
        let m = mapping(json!({
            "amount": "${input.amount}",
            "double": "${input.amount * 2}",
            "ratio": "${input.ratio}",
            "big": "${input.big}",
            "tags": "${input.tags}",
            "ok": "${input.ok}",
            "order": "${steps.a.output.id}",
            "nested": {"k": "${steps.a.output.n.k}", "list": ["${saga.id}", 1, "plain"]},
            "text": "order ${input.amount}",
            "almost": "${input.amount",
            "currency": "KRW",
            "null": null,
        }));
        let out = m.render(&def, 1, &data).unwrap();
        assert_eq!(
            out,
            json!({
                "amount": 1200,
                "double": 2400,
                "ratio": 0.5,
                "big": u64::MAX,
                "tags": ["x"],
                "ok": true,
                "order": "o-1",
                "nested": {"k": 3, "list": [saga_id.to_string(), 1, "plain"]},
                "text": "order ${input.amount}",
                "almost": "${input.amount",
                "currency": "KRW",
                "null": null,
            })
        );
        assert!(out["amount"].is_i64() && out["ratio"].is_f64());
    }

    #[test]
    fn only_ancestors_are_visible_and_a_skipped_one_reads_null() {
        let def = diamond();
        let input = json!({});
        // b succeeded, c was skipped.
        let outputs = [
            Some(json!({"x": 1})),
            Some(json!({"y": 2})),
            Some(Value::Null),
            None,
        ];
        let data = Data {
            input: &input,
            saga_id: Uuid::nil(),
            outputs: &outputs,
        };
        let from_d = mapping(json!({"y": "${steps.b.output.y}", "c": "${steps.c.output}"}));
        assert_eq!(
            from_d.render(&def, 3, &data).unwrap(),
            json!({"y": 2, "c": null})
        );
        // The loader refuses this for c (b is not its ancestor); evaluation hides b anyway.
        let from_c = mapping(json!({"y": "${steps.b.output.y}"}));
        let e = from_c.render(&def, 2, &data).unwrap_err();
        assert!(
            e.contains("mapped field `y`") && e.contains("steps.b.output.y"),
            "{e}"
        );
        // Its own output, for a compensation.
        let own = mapping(json!({"y": "${steps.b.output.y}"}));
        assert_eq!(own.render(&def, 1, &data).unwrap(), json!({"y": 2}));
        let cond = Condition::compile("steps.c.output == null && steps.a.output.x == 1").unwrap();
        assert_eq!(cond.eval(&def, 3, &data), Ok(true));
        assert!(cond.eval(&def, 1, &data).is_err());
    }

    #[test]
    fn conditions_must_be_bools() {
        for bad in [
            "1",
            "'yes'",
            "[true]",
            "{'a': true}",
            "input.n + 1",
            "size(input)",
            "null",
            "1 + 1",
            "2.0",
        ] {
            let e = Condition::compile(bad).unwrap_err();
            assert!(e.contains("must be a bool"), "{bad}: {e}");
        }
        for constant in ["1 == 1", "true", "[1, 2].exists(x, x == 2)"] {
            assert!(Condition::compile(constant).is_ok(), "{constant}");
        }
        // Known only at run time: refused then, with the condition named.
        let c = Condition::compile("input.n").unwrap();
        let def = diamond();
        let input = json!({"n": 3});
        let data = Data {
            input: &input,
            saga_id: Uuid::nil(),
            outputs: &[],
        };
        let e = c.eval(&def, 0, &data).unwrap_err();
        assert!(
            e.starts_with("`when` (input.n): a condition must be a bool"),
            "{e}"
        );
        assert!(
            Condition::compile("${input.ok}")
                .unwrap_err()
                .contains("without `${…}`")
        );
    }

    #[test]
    fn reads_are_limited_to_input_saga_id_and_step_outputs() {
        for (source, needle) in [
            ("inpt.x", "unknown variable `inpt`"),
            ("saga.name == ''", "`saga.name` is not available"),
            ("saga == null", "saga.id"),
            ("steps.a.input == 1", "`steps.a.input` is not available"),
            ("steps.a == null", "steps.<name>.output"),
            ("size(steps) > 0", "steps.<name>.output"),
            ("steps['a'].output == 1", "steps.<name>.output"),
            ("x.y == 1", "unknown variable `x`"),
            ("pkg.Msg{a: 1} == null", "message types"),
            ("sizee(input.x) > 1", "unknown function `sizee`"),
            (
                "input.s.startsWith('a') && input.s.startWith('b')",
                "unknown function `startWith`",
            ),
            ("matches(input.s, 'a.*')", "unknown function `matches`"),
        ] {
            let e = Condition::compile(source).unwrap_err();
            assert!(e.contains(needle), "{source}: {e}");
        }
        for known in [
            "size(input.s) > 0 && int(input.n) > 0 && uint(input.n) > 0u && double(input.n) > 0.0",
            "string(input.n) == '1' && bytes(input.s) == b'' && bool('true') && dyn(input.n) == 1",
            "type(input.n) == int && input.s.contains('a') && input.s.startsWith('a')",
            "input.s.endsWith('a') && input.s.size() == 1 && 'a' in input.list",
            "input.list.exists_one(x, x == 1) && input.list.map(x, x * 2).filter(x, x > 2) == []",
        ] {
            assert!(Condition::compile(known).is_ok(), "{known}");
        }
        let c = Condition::compile(
            "has(steps.a.output.x) && input.items.all(i, i.n > 0) && saga.id != '' && \
             steps.b.output.list.exists(x, x == steps.c.output.y)",
        )
        .unwrap();
        assert_eq!(c.steps_read().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn syntax_errors_and_bounds_are_refused_with_bounded_messages() {
        let e = Condition::compile("input.a &&& true").unwrap_err();
        assert!(e.starts_with("syntax error: 1:"), "{e}");
        let long = format!("input.a == '{}'", "x".repeat(MAX_EXPR_LEN));
        assert!(
            Condition::compile(&long)
                .unwrap_err()
                .contains("at most 4096 bytes")
        );
        assert!(Condition::compile("  ").unwrap_err().contains("empty"));
        let garbage = "(".repeat(3000);
        assert!(Condition::compile(&garbage).unwrap_err().len() <= MAX_ERROR_LEN);
        let e = Mapping::compile(&json!({"a": "${1 +}"})).unwrap_err();
        assert_eq!(e.path, [PathSeg::Key("a".into())]);
        assert!(Mapping::compile(&json!("${input}")).is_err());
        let deep = (0..MAX_MAPPING_DEPTH).fold(json!(1), |acc, _| json!([acc]));
        let e = Mapping::compile(&json!({"a": deep})).unwrap_err();
        assert!(e.message.contains("nest"), "{e:?}");
        let wide: serde_json::Map<String, Value> = (0..MAX_MAPPING_NODES)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        let e = Mapping::compile(&Value::Object(wide)).unwrap_err();
        assert!(e.message.contains("at most"), "{e:?}");
        assert_eq!(bounded("é".repeat(400)).len(), MAX_ERROR_LEN - 1);
    }

    #[test]
    fn the_longest_expressions_neither_overflow_the_stack_nor_panic() {
        // Each nests as deep as MAX_EXPR_LEN allows, in a way the parser or evaluator recurses
        // on. Run on a thread with the stack of a tokio worker (2 MiB).
        let shapes: [fn(usize) -> String; 14] = [
            |n| format!("{}1{}", "(".repeat(n), ")".repeat(n)),
            |n| format!("{}1{}", "[".repeat(n), "]".repeat(n)),
            |n| format!("{}true", "!".repeat(n)),
            |n| format!("{}1", "-".repeat(n)),
            |n| format!("input{}", ".a".repeat(n)),
            |n| format!("input{}", "[0]".repeat(n)),
            |n| format!("1{}", " + 1".repeat(n)),
            |n| format!("true{}", " && true".repeat(n)),
            |n| format!("{}1{}", "size(".repeat(n), ")".repeat(n)),
            |n| format!("{}1{}", "{1: ".repeat(n), "}".repeat(n)),
            |n| format!("input.a{}", ".map(x, x)".repeat(n)),
            |n| format!("{}1", "true ? 1 : ".repeat(n)),
            |n| format!("1{}", " == 1".repeat(n)),
            |n| format!("input.a{}", "[0]".repeat(n)),
        ];
        let d = MAX_EXPR_DEPTH;
        let cases: Vec<String> = shapes
            .iter()
            .flat_map(|shape| [d - 2, d - 1, d, d + 1, MAX_EXPR_LEN].map(shape))
            .map(|c| c.chars().take(MAX_EXPR_LEN).collect())
            .collect();
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let def = diamond();
                let input = json!({"a": [1]});
                let data = Data {
                    input: &input,
                    saga_id: Uuid::nil(),
                    outputs: &[],
                };
                for case in cases {
                    assert!(case.len() <= MAX_EXPR_LEN, "{}", case.len());
                    if let Ok(c) = Condition::compile(&case) {
                        let _ = c.eval(&def, 0, &data);
                    }
                    if let Ok(m) = Mapping::compile(&json!({"v": format!("${{{case}}}")})) {
                        let _ = m.render(&def, 0, &data);
                    }
                }
            })
            .unwrap();
        handle.join().unwrap();
    }

    #[test]
    fn run_time_errors_name_the_field_and_are_bounded() {
        let def = diamond();
        let input = json!({"s": "x".repeat(2000)});
        let outputs = [Some(json!({}))];
        let data = Data {
            input: &input,
            saga_id: Uuid::nil(),
            outputs: &outputs,
        };
        let m = mapping(json!({"order": {"id": "${steps.a.output.order_id}"}}));
        let e = m.render(&def, 1, &data).unwrap_err();
        assert!(
            e.starts_with("mapped field `order.id` (`${steps.a.output.order_id}`): "),
            "{e}"
        );
        let m = mapping(json!({"v": "${input.s + input.s + 1}"}));
        let e = m.render(&def, 1, &data).unwrap_err();
        assert!(e.len() <= MAX_ERROR_LEN, "{}", e.len());
        let m = mapping(json!({"v": "${double(size(input.s)) / 0.0}"}));
        assert!(m.render(&def, 1, &data).unwrap_err().contains("JSON"));
        let m = mapping(json!({"v": "${bytes(input.s)}"}));
        assert!(
            m.render(&def, 1, &data)
                .unwrap_err()
                .contains("cannot be sent as JSON")
        );
        // The same without anything to read fails at load already.
        for constant in ["${1.0 / 0.0}", "${b'x'}", "${1 / 0}", "${[1][3]}"] {
            let e = Mapping::compile(&json!({"v": constant})).unwrap_err();
            assert_eq!(e.path, [PathSeg::Key("v".into())], "{constant}");
        }
        assert!(Condition::compile("1 / 0 == 1").is_err());
    }

    #[test]
    fn conditions_and_mappings_serialize_as_their_source() {
        let c = Condition::compile("has(input.coupon) && input.coupon != ''").unwrap();
        let s = serde_json::to_value(&c).unwrap();
        assert_eq!(s, json!("has(input.coupon) && input.coupon != ''"));
        assert_eq!(serde_json::from_value::<Condition>(s).unwrap(), c);
        let source = json!({"a": "${input.a}", "b": [1, "${saga.id}"], "c": {"d": "lit"}});
        let m = mapping(source.clone());
        assert_eq!(serde_json::to_value(&m).unwrap(), source);
        assert_eq!(serde_json::from_value::<Mapping>(source).unwrap(), m);
        let e = serde_json::from_value::<Condition>(json!("1 +")).unwrap_err();
        assert!(e.to_string().contains("syntax error"), "{e}");
        let e = serde_json::from_value::<Mapping>(json!({"x": "${nope}"})).unwrap_err();
        assert!(e.to_string().contains("mapping field `x`"), "{e}");
    }

    #[test]
    fn compiled_expressions_are_shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Condition>();
        shareable::<Mapping>();
        shareable::<Definition>();
    }
}
