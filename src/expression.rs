//! The expression policy's language: CEL (the `cel` crate), compiled once,
//! when the config is read, and evaluated per request to a yes or a no.
//!
//! An expression sees three variables: `user` (null for an anonymous
//! visitor), `request` and `context` (the flow's plan context). It can use
//! CEL's standard operators, functions and macros, and `ip_in(ip,
//! "10.0.0.0/8")`. Nothing it can reach touches a file, the network, the
//! environment or the clock: the crate is built without its regex and time
//! libraries, and `ip_in` is the only function flowgate adds. A name that
//! is not a variable is refused at compile; a missing field or map key is
//! an error when evaluated, which the caller takes as the policy failing
//! (`"x-env" in request.headers` guards a lookup).
//!
//! Evaluation runs on the caller's thread and cannot be interrupted, so it
//! is bounded by what it may do instead. The source is at most
//! `MAX_SOURCE` bytes and `MAX_DEPTH` deep, which bounds the stack. At
//! compile, the program is rewritten to pay as it runs (`instrument`): a
//! loop (`all`, `exists`, `exists_one`, `map`, `filter`) pays before it
//! starts for its iterations times the size of its body; a call pays for
//! the values it is handed, and `+` and list and map literals for what
//! they build. An evaluation has `BUDGET` units; one that runs out fails
//! with `EvalError::TooCostly`. Nested loops, a value that doubles at each
//! step of a chain of `map`s, `h + h + h + …` over a 30 KB header: each
//! stops at the budget within a millisecond when optimised (0.1 to 0.85
//! ms on a busy two-core machine). Unpaid are only turning the input into
//! CEL values and the one pass over the program's nodes outside any loop,
//! bounded by the source's size.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use cel::common::ast::{operators, CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue, SourceInfo};
use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::{Context, Env, ExecutionError, FunctionContext, Value};
use ipnet::IpNet;
use serde_json::Value as Json;

use crate::identity::Identity;

/// The longest source accepted, in bytes.
pub const MAX_SOURCE: usize = 4096;

/// The deepest an expression may nest, counted in nodes from its root
/// (`a + b + c` is three deep: `+` chains to the left). The interpreter
/// recurses once a level, about 2 KB of stack each when optimised (as
/// Cargo.toml has it even in debug builds): the deepest expression takes
/// under 256 KiB, an eighth of a tokio worker's stack.
pub const MAX_DEPTH: usize = 64;

/// What one evaluation may spend. A unit is about one node evaluated, or
/// 64 bytes handed to a function or copied: a test of each of 100 groups
/// spends under 2,000.
pub const BUDGET: u64 = 10_000;

/// Bytes of a string or bytes value per unit of cost.
const BYTES_PER_UNIT: usize = 64;

/// The names of the functions the compiler wraps around loops and what
/// builds values. `@` cannot start a name in CEL source, so no expression
/// can call (or shadow) them.
const PAY_LOOP: &str = "@flowgate_pay_loop";
const PAY_SIZE: &str = "@flowgate_pay_size";
const PAY_LOOKUP: &str = "@flowgate_pay_lookup";

/// The variables an expression can name.
const VARIABLES: [&str; 3] = ["user", "request", "context"];

/// The CEL environment: the standard library and macros, nothing more.
/// Without the optional syntax (`a.?b`, `m[?k]`), whose copies the
/// budget would not see.
static ENV: LazyLock<Arc<Env>> =
    LazyLock::new(|| Arc::new(Env::stdlib().with_optional_support(false)));

/// What an expression sees.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// `user`: null for an anonymous visitor.
    pub user: Option<UserFacts<'a>>,
    /// `request`.
    pub request: RequestFacts<'a>,
    /// `context`: the flow's plan context.
    pub context: &'a serde_json::Map<String, Json>,
}

/// `user`: who the visitor is, as the directory has them now.
#[derive(Debug, Clone, Copy)]
pub struct UserFacts<'a> {
    pub username: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    pub groups: &'a [String],
    pub is_superuser: bool,
}

impl<'a> From<&'a Identity> for UserFacts<'a> {
    fn from(identity: &'a Identity) -> Self {
        UserFacts {
            username: &identity.username,
            email: &identity.email,
            name: &identity.name,
            groups: &identity.groups,
            is_superuser: identity.is_superuser,
        }
    }
}

/// `request`: the request being decided.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// `request.ip`, as a string (an IPv4-mapped IPv6 address as the IPv4
    /// one); null when unknown.
    pub ip: Option<IpAddr>,
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    /// `request.headers`, a map from the lower-case name to the value. A
    /// header sent more than once has its values joined with `", "`; one
    /// whose value is not UTF-8 is left out.
    pub headers: &'a http::HeaderMap,
}

/// A compiled expression, ready to evaluate any number of times.
#[derive(Clone)]
pub struct Expression {
    source: String,
    program: IdedExpr,
}

/// Equal when their sources are: a source compiles to one program.
impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Expression {}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

/// Why a source is not an expression. Line and column are 1-based, within
/// the expression's own source; the column counts characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the expression is {len} bytes long, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("line {line}, column {column}: {message}")]
    Invalid {
        line: usize,
        column: usize,
        message: String,
    },
}

/// Why an evaluation gave no yes or no. The caller treats any of them as
/// the policy failing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("the expression evaluated to a {0}, not a bool")]
    NotBool(String),
    /// A runtime error: a missing map key or field, a function given the
    /// wrong types, a bad argument to `ip_in`, a division by zero.
    #[error("{0}")]
    Failed(String),
    #[error("the expression needs more than its evaluation budget ({BUDGET} units)")]
    TooCostly,
}

impl Expression {
    /// Compile `source`. Besides syntax, this rejects a name that is none
    /// of `user`, `request`, `context`, a loop's own variable or a type
    /// name, and an `ip_in` whose network, written as a literal, is not one.
    pub fn compile(source: &str) -> Result<Expression, CompileError> {
        if source.len() > MAX_SOURCE {
            return Err(CompileError::TooLong {
                len: source.len(),
                max: MAX_SOURCE,
            });
        }
        // The parser recurses once per operator of a chain: 4 KiB of
        // `1+1+…` takes about 1 MiB of stack, more than a caller on a tokio
        // worker can be assumed to have left. So it runs on a thread of
        // its own, with room to spare; compiling happens at config load.
        std::thread::scope(|scope| {
            let compiler = std::thread::Builder::new()
                .name("cel-compile".into())
                .stack_size(COMPILER_STACK)
                .spawn_scoped(scope, || compile_here(source));
            match compiler {
                Ok(compiler) => compiler.join().unwrap_or_else(|_| {
                    Err(CompileError::Invalid {
                        line: 1,
                        column: 1,
                        message: "the CEL parser failed on this source".into(),
                    })
                }),
                Err(_) => compile_here(source),
            }
        })
    }

    /// The source it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluate against `input`: `Ok` only for a bool.
    pub fn evaluate(&self, input: &Input<'_>) -> Result<bool, EvalError> {
        self.metered(input).0
    }

    /// `evaluate`, and what it spent of the budget.
    fn metered(&self, input: &Input<'_>) -> (Result<bool, EvalError>, u64) {
        let headers = joined_headers(input.request.headers);
        let meter = Arc::new(Meter::default());
        let mut ctx = Context::with_env(Arc::clone(&ENV));
        ctx.add_variable_as_val("user", user_val(input.user.as_ref()));
        ctx.add_variable_as_val("request", request_val(&input.request, &headers));
        ctx.add_variable_as_val("context", json_map(input.context));
        let added = [
            ctx.add_function("ip_in", ip_in),
            ctx.add_function(PAY_LOOP, pay_loop(Arc::clone(&meter))),
            ctx.add_function(PAY_SIZE, pay_size(Arc::clone(&meter), cost)),
            ctx.add_function(PAY_LOOKUP, pay_size(Arc::clone(&meter), lookup_cost)),
        ];
        if let Some(Err(e)) = added.into_iter().find(Result::is_err) {
            return (Err(EvalError::Failed(e.to_string())), 0);
        }
        // `resolve`, not the inlined `resolve_val`: the recursion runs in
        // the `cel` crate's own code, optimised even in a debug build.
        let result = Value::resolve(&self.program, &ctx);
        let spent = meter.spent.load(Ordering::Relaxed);
        // Checked first: `exists` and `all` can absorb the error a payment
        // raised, and what ran out of budget gives no answer.
        if meter.exhausted.load(Ordering::Relaxed) {
            return (Err(EvalError::TooCostly), spent);
        }
        let answer = match result {
            Err(e) => Err(EvalError::Failed(e.to_string())),
            Ok(Value::Bool(b)) => Ok(b),
            Ok(value) => Err(EvalError::NotBool(value.type_of().to_string())),
        };
        (answer, spent)
    }
}

/// Stack for the thread `compile` runs on.
const COMPILER_STACK: usize = 16 << 20;

/// `Expression::compile`, on the calling thread.
fn compile_here(source: &str) -> Result<Expression, CompileError> {
    let (mut program, info) = ENV
        .parser()
        .parse_with_source_info(source)
        .map_err(|errors| {
            let Some(first) = errors.errors.into_iter().next() else {
                return CompileError::Invalid {
                    line: 1,
                    column: 1,
                    message: "not an expression".into(),
                };
            };
            // The parser's own limit reports itself in a debug dump.
            let message = if first.msg.contains("Recursion limit") {
                "the expression nests too deeply".to_string()
            } else {
                first.msg
            };
            CompileError::Invalid {
                line: first.pos.0.max(1) as usize,
                column: first.pos.1.max(1) as usize,
                message,
            }
        })?;
    if let Some(id) = too_deep(&program) {
        let (line, column) = position(&info, id);
        return Err(CompileError::Invalid {
            line,
            column,
            message: format!("the expression nests more than {MAX_DEPTH} deep"),
        });
    }
    check(&program, &mut Vec::new(), &info)?;
    let mut next_id = max_id(&program) + 1;
    instrument(&mut program, &mut next_id);
    Ok(Expression {
        source: source.to_string(),
        program,
    })
}

/// The check at compile: every name is one an evaluation can resolve, and
/// a literal `ip_in` network parses. `scope` holds the loop variables
/// around `expr`.
fn check(expr: &IdedExpr, scope: &mut Vec<String>, info: &SourceInfo) -> Result<(), CompileError> {
    let invalid = |id: u64, message: String| {
        let (line, column) = position(info, id);
        CompileError::Invalid {
            line,
            column,
            message,
        }
    };
    match &expr.expr {
        Expr::Ident(name) => {
            let name = name.strip_prefix('.').unwrap_or(name);
            let known = VARIABLES.contains(&name)
                || scope.iter().any(|bound| bound == name)
                || ENV.types().find_type(name).is_some();
            if !known {
                return Err(invalid(
                    expr.id,
                    format!("unknown variable `{name}`: there are user, request and context"),
                ));
            }
        }
        Expr::Call(call) => {
            if call.func_name == "ip_in" && call.target.is_none() {
                if let [_, IdedExpr {
                    id,
                    expr: Expr::Literal(LiteralValue::String(net)),
                }] = call.args.as_slice()
                {
                    if parse_net(net.inner()).is_none() {
                        return Err(invalid(
                            *id,
                            format!("`{}` is not a network like \"10.0.0.0/8\"", net.inner()),
                        ));
                    }
                }
            }
            if let Some(target) = &call.target {
                check(target, scope, info)?;
            }
            for arg in &call.args {
                check(arg, scope, info)?;
            }
        }
        Expr::Comprehension(c) => {
            check(&c.iter_range, scope, info)?;
            check(&c.accu_init, scope, info)?;
            let depth = scope.len();
            scope.push(c.iter_var.clone());
            scope.extend(c.iter_var2.clone());
            scope.push(c.accu_var.clone());
            let inner = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .try_for_each(|e| check(e, scope, info));
            scope.truncate(depth);
            inner?;
        }
        Expr::List(list) => {
            for element in &list.elements {
                check(element, scope, info)?;
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    check(&e.key, scope, info)?;
                    check(&e.value, scope, info)?;
                }
            }
        }
        Expr::Select(select) => check(&select.operand, scope, info)?,
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    check(&f.value, scope, info)?;
                }
            }
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
    Ok(())
}

/// Line and column (1-based, in characters) where node `id` starts.
fn position(info: &SourceInfo, id: u64) -> (usize, usize) {
    let Some((start, _)) = info.offset_for(id) else {
        return (1, 1);
    };
    let mut line = 1;
    let mut column = 1;
    let before = info.source.get(..start as usize).unwrap_or(&info.source);
    for c in before.chars() {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// A node deeper than `MAX_DEPTH`, if any. Without recursion: this runs
/// before anything has bounded the depth.
fn too_deep(expr: &IdedExpr) -> Option<u64> {
    let mut stack = vec![(expr, 1)];
    while let Some((expr, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Some(expr.id);
        }
        for_each_child(expr, &mut |child| stack.push((child, depth + 1)));
    }
    None
}

fn max_id(expr: &IdedExpr) -> u64 {
    let mut max = expr.id;
    for_each_child(expr, &mut |child| max = max.max(max_id(child)));
    max
}

fn for_each_child<'e>(expr: &'e IdedExpr, f: &mut impl FnMut(&'e IdedExpr)) {
    match &expr.expr {
        Expr::Call(call) => {
            call.target.iter().for_each(|t| f(t));
            call.args.iter().for_each(f);
        }
        Expr::Comprehension(c) => {
            [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]
            .into_iter()
            .for_each(f);
        }
        Expr::List(list) => list.elements.iter().for_each(f),
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    f(&e.key);
                    f(&e.value);
                }
            }
        }
        Expr::Select(select) => f(&select.operand),
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(field) = &entry.expr {
                    f(&field.value);
                }
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Make `expr` pay as it runs (see the module's doc). A loop's range
/// becomes `PAY_LOOP(range, weight)`, `weight` being the nodes one
/// iteration evaluates. A call's target and arguments become
/// `PAY_SIZE(argument)`, and so do the elements of a list literal and the
/// keys and values of a map literal; a `+` pays for its result instead,
/// no smaller than what it reads. Left
/// as they are: the logical operators and the conditional (lazy, and
/// constant-time on bools), the container indexed (a lookup) and a map on
/// the right of `in` (`PAY_LOOKUP`: a list there still pays), and the
/// steps a macro writes onto its own accumulator (`@result && p`,
/// `@result + [f]`), whose shapes the interpreter recognises. Returns the
/// number of nodes in `expr`, as rewritten.
fn instrument(expr: &mut IdedExpr, next_id: &mut u64) -> u64 {
    let mut nodes = 1;
    match &mut expr.expr {
        Expr::Call(call) => {
            if let Some(target) = &mut call.target {
                nodes += instrument(target, next_id);
            }
            for arg in &mut call.args {
                nodes += instrument(arg, next_id);
            }
            let accumulating = call.args.iter().any(is_accumulator)
                || call.target.as_deref().is_some_and(is_accumulator);
            if accumulating {
                return nodes;
            }
            match (call.func_name.as_str(), call.args.as_mut_slice()) {
                (
                    operators::CONDITIONAL
                    | operators::LOGICAL_AND
                    | operators::LOGICAL_OR
                    | operators::LOGICAL_NOT,
                    _,
                ) => {}
                (operators::INDEX, [_, key]) => nodes += wrap(key, PAY_SIZE, vec![], next_id),
                (operators::IN, [item, container]) => {
                    nodes += wrap(item, PAY_SIZE, vec![], next_id);
                    nodes += wrap(container, PAY_LOOKUP, vec![], next_id);
                }
                // What it builds is at least as large as what it reads.
                (operators::ADD, _) => nodes += wrap(expr, PAY_SIZE, vec![], next_id),
                (_, args) => {
                    for arg in args {
                        nodes += wrap(arg, PAY_SIZE, vec![], next_id);
                    }
                    if let Some(target) = &mut call.target {
                        nodes += wrap(target, PAY_SIZE, vec![], next_id);
                    }
                }
            }
        }
        Expr::Comprehension(c) => {
            nodes += instrument(&mut c.iter_range, next_id);
            nodes += instrument(&mut c.accu_init, next_id);
            let weight =
                1 + instrument(&mut c.loop_cond, next_id) + instrument(&mut c.loop_step, next_id);
            nodes += weight + instrument(&mut c.result, next_id);
            let weight = literal(LiteralValue::Int(CelInt::from(weight as i64)), next_id);
            nodes += wrap(&mut c.iter_range, PAY_LOOP, vec![weight], next_id);
        }
        Expr::List(list) => {
            for element in &mut list.elements {
                nodes += instrument(element, next_id);
                nodes += wrap(element, PAY_SIZE, vec![], next_id);
            }
        }
        Expr::Map(map) => {
            for entry in &mut map.entries {
                if let EntryExpr::MapEntry(e) = &mut entry.expr {
                    nodes += instrument(&mut e.key, next_id);
                    nodes += instrument(&mut e.value, next_id);
                    nodes += wrap(&mut e.key, PAY_SIZE, vec![], next_id);
                    nodes += wrap(&mut e.value, PAY_SIZE, vec![], next_id);
                }
            }
        }
        Expr::Select(select) => nodes += instrument(&mut select.operand, next_id),
        Expr::Struct(s) => {
            for entry in &mut s.entries {
                if let EntryExpr::StructField(f) = &mut entry.expr {
                    nodes += instrument(&mut f.value, next_id);
                    nodes += wrap(&mut f.value, PAY_SIZE, vec![], next_id);
                }
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
    nodes
}

/// A macro's accumulator (`@result`): no name in CEL source starts with `@`.
fn is_accumulator(expr: &IdedExpr) -> bool {
    matches!(&expr.expr, Expr::Ident(name) if name.starts_with('@'))
}

/// Replace `expr` with `function(expr, extra…)`; returns the nodes added.
fn wrap(expr: &mut IdedExpr, function: &str, extra: Vec<IdedExpr>, next_id: &mut u64) -> u64 {
    let added = 1 + extra.len() as u64;
    let inner = std::mem::take(expr);
    let mut args = vec![inner];
    args.extend(extra);
    *expr = IdedExpr {
        id: fresh(next_id),
        expr: Expr::Call(CallExpr {
            func_name: function.to_string(),
            target: None,
            args,
        }),
    };
    added
}

fn literal(value: LiteralValue, next_id: &mut u64) -> IdedExpr {
    IdedExpr {
        id: fresh(next_id),
        expr: Expr::Literal(value),
    }
}

fn fresh(next_id: &mut u64) -> u64 {
    let id = *next_id;
    *next_id += 1;
    id
}

/// One evaluation's budget. Once it has run out it stays out: every later
/// payment fails too, so a loop that absorbs an error (`exists`) does not
/// run on.
#[derive(Default)]
struct Meter {
    spent: AtomicU64,
    exhausted: AtomicBool,
}

impl Meter {
    fn pay(&self, units: u64) -> Result<(), ExecutionError> {
        let spent = self
            .spent
            .fetch_add(units, Ordering::Relaxed)
            .saturating_add(units);
        if spent > BUDGET || self.exhausted.load(Ordering::Relaxed) {
            self.exhausted.store(true, Ordering::Relaxed);
            return Err(ExecutionError::function_error(
                "budget",
                "the expression ran out of its evaluation budget",
            ));
        }
        Ok(())
    }
}

type Function = Box<
    dyn for<'c, 'v> Fn(&mut FunctionContext<'c, 'v>) -> Result<CowVal<'c, 'v>, ExecutionError>
        + Send
        + Sync,
>;

/// `PAY_LOOP(range, weight)`: pay for a loop over `range` whose iteration
/// is `weight` nodes, and for copying its items in; then hand `range` on.
fn pay_loop(meter: Arc<Meter>) -> Function {
    Box::new(move |ftx| {
        let weight = match ftx.args.get(1).and_then(|w| w.downcast_ref::<CelInt>()) {
            Some(w) => (*w.inner()).max(1) as u64,
            None => return Err(ftx.error("expects a range and a weight")),
        };
        let range = ftx.args.swap_remove(0);
        let items = range.as_sizer().map_or(0, |s| *s.size().inner()).max(0) as u64;
        meter.pay(items.saturating_mul(weight).saturating_add(cost(&*range)))?;
        Ok(range)
    })
}

/// `PAY_SIZE(value)` and `PAY_LOOKUP(value)`: pay what `cost` says
/// `value` costs, then hand it on.
fn pay_size(meter: Arc<Meter>, cost: fn(&dyn Val) -> u64) -> Function {
    Box::new(move |ftx| {
        if ftx.args.len() != 1 {
            return Err(ftx.error("expects one value"));
        }
        let value = ftx.args.swap_remove(0);
        meter.pay(cost(&*value))?;
        Ok(value)
    })
}

/// What copying `value` costs, in units: one for a scalar or a container,
/// plus what its contents cost; a string or bytes, a unit per 64 bytes.
fn cost(value: &dyn Val) -> u64 {
    if let Some(s) = value.downcast_ref::<CelString>() {
        1 + (s.inner().len() / BYTES_PER_UNIT) as u64
    } else if let Some(b) = value.downcast_ref::<CelBytes>() {
        1 + (b.inner().len() / BYTES_PER_UNIT) as u64
    } else if let Some(list) = value.downcast_ref::<CelList>() {
        list.inner()
            .iter()
            .fold(1, |sum, item| sum.saturating_add(cost(item.as_ref())))
    } else if let Some(map) = value.downcast_ref::<CelMap>() {
        map.inner().iter().fold(1, |sum, (key, item)| {
            let key = match key {
                CelMapKey::String(s) => 1 + (s.inner().len() / BYTES_PER_UNIT) as u64,
                _ => 1,
            };
            sum.saturating_add(key).saturating_add(cost(item.as_ref()))
        })
    } else {
        1
    }
}

/// What looking a key up in `value` costs: a unit in a map, what the
/// whole of anything else costs (`in` walks a list).
fn lookup_cost(value: &dyn Val) -> u64 {
    if value.downcast_ref::<CelMap>().is_some() {
        1
    } else {
        cost(value)
    }
}

/// `ip_in(ip, network)`: whether the address `ip` is in `network`, a CIDR
/// block (`"10.0.0.0/8"`, `"fd00::/8"`) or a single address. An
/// IPv4-mapped IPv6 address counts as the IPv4 one.
fn ip_in(ip: Arc<String>, network: Arc<String>) -> Result<bool, ExecutionError> {
    let addr: IpAddr = ip.trim().parse().map_err(|_| {
        ExecutionError::function_error("ip_in", format!("`{ip}` is not an IP address"))
    })?;
    let net = parse_net(&network).ok_or_else(|| {
        ExecutionError::function_error("ip_in", format!("`{network}` is not a network"))
    })?;
    Ok(net.contains(&addr.to_canonical()))
}

/// A network as `server.trusted_proxies` reads one: a CIDR block or a
/// single address.
fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The variables, as CEL values that borrow from the input.
type Boxed<'v> = Box<dyn Val + 'v>;

fn string<'v>(s: &'v str) -> Boxed<'v> {
    Box::new(CelString::from(s))
}

fn map<'v>(entries: impl IntoIterator<Item = (&'v str, Boxed<'v>)>) -> Boxed<'v> {
    let entries: HashMap<CelMapKey<'v>, Boxed<'v>> = entries
        .into_iter()
        .map(|(key, value)| (CelMapKey::from(key), value))
        .collect();
    Box::new(CelMap::from(entries))
}

/// `user`.
fn user_val<'v>(user: Option<&UserFacts<'v>>) -> Boxed<'v> {
    let Some(user) = user else {
        return Box::new(CelNull);
    };
    let groups: Vec<Boxed<'v>> = user.groups.iter().map(|g| string(g)).collect();
    map([
        ("username", string(user.username)),
        ("email", string(user.email)),
        ("name", string(user.name)),
        ("groups", Box::new(CelList::from(groups)) as Boxed<'v>),
        ("is_superuser", Box::new(CelBool::from(user.is_superuser))),
    ])
}

/// Header names and values as `request.headers` has them: a value borrowed
/// where the header came once, joined where it came more than once.
fn joined_headers(headers: &http::HeaderMap) -> Vec<(&str, std::borrow::Cow<'_, str>)> {
    let mut joined = Vec::with_capacity(headers.keys_len());
    for name in headers.keys() {
        let mut values = headers.get_all(name).iter().map(|v| v.to_str());
        let Some(Ok(first)) = values.next() else {
            continue;
        };
        let mut value = std::borrow::Cow::Borrowed(first);
        let mut utf8 = true;
        for more in values {
            match more {
                Ok(more) => {
                    let v = value.to_mut();
                    v.push_str(", ");
                    v.push_str(more);
                }
                Err(_) => utf8 = false,
            }
        }
        if utf8 {
            joined.push((name.as_str(), value));
        }
    }
    joined
}

/// `request`, with the headers `joined_headers` made.
fn request_val<'v>(
    request: &RequestFacts<'v>,
    headers: &'v [(&'v str, std::borrow::Cow<'v, str>)],
) -> Boxed<'v> {
    let ip: Boxed<'v> = match request.ip {
        Some(ip) => Box::new(CelString::from(ip.to_canonical().to_string())),
        None => Box::new(CelNull),
    };
    map([
        ("ip", ip),
        ("host", string(request.host)),
        ("path", string(request.path)),
        ("method", string(request.method)),
        (
            "headers",
            map(headers.iter().map(|(name, value)| (*name, string(value)))),
        ),
    ])
}

/// `context`: JSON as CEL has it, an integer as an `int` (a `uint` past
/// `i64`), any other number as a `double`.
fn json_map<'v>(object: &'v serde_json::Map<String, Json>) -> Boxed<'v> {
    map(object
        .iter()
        .map(|(key, value)| (key.as_str(), json(value))))
}

fn json<'v>(value: &'v Json) -> Boxed<'v> {
    match value {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Json::String(s) => string(s),
        Json::Array(items) => Box::new(CelList::from(items.iter().map(json).collect::<Vec<_>>())),
        Json::Object(object) => json_map(object),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request to evaluate against: GET `path` from 10.0.0.1, no
    /// headers, an empty context.
    struct Request {
        path: &'static str,
        method: &'static str,
        ip: Option<IpAddr>,
        headers: http::HeaderMap,
        context: serde_json::Map<String, Json>,
    }

    impl Request {
        fn to(path: &'static str) -> Request {
            Request {
                path,
                method: "GET",
                ip: Some("10.0.0.1".parse().unwrap()),
                headers: http::HeaderMap::new(),
                context: serde_json::Map::new(),
            }
        }

        fn header(mut self, name: &'static str, value: &str) -> Request {
            self.headers.append(name, value.parse().unwrap());
            self
        }

        fn input<'a>(&'a self, user: Option<UserFacts<'a>>) -> Input<'a> {
            Input {
                user,
                request: RequestFacts {
                    ip: self.ip,
                    host: "app.example.test",
                    path: self.path,
                    method: self.method,
                    headers: &self.headers,
                },
                context: &self.context,
            }
        }
    }

    fn user<'a>(username: &'a str, groups: &'a [String]) -> Option<UserFacts<'a>> {
        Some(UserFacts {
            username,
            email: "someone@example.test",
            name: username,
            groups,
            is_superuser: false,
        })
    }

    fn groups(names: &[&str]) -> Vec<String> {
        names.iter().map(|g| g.to_string()).collect()
    }

    fn eval(source: &str, input: &Input<'_>) -> Result<bool, EvalError> {
        Expression::compile(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"))
            .evaluate(input)
    }

    /// The longest `unit sep unit sep …` that fits `MAX_SOURCE` between
    /// `pre` and `post`.
    fn fill(pre: &str, unit: &str, sep: &str, post: &str) -> String {
        let mut s = pre.to_string();
        let mut first = true;
        while s.len() + sep.len() + unit.len() + post.len() <= MAX_SOURCE {
            if !first {
                s.push_str(sep);
            }
            s.push_str(unit);
            first = false;
        }
        s + post
    }

    /// `[item, item, …]`, `n` long.
    fn list_of(item: &str, n: usize) -> String {
        format!("[{}]", vec![item; n].join(","))
    }

    #[test]
    fn a_group_and_a_path() {
        let source = r#""admins" in user.groups && request.path.startsWith("/admin")"#;
        let admins = groups(&["staff", "admins"]);
        let staff = groups(&["staff"]);
        let admin_page = Request::to("/admin/users");
        let home = Request::to("/home");
        assert_eq!(
            eval(source, &admin_page.input(user("alice", &admins))),
            Ok(true)
        );
        assert_eq!(
            eval(source, &admin_page.input(user("bob", &staff))),
            Ok(false)
        );
        assert_eq!(eval(source, &home.input(user("alice", &admins))), Ok(false));
    }

    #[test]
    fn a_username_when_there_is_a_user() {
        let source = r#"user != null && user.username == "alice""#;
        let none = groups(&[]);
        let request = Request::to("/");
        assert_eq!(eval(source, &request.input(user("alice", &none))), Ok(true));
        assert_eq!(eval(source, &request.input(user("bob", &none))), Ok(false));
        assert_eq!(eval(source, &request.input(None)), Ok(false));
    }

    #[test]
    fn an_anonymous_visitor_is_a_null_user() {
        let request = Request::to("/");
        assert_eq!(eval("user == null", &request.input(None)), Ok(true));
        // A field of null is an error, not false: the policy fails.
        assert!(matches!(
            eval(r#"user.username == "alice""#, &request.input(None)),
            Err(EvalError::Failed(_))
        ));
        let none = groups(&[]);
        assert_eq!(
            eval("user == null", &request.input(user("alice", &none))),
            Ok(false)
        );
        assert_eq!(
            eval(
                "!user.is_superuser && user.email.endsWith('@example.test')",
                &request.input(user("alice", &none))
            ),
            Ok(true)
        );
    }

    #[test]
    fn a_header() {
        let source = r#"request.headers["x-env"] == "prod""#;
        let prod = Request::to("/").header("x-env", "prod");
        let staging = Request::to("/").header("x-env", "staging");
        assert_eq!(eval(source, &prod.input(None)), Ok(true));
        assert_eq!(eval(source, &staging.input(None)), Ok(false));
    }

    #[test]
    fn a_missing_header_is_an_error_unless_guarded() {
        let bare = Request::to("/");
        let missing = eval(r#"request.headers["x-env"] == "prod""#, &bare.input(None));
        assert_eq!(missing, Err(EvalError::Failed("No such key: x-env".into())));
        let guarded = r#""x-env" in request.headers && request.headers["x-env"] == "prod""#;
        assert_eq!(eval(guarded, &bare.input(None)), Ok(false));
        let prod = Request::to("/").header("x-env", "prod");
        assert_eq!(eval(guarded, &prod.input(None)), Ok(true));
    }

    #[test]
    fn headers_repeated_are_joined_and_names_are_lower_case() {
        let request = Request::to("/")
            .header("x-tag", "a")
            .header("x-tag", "b")
            .header("X-Env", "prod");
        assert_eq!(
            eval(
                r#"request.headers["x-tag"] == "a, b""#,
                &request.input(None)
            ),
            Ok(true)
        );
        assert_eq!(
            eval(r#""x-env" in request.headers"#, &request.input(None)),
            Ok(true)
        );
        assert_eq!(
            eval(r#""X-Env" in request.headers"#, &request.input(None)),
            Ok(false)
        );

        let mut odd = Request::to("/");
        let latin1 = http::HeaderValue::from_bytes(b"caf\xe9").unwrap();
        odd.headers.insert("x-odd", latin1);
        assert_eq!(
            eval(r#""x-odd" in request.headers"#, &odd.input(None)),
            Ok(false)
        );
    }

    #[test]
    fn ip_in_a_network() {
        let source = r#"ip_in(request.ip, "192.168.0.0/16")"#;
        let mut request = Request::to("/");
        request.ip = Some("192.168.4.20".parse().unwrap());
        assert_eq!(eval(source, &request.input(None)), Ok(true));
        request.ip = Some("::ffff:192.168.4.20".parse().unwrap());
        assert_eq!(eval(source, &request.input(None)), Ok(true));
        assert_eq!(
            eval("request.ip == '192.168.4.20'", &request.input(None)),
            Ok(true)
        );
        request.ip = Some("10.0.0.1".parse().unwrap());
        assert_eq!(eval(source, &request.input(None)), Ok(false));
        assert_eq!(
            eval(r#"ip_in(request.ip, "10.0.0.1")"#, &request.input(None)),
            Ok(true)
        );
        assert_eq!(
            eval(r#"ip_in(request.ip, "fd00::/8")"#, &request.input(None)),
            Ok(false)
        );

        // No address: an error, so the policy fails.
        request.ip = None;
        assert!(matches!(
            eval(source, &request.input(None)),
            Err(EvalError::Failed(_))
        ));
    }

    #[test]
    fn ip_in_checks_a_written_network_at_compile() {
        let e = Expression::compile(r#"ip_in(request.ip, "10.0.0.0/33")"#).unwrap_err();
        assert_eq!(
            e,
            CompileError::Invalid {
                line: 1,
                column: 19,
                message: r#"`10.0.0.0/33` is not a network like "10.0.0.0/8""#.into()
            }
        );
        // One that only the request knows fails when evaluated.
        let request = Request::to("/not-a-network");
        assert_eq!(
            eval("ip_in(request.ip, request.path)", &request.input(None)),
            Err(EvalError::Failed(
                "Error executing function 'ip_in': `/not-a-network` is not a network".into()
            ))
        );
    }

    #[test]
    fn a_method_not_in_a_list() {
        let source = r#"!(request.method in ["POST", "DELETE"])"#;
        let mut request = Request::to("/");
        assert_eq!(eval(source, &request.input(None)), Ok(true));
        request.method = "POST";
        assert_eq!(eval(source, &request.input(None)), Ok(false));
        request.method = "DELETE";
        assert_eq!(eval(source, &request.input(None)), Ok(false));
    }

    #[test]
    fn the_plan_context() {
        let mut request = Request::to("/");
        request.context = serde_json::json!({
            "flow": "login",
            "attempts": 2,
            "geo": {"country": "NZ", "asn": 64500},
            "tags": ["new", "mobile"],
            "ratio": 0.5,
            "verified": null,
        })
        .as_object()
        .unwrap()
        .clone();
        let source = r#"context.flow == "login" && context.attempts < 3
            && context.geo.country in ["NZ", "AU"] && "mobile" in context.tags
            && context.ratio < 1.0 && context.verified == null"#;
        assert_eq!(eval(source, &request.input(None)), Ok(true));
        assert_eq!(
            eval(
                "has(context.flow) && !has(context.stage)",
                &request.input(None)
            ),
            Ok(true)
        );
    }

    #[test]
    fn macros_over_groups() {
        let admins = groups(&["eng-platform", "staff"]);
        let request = Request::to("/");
        let input = request.input(user("alice", &admins));
        assert_eq!(
            eval("user.groups.exists(g, g.startsWith('eng-'))", &input),
            Ok(true)
        );
        assert_eq!(
            eval("user.groups.all(g, g.startsWith('eng-'))", &input),
            Ok(false)
        );
        assert_eq!(
            eval("user.groups.exists_one(g, g == 'staff')", &input),
            Ok(true)
        );
        assert_eq!(
            eval(
                "user.groups.filter(g, g != 'staff') == ['eng-platform']",
                &input
            ),
            Ok(true)
        );
        assert_eq!(
            eval("user.groups.map(g, size(g)) == [12, 5]", &input),
            Ok(true)
        );
    }

    #[test]
    fn a_syntax_error_has_its_line_and_column() {
        let source = "user != null &&\n  user.username == == \"alice\"";
        let e = Expression::compile(source).unwrap_err();
        let CompileError::Invalid {
            line,
            column,
            message,
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!((*line, *column), (2, 20), "{e}");
        assert!(message.starts_with("Syntax error"), "{message}");
        assert!(
            e.to_string().starts_with("line 2, column 20: Syntax error"),
            "{e}"
        );
        // Columns count characters, not bytes.
        let e = Expression::compile("'ééé' == == 1").unwrap_err();
        assert!(e.to_string().starts_with("line 1, column 10:"), "{e}");
    }

    #[test]
    fn an_unknown_variable_is_refused_at_compile() {
        let e = Expression::compile("user != null &&\n  usr.username == 'alice'").unwrap_err();
        assert_eq!(
            e,
            CompileError::Invalid {
                line: 2,
                column: 3,
                message: "unknown variable `usr`: there are user, request and context".into()
            }
        );
        // A loop's own variable is known inside the loop only.
        assert!(Expression::compile("user.groups.exists(g, g == 'x')").is_ok());
        assert!(Expression::compile("user.groups.exists(g, true) && g == 'x'").is_err());
        // Type names are known.
        assert!(Expression::compile("type(context) == map").is_ok());
    }

    #[test]
    fn an_unknown_field_is_an_error() {
        let none = groups(&[]);
        let request = Request::to("/");
        assert_eq!(
            eval(
                "user.nickname == 'al'",
                &request.input(user("alice", &none))
            ),
            Err(EvalError::Failed("No such key: nickname".into()))
        );
    }

    #[test]
    fn only_a_bool_is_an_answer() {
        let request = Request::to("/home");
        assert_eq!(
            eval("request.path", &request.input(None)),
            Err(EvalError::NotBool("string".into()))
        );
        assert_eq!(
            eval("1 + 1", &request.input(None)),
            Err(EvalError::NotBool("int".into()))
        );
        assert_eq!(
            eval("user", &request.input(None)),
            Err(EvalError::NotBool("null".into()))
        );
        assert_eq!(
            eval("1 / 0 == 1", &request.input(None)),
            Err(EvalError::Failed("Division by zero of Int(1)".into()))
        );
    }

    #[test]
    fn nothing_outside_the_standard_library_is_callable() {
        let request = Request::to("/");
        // Left out with the crate's regex feature: it compiles its pattern
        // at every call.
        assert_eq!(
            eval("request.path.matches('^/')", &request.input(None)),
            Err(EvalError::Failed(
                "Undeclared reference to 'matches'".into()
            ))
        );
        for call in [
            "now()",
            "env('HOME')",
            "file('/etc/passwd')",
            "timestamp('2024-01-01T00:00:00Z')",
        ] {
            let source = format!("{call} == null");
            assert!(
                matches!(
                    eval(&source, &request.input(None)),
                    Err(EvalError::Failed(_))
                ),
                "{call}"
            );
        }
        // The budget's own functions cannot be named from source.
        assert!(Expression::compile(&format!("{PAY_SIZE}(1) == 1")).is_err());
    }

    #[test]
    fn too_long_and_too_deep_are_refused() {
        let long = format!("{} == 1", "1".repeat(MAX_SOURCE));
        assert_eq!(
            Expression::compile(&long).unwrap_err(),
            CompileError::TooLong {
                len: MAX_SOURCE + 5,
                max: MAX_SOURCE
            }
        );
        let nested = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        let e = Expression::compile(&nested).unwrap_err();
        assert!(
            e.to_string().ends_with("the expression nests too deeply"),
            "{e}"
        );
        let deep = vec!["1"; MAX_DEPTH + 1].join(" + ") + " == 0";
        let e = Expression::compile(&deep).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("the expression nests more than 64 deep"),
            "{e}"
        );
        let deepest = vec!["1"; MAX_DEPTH - 1].join(" + ") + " == 0";
        assert!(Expression::compile(&deepest).is_ok());
    }

    #[test]
    fn the_worst_shapes_compile_and_evaluate_on_a_small_stack() {
        // What the parser and the interpreter recurse on most, at the
        // longest source or the deepest nesting accepted: on 512 KiB, a
        // quarter of a tokio worker's stack.
        let deepest = MAX_DEPTH - 1;
        let shapes = [
            fill("", "1", "+", " == 0"),
            fill("a", ".b", "", ""),
            fill("", "(", "", "1"),
            fill("", "[", "", "1"),
            fill("true", "?1:true", "", ""),
            fill("1", "==1", "", ""),
            format!("{} == 0", vec!["1"; deepest].join(" + ")),
            format!(
                "{}1{} == []",
                "[".repeat(deepest / 2),
                "]".repeat(deepest / 2)
            ),
            format!(
                "[request.path]{}.size() == 1",
                ".map(x, x)".repeat(deepest / 2)
            ),
            format!(
                "{}true{}",
                "[1].all(x, ".repeat(deepest / 3),
                ")".repeat(deepest / 3)
            ),
        ];
        let ran = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                let request = Request::to("/");
                for source in &shapes {
                    if let Ok(expression) = Expression::compile(source) {
                        let _ = expression.evaluate(&request.input(None));
                    }
                }
            })
            .unwrap()
            .join();
        assert!(ran.is_ok());
    }

    #[test]
    fn a_loop_over_the_groups_costs_little() {
        let many: Vec<String> = (0..100).map(|i| format!("group-{i}")).collect();
        let request = Request::to("/");
        let input = request.input(user("alice", &many));
        let e = Expression::compile(
            "user.groups.exists(g, g.startsWith('eng-')) || 'group-99' in user.groups",
        )
        .unwrap();
        let (answer, spent) = e.metered(&input);
        assert_eq!(answer, Ok(true));
        assert!(spent < BUDGET / 5, "{spent}");
    }

    #[test]
    fn what_would_run_long_runs_out_of_budget() {
        let mut request = Request::to("/");
        request
            .headers
            .insert("x-big", "a".repeat(30_000).parse().unwrap());
        let many: Vec<String> = (0..100).map(|i| format!("group-{i}")).collect();
        let input = request.input(user("alice", &many));
        let ten = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]";
        let costly = [
            // 10⁸ iterations.
            format!(
                "{}true{}",
                format!("{ten}.all(a, ").repeat(8),
                ")".repeat(8)
            ),
            // The same, its errors absorbed by `exists` and `||`.
            format!(
                "{}false{} || true",
                format!("{ten}.exists(a, ").repeat(8),
                ")".repeat(8)
            ),
            // A string that doubles at every step: 2³⁰ times the path.
            format!("[request.path]{}.size() == 1", ".map(x, x + x)".repeat(30)),
            // 30 KB copied 60 times over, growing.
            format!("{} == ''", vec!["request.headers['x-big']"; 60].join(" + ")),
            // 30 KB compared, a thousand times.
            format!(
                "{}.all(x, request.headers['x-big'] == request.headers['x-big'])",
                list_of("1", 1000)
            ),
            // A list walked for every item of another.
            format!("{}.all(x, x in {})", list_of("1", 500), list_of("2", 1000)),
            // The whole request compared with itself, over and over.
            fill("", "request == request", " && ", ""),
            // Over the groups, the groups, the groups.
            "user.groups.all(a, user.groups.all(b, user.groups.all(c, a + b + c != '')))"
                .to_string(),
        ];
        for source in &costly {
            let e = Expression::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            let started = std::time::Instant::now();
            let (answer, spent) = e.metered(&input);
            let took = started.elapsed();
            assert_eq!(answer, Err(EvalError::TooCostly), "{source}");
            assert!(spent > BUDGET, "{source}");
            // A millisecond or so when optimised; a debug build on a busy
            // machine is given a lot more.
            assert!(
                took < std::time::Duration::from_millis(250),
                "{source}: {took:?}"
            );
        }
    }

    #[test]
    fn an_expression_is_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Expression>();
        let e = Expression::compile("request.path == '/'").unwrap();
        assert_eq!(e.source(), "request.path == '/'");
        assert_eq!(e, Expression::compile("request.path == '/'").unwrap());
        assert_eq!(format!("{e:?}"), r#"Expression("request.path == '/'")"#);
    }
}
