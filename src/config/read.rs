//! Reading a config file into `Config`: parse with spans kept, walk every
//! table by hand, and collect *every* problem with its line and key path
//! instead of stopping at the first. Environment overrides
//! (`FLOWGATE_<SECTION>_<KEY>`) are applied key by key as the sections are
//! read, so a bad override is reported like a bad line, naming the variable.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::identity::Field;

use super::{
    resolve_against, AdminConfig, Allow, Config, ConfigError, ConfigErrors, CookieSecure,
    Designation, DirectoryConfig, ExecutorApiConfig, ExecutorConfig, FlowAuthentication,
    FlowConfig, HeaderPreset, HeaderSet, HostPattern, LogConfig, LogFormat, PathRule, ProxyConfig,
    RemoteConfig, RouteConfig, Secret, Server, SessionConfig, StageConfig, StateConfig, StoreKind,
    TlsConfig,
};
use super::{
    Binding, Bindings, DeniedAction, InvalidResponseAction, PolicyConfig, PolicyMode, StageBinding,
};
use crate::engine::policy;
use crate::engine::stage::{self, Kind, Stage};

/// `redis` or `rediss`, for a URL of one with a host; `None` otherwise.
fn redis_scheme(text: &str) -> Option<&'static str> {
    let url = url::Url::parse(text)
        .ok()
        .filter(|u| u.host_str().is_some())?;
    match url.scheme() {
        "redis" => Some("redis"),
        "rediss" => Some("rediss"),
        _ => None,
    }
}

/// The slug of the flow used when a config declares none.
pub const DEFAULT_FLOW: &str = "default-authentication-flow";
/// The slug of the invalidation flow used when a config declares none.
pub const DEFAULT_INVALIDATION_FLOW: &str = "default-invalidation-flow";

/// A signing secret shorter than this is refused: HMAC-SHA256 wants 32 bytes.
const MIN_SECRET_BYTES: usize = 32;

/// Read and validate the file at `path`, with overrides from the process
/// environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let env = |name: &str| std::env::var(name).ok();
    run(&src, path, &env, Files::Read, |reader, root| {
        reader.config(root)
    })
}

/// The flows a route may name.
#[derive(Clone, Copy)]
enum Flows<'f> {
    /// The `[[flow]]`s of this file.
    Embedded(&'f [FlowConfig]),
    /// Whatever the remote executor runs: any slug.
    Remote,
}

/// Whether the files a config names are read while it is validated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Files {
    /// The users file too: its problems are the config's (`load`).
    Read,
    /// Only what the text says and the TLS files (`from_str`).
    TextOnly,
}

/// Validate `src` as if read from `path` (relative paths inside resolve
/// against its folder); `env` answers environment lookups. The users file
/// it names is not read (`load` reads it).
pub fn from_str(
    src: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    run(src, path, env, Files::TextOnly, |reader, root| {
        reader.config(root)
    })
}

/// Read another TOML file (the users file) as the config is read: `read`
/// walks the document with the same typed getters, and every problem comes
/// back with its line and key path, in file order.
pub(crate) fn read_toml<T>(
    src: &str,
    path: &Path,
    read: impl FnOnce(&mut Reader<'_>, &dyn TableLike) -> T,
) -> Result<T, ConfigErrors> {
    run(src, path, &|_| None, Files::TextOnly, read)
}

fn run<T>(
    src: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    files: Files,
    read: impl FnOnce(&mut Reader<'_>, &dyn TableLike) -> T,
) -> Result<T, ConfigErrors> {
    let mut reader = Reader {
        file: path.display().to_string(),
        path,
        lines: line_starts(src),
        env,
        files,
        asked: HashSet::new(),
        errors: Vec::new(),
        policies: BTreeMap::new(),
    };
    let doc = match ImDocument::parse(src) {
        Ok(doc) => doc,
        Err(e) => {
            let line = e.span().map(|s| reader.line_at(s.start));
            // toml_edit puts what it expected on a line of its own.
            let message: Vec<&str> = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join("; ");
            reader.error(line, "", format!("not valid TOML: {message}"));
            return Err(ConfigErrors(reader.errors));
        }
    };
    let value = read(&mut reader, doc.as_table());
    if files == Files::Read {
        reader.unknown_variables(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()));
    }
    if reader.errors.is_empty() {
        Ok(value)
    } else {
        // In file order, then the environment's and whole-file problems.
        let file = reader.file.clone();
        reader.errors.sort_by(|a, b| {
            let key = |e: &ConfigError| (e.file != file, e.file.clone(), e.line.is_none(), e.line);
            key(a).cmp(&key(b))
        });
        Err(ConfigErrors(reader.errors))
    }
}

/// Where a value came from, for messages.
#[derive(Clone)]
pub(crate) struct Place {
    /// `None` for the file itself, or the environment variable's name.
    env: Option<String>,
    pub(crate) line: Option<usize>,
    key: String,
}

/// A raw value: from the file, or a string from the environment.
enum Raw<'a> {
    Toml(&'a Item),
    Env(String),
}

/// One table being read: which keys were asked for, so the rest can be
/// reported as unknown.
pub(crate) struct Section<'a> {
    table: Option<&'a dyn TableLike>,
    /// Key path of the table itself (`server`, `route[1]`, …).
    pub(crate) path: String,
    /// `Some("SERVER")` where environment overrides apply.
    env: Option<&'static str>,
    pub(crate) line: Option<usize>,
    known: Vec<&'static str>,
}

pub(crate) struct Reader<'a> {
    file: String,
    path: &'a Path,
    lines: Vec<usize>,
    env: &'a dyn Fn(&str) -> Option<String>,
    files: Files,
    /// Every `FLOWGATE_<SECTION>_<KEY>` variable a key was looked up under.
    asked: HashSet<String>,
    errors: Vec<ConfigError>,
    /// The `[policy.<name>]` tables, once read: what stages' options may
    /// bind (`Options::policies`).
    policies: BTreeMap<String, PolicyConfig>,
}

/// A stage's options, as its kind reads them (`engine::stage::Kind`):
/// the typed getters of the reader, on the stage's own table, with the
/// same file:line:key messages as everywhere else.
pub(crate) struct Options<'r, 'a, 't> {
    reader: &'r mut Reader<'a>,
    section: Section<'t>,
}

impl Options<'_, '_, '_> {
    pub(crate) fn string(&mut self, key: &'static str) -> Option<(String, Place)> {
        self.reader.string(&mut self.section, key)
    }

    pub(crate) fn strings(&mut self, key: &'static str) -> Option<(Vec<(String, Place)>, Place)> {
        self.reader.strings(&mut self.section, key)
    }

    pub(crate) fn bool(&mut self, key: &'static str, default: bool) -> bool {
        self.reader.bool(&mut self.section, key, default)
    }

    pub(crate) fn integer(&mut self, key: &'static str, default: u64, min: u64) -> u64 {
        self.reader.integer(&mut self.section, key, default, min)
    }

    pub(crate) fn duration(
        &mut self,
        key: &'static str,
        default: Duration,
        allow_zero: bool,
    ) -> Duration {
        self.reader
            .duration(&mut self.section, key, default, allow_zero)
    }

    pub(crate) fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        self.reader.choice(&mut self.section, key, choices, default)
    }

    /// A whole number that may be below zero.
    pub(crate) fn signed(&mut self, key: &'static str, default: i64) -> i64 {
        let Some((raw, place)) = self.reader.get(&mut self.section, key) else {
            return default;
        };
        let value = match raw {
            Raw::Env(s) => s.trim().parse::<i64>().ok(),
            Raw::Toml(item) => item.as_integer(),
        };
        value.unwrap_or_else(|| {
            self.reader.error_at(&place, "expected a whole number");
            default
        })
    }

    /// A string that is a program (an expression): its text, where it is,
    /// and the file line its first line is on (a multi-line string starts
    /// below its key), for errors inside it.
    pub(crate) fn source(&mut self, key: &'static str) -> Option<(String, Place, Option<usize>)> {
        let (raw, place) = self.reader.get(&mut self.section, key)?;
        match raw {
            Raw::Env(text) => Some((text, place, None)),
            Raw::Toml(item) => {
                let Some(text) = item.as_str() else {
                    let message = format!("expected a string, found {}", type_name(item));
                    self.reader.error_at(&place, message);
                    return None;
                };
                // Counted back from the closing quote, which is on the
                // last line of the text (or just below it).
                let first = item.span().map(|span| {
                    let start = self.reader.line_at(span.start);
                    let end = self.reader.line_at(span.end.saturating_sub(1));
                    end.saturating_sub(text.matches('\n').count()).max(start)
                });
                Some((text.to_owned(), place, first))
            }
        }
    }

    /// Each table of the `[[key]]` list (or inline list of tables), read
    /// by `each` with its own unknown keys reported.
    pub(crate) fn tables(
        &mut self,
        key: &'static str,
        mut each: impl FnMut(&mut Options<'_, '_, '_>),
    ) {
        for section in self.reader.tables(&mut self.section, key) {
            let mut options = Options {
                reader: &mut *self.reader,
                section,
            };
            each(&mut options);
            let section = options.section;
            self.reader.finish(section);
        }
    }

    /// A list of `[policy.<name>]` names (each optionally
    /// `{ policy = …, negate = … }`), as `policies` of a binding is.
    pub(crate) fn policies(&mut self, key: &'static str) -> Vec<Binding> {
        let policies = self.reader.policies.clone();
        self.reader.policy_list(&mut self.section, key, &policies)
    }

    pub(crate) fn error_at(&mut self, place: &Place, message: impl Into<String>) {
        self.reader.error_at(place, message);
    }

    /// A problem with the table as a whole.
    pub(crate) fn error(&mut self, message: impl Into<String>) {
        let (line, path) = (self.section.line, self.section.path.clone());
        self.reader.error(line, &path, message);
    }
}

/// A kind's reader of its options (a stage's, a policy's).
type ReadKind<T> = fn(&mut Options<'_, '_, '_>) -> T;
/// A registry's lookup of a kind by name: its own name and its reader.
type FindKind<T> = fn(&str) -> Option<(&'static str, ReadKind<T>)>;

/// A stage kind with every option at its default: what a built-in stage
/// name means without a table.
pub(crate) fn stage_defaults(kind: &Kind) -> std::sync::Arc<dyn Stage> {
    let mut reader = Reader {
        file: String::new(),
        path: Path::new(""),
        lines: Vec::new(),
        env: &|_| None,
        files: Files::TextOnly,
        asked: HashSet::new(),
        errors: Vec::new(),
        policies: BTreeMap::new(),
    };
    let section = Section {
        table: None,
        path: String::new(),
        env: None,
        line: None,
        known: Vec::new(),
    };
    let mut options = Options {
        reader: &mut reader,
        section,
    };
    (kind.read)(&mut options)
}

impl<'a> Reader<'a> {
    fn line_at(&self, offset: usize) -> usize {
        match self.lines.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    pub(crate) fn line_of(&self, span: Option<Range<usize>>) -> Option<usize> {
        span.map(|s| self.line_at(s.start))
    }

    pub(crate) fn error(&mut self, line: Option<usize>, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// A `FLOWGATE_<SECTION>_…` variable that no key reads is a misspelt
    /// override: an error, as an unknown key in the file is.
    fn unknown_variables(&mut self, names: impl Iterator<Item = String>) {
        const SECTIONS: [&str; 8] = [
            "SERVER",
            "SESSION",
            "STATE",
            "DIRECTORY",
            "EXECUTOR",
            "LOG",
            "PROXY",
            "ADMIN",
        ];
        let mut unknown: Vec<String> = names
            .filter(|name| {
                SECTIONS
                    .iter()
                    .any(|section| name.starts_with(&format!("FLOWGATE_{section}_")))
            })
            .filter(|name| !self.asked.contains(name) && name != "FLOWGATE_SERVER_TLS")
            .collect();
        unknown.sort();
        for name in unknown {
            // Suggest within the section, on the key part alone.
            let (prefix, key) = SECTIONS
                .iter()
                .map(|section| format!("FLOWGATE_{section}_"))
                .find_map(|prefix| {
                    let key = name.strip_prefix(&prefix)?.to_owned();
                    Some((prefix, key))
                })
                .unwrap_or_default();
            let keys: Vec<&str> = self
                .asked
                .iter()
                .filter_map(|asked| asked.strip_prefix(&prefix))
                .collect();
            let message = match closest(&key, &keys) {
                Some(guess) => {
                    format!("no setting reads this variable (did you mean {prefix}{guess}?)")
                }
                None => "no setting reads this variable".to_owned(),
            };
            self.errors.push(ConfigError {
                file: format!("env {name}"),
                line: None,
                key: String::new(),
                message,
            });
        }
    }

    /// Problems found so far.
    pub(crate) fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub(crate) fn error_at(&mut self, place: &Place, message: impl Into<String>) {
        match &place.env {
            Some(var) => self.errors.push(ConfigError {
                file: format!("env {var}"),
                line: None,
                key: place.key.clone(),
                message: message.into(),
            }),
            None => self.error(place.line, &place.key, message),
        }
    }

    /// The table at `key` of `parent`, or an error if it is something else.
    fn section<'t>(
        &mut self,
        parent: &'t dyn TableLike,
        key: &str,
        path: String,
        env: Option<&'static str>,
    ) -> Section<'t> {
        let mut section = Section {
            table: None,
            path,
            env,
            line: None,
            known: Vec::new(),
        };
        if let Some((k, item)) = parent.get_key_value(key) {
            section.line = self.line_of(k.span()).or_else(|| self.line_of(item.span()));
            match item.as_table_like() {
                Some(table) => section.table = Some(table),
                None => {
                    let path = section.path.clone();
                    self.error(
                        section.line,
                        &path,
                        format!("expected a table, found {}", type_name(item)),
                    );
                }
            }
        }
        section
    }

    pub(crate) fn table_section<'t>(
        &mut self,
        table: &'t dyn TableLike,
        path: String,
        line: Option<usize>,
    ) -> Section<'t> {
        Section {
            table: Some(table),
            path,
            env: None,
            line,
            known: Vec::new(),
        }
    }

    /// Look `key` up: the environment override first, then the file.
    fn get<'t>(
        &mut self,
        section: &mut Section<'t>,
        key: &'static str,
    ) -> Option<(Raw<'t>, Place)> {
        section.known.push(key);
        let key_path = if section.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", section.path)
        };
        if let Some(prefix) = section.env {
            let var = format!("FLOWGATE_{prefix}_{}", key.to_ascii_uppercase());
            self.asked.insert(var.clone());
            if let Some(value) = (self.env)(&var) {
                return Some((
                    Raw::Env(value),
                    Place {
                        env: Some(var),
                        line: None,
                        key: key_path,
                    },
                ));
            }
        }
        let (k, item) = section.table?.get_key_value(key)?;
        if item.is_none() {
            return None;
        }
        let line = self.line_of(k.span()).or_else(|| self.line_of(item.span()));
        Some((
            Raw::Toml(item),
            Place {
                env: None,
                line,
                key: key_path,
            },
        ))
    }

    /// Every table of the `[[key]]` array in `parent`, as `key[0]`, `key[1]`…
    pub(crate) fn tables<'t>(
        &mut self,
        parent: &mut Section<'t>,
        key: &'static str,
    ) -> Vec<Section<'t>> {
        parent.known.push(key);
        let Some((k, item)) = parent.table.and_then(|t| t.get_key_value(key)) else {
            return Vec::new();
        };
        let line = self.line_of(k.span());
        let tables = self.table_list(item, line, key, false, &format!("`[[{key}]]` tables"));
        tables
            .into_iter()
            .enumerate()
            .map(|(i, (table, line))| {
                let path = match parent.path.as_str() {
                    "" => format!("{key}[{i}]"),
                    at => format!("{at}.{key}[{i}]"),
                };
                self.table_section(table, path, line)
            })
            .collect()
    }

    /// The tables `item` holds: `[[key]]`, `key = [{ … }, { … }]`, or (when
    /// `single`) one table; each with its line. Anything else is an error
    /// naming `expected`.
    fn table_list<'t>(
        &mut self,
        item: &'t Item,
        line: Option<usize>,
        key_path: &str,
        single: bool,
        expected: &str,
    ) -> Vec<(&'t dyn TableLike, Option<usize>)> {
        let mut tables: Vec<(&'t dyn TableLike, Option<usize>)> = Vec::new();
        if let Some(array) = item.as_array_of_tables() {
            for table in array.iter() {
                tables.push((table, self.line_of(table.span()).or(line)));
            }
        } else if let Some(array) = item.as_array() {
            for value in array.iter() {
                let at = self.line_of(value.span()).or(line);
                match value.as_inline_table() {
                    Some(table) => tables.push((table, at)),
                    None => self.error(
                        at,
                        key_path,
                        format!("expected a table, found {}", value_type(value)),
                    ),
                }
            }
        } else if let Some(table) = item.as_table_like().filter(|_| single) {
            tables.push((table, line));
        } else {
            self.error(
                line,
                key_path,
                format!("expected {expected}, found {}", type_name(item)),
            );
        }
        tables
    }

    /// Report every key of `section` that nothing asked for.
    pub(crate) fn finish(&mut self, section: Section<'_>) {
        let Some(table) = section.table else { return };
        for (name, item) in table.iter() {
            if section.known.contains(&name) {
                continue;
            }
            let line = self
                .line_of(table.key(name).and_then(|k| k.span()))
                .or_else(|| self.line_of(item.span()));
            let key = if section.path.is_empty() {
                name.to_owned()
            } else {
                format!("{}.{name}", section.path)
            };
            let message = match closest(name, &section.known) {
                Some(guess) => format!("unknown key (did you mean `{guess}`?)"),
                None => format!("unknown key; expected one of: {}", section.known.join(", ")),
            };
            self.error(line, &key, message);
        }
    }

    // ---- typed getters: `None` when absent or wrong (the error is recorded) ----

    pub(crate) fn string(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<(String, Place)> {
        let (raw, place) = self.get(section, key)?;
        match raw {
            Raw::Env(s) => Some((s, place)),
            Raw::Toml(item) => match item.as_str() {
                Some(s) => Some((s.to_owned(), place)),
                None => {
                    self.error_at(
                        &place,
                        format!("expected a string, found {}", type_name(item)),
                    );
                    None
                }
            },
        }
    }

    pub(crate) fn bool(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        default: bool,
    ) -> bool {
        let Some((raw, place)) = self.get(section, key) else {
            return default;
        };
        let value = match raw {
            Raw::Env(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            },
            Raw::Toml(item) => item.as_bool(),
        };
        value.unwrap_or_else(|| {
            self.error_at(&place, "expected true or false");
            default
        })
    }

    fn integer(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        default: u64,
        min: u64,
    ) -> u64 {
        let Some((raw, place)) = self.get(section, key) else {
            return default;
        };
        let value = match raw {
            Raw::Env(s) => s.trim().parse::<u64>().ok(),
            Raw::Toml(item) => item.as_integer().and_then(|i| u64::try_from(i).ok()),
        };
        match value {
            Some(v) if v >= min => v,
            Some(_) => {
                self.error_at(&place, format!("must be at least {min}"));
                default
            }
            None => {
                self.error_at(&place, "expected a whole number");
                default
            }
        }
    }

    /// `"90s"`, `"15m"`, `"12h"`, `"1h 30m"`, or a number of seconds.
    fn duration(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        default: Duration,
        allow_zero: bool,
    ) -> Duration {
        let Some((raw, place)) = self.get(section, key) else {
            return default;
        };
        let parsed = match raw {
            Raw::Env(s) => parse_duration(&s),
            Raw::Toml(item) => match (item.as_str(), item.as_integer()) {
                (Some(s), _) => parse_duration(s),
                (None, Some(secs)) if secs >= 0 => Ok(Duration::from_secs(secs as u64)),
                _ => Err(format!(
                    "expected a duration like \"15m\" or \"12h\", found {}",
                    type_name(item)
                )),
            },
        };
        match parsed {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.error_at(&place, "must be longer than zero");
                default
            }
            Ok(d) => d,
            Err(message) => {
                self.error_at(&place, message);
                default
            }
        }
    }

    /// One string or a list of them; from the environment, comma-separated.
    pub(crate) fn string_or_strings(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Vec<(String, Place)>> {
        let (raw, place) = self.get(section, key)?;
        match raw {
            Raw::Toml(item) if item.is_str() => {
                Some(vec![(item.as_str().unwrap_or_default().to_owned(), place)])
            }
            raw => self.string_items(raw, &place),
        }
    }

    /// A list of strings; from the environment, comma-separated.
    pub(crate) fn strings(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<(Vec<(String, Place)>, Place)> {
        let (raw, place) = self.get(section, key)?;
        let items = self.string_items(raw, &place)?;
        Some((items, place))
    }

    /// The strings of a list value, each with its own place.
    fn string_items(&mut self, raw: Raw<'_>, place: &Place) -> Option<Vec<(String, Place)>> {
        match raw {
            Raw::Env(s) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| (s.to_owned(), place.clone()))
                    .collect(),
            ),
            Raw::Toml(item) => {
                let Some(array) = item.as_array() else {
                    self.error_at(
                        place,
                        format!("expected a list of strings, found {}", type_name(item)),
                    );
                    return None;
                };
                let mut items = Vec::new();
                for (i, value) in array.iter().enumerate() {
                    let element = Place {
                        env: None,
                        line: self.line_of(value.span()).or(place.line),
                        key: format!("{}[{i}]", place.key),
                    };
                    match value.as_str() {
                        Some(s) => items.push((s.to_owned(), element)),
                        None => self.error_at(
                            &element,
                            format!("expected a string, found {}", value_type(value)),
                        ),
                    }
                }
                Some(items)
            }
        }
    }

    /// A string that must be one of `choices`.
    fn choice<T: Copy>(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some((value, place)) = self.string(section, key) else {
            return default;
        };
        match choices.iter().find(|(name, _)| *name == value) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.error_at(
                    &place,
                    format!("\"{value}\" is not one of {}", names.join(", ")),
                );
                default
            }
        }
    }

    /// `refuse` | `keep`: what to do with a path the gate cannot make
    /// fully canonical (`gate::canonical`).
    fn path_rule(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        default: PathRule,
    ) -> PathRule {
        self.choice(
            section,
            key,
            &[("refuse", PathRule::Refuse), ("keep", PathRule::Keep)],
            default,
        )
    }

    // ---- the sections ----

    fn config(&mut self, root: &dyn TableLike) -> Config {
        let mut top = Section {
            table: Some(root),
            path: String::new(),
            env: None,
            line: None,
            known: Vec::new(),
        };
        top.known.extend([
            "server",
            "session",
            "directory",
            "executor",
            "log",
            "proxy",
            "admin",
            "executor_api",
            "state",
            "flow",
            "stage",
            "policy",
            "route",
        ]);
        let server = self.server(root);
        let session = self.session(root);
        let executor = self.executor(root);
        let remote = executor.is_remote();
        if remote {
            // What only the embedded engine reads would silently do nothing.
            for key in ["directory", "flow", "stage"] {
                if let Some((k, item)) = root.get_key_value(key) {
                    let line = self.line_of(k.span()).or_else(|| self.line_of(item.span()));
                    self.error(
                        line,
                        key,
                        "only for the embedded executor: with executor.kind = \"remote\" \
                         the remote's flows and users are used",
                    );
                }
            }
        }
        let directory = self.directory(root, remote);
        let log = self.log(root);
        let proxy = self.proxy(root);
        let admin = self.admin(root);
        let state = self.state(root);
        let executor_api = self.executor_api(root, remote);
        self.listeners_apart(&server, &admin, executor_api.as_ref());
        let policies = self.policies(root);
        self.policies = policies.clone();
        let (stages, flows) = match remote {
            true => (BTreeMap::new(), Vec::new()),
            false => {
                let stages = self.stages(root);
                let flows = self.flows(root, &stages, &policies);
                // A stage that leads to another flow names one there is;
                // one that puts stages in the plan names stages there are.
                for (name, stage) in &stages {
                    let kinds = stage.stage.kinds_named();
                    for other in stage.stage.stages_named() {
                        match stages.get(other) {
                            None => self.error(
                                stage.line,
                                &format!("stage.{name}"),
                                format!("no stage \"{other}\": define `[stage.{other}]`"),
                            ),
                            Some(named) if !kinds.is_empty() && !kinds.contains(&named.kind) => {
                                self.error(
                                    stage.line,
                                    &format!("stage.{name}"),
                                    format!(
                                        "\"{other}\" is a {} stage; this one runs only {}",
                                        named.kind,
                                        crate::config::alternatives(kinds)
                                    ),
                                )
                            }
                            Some(_) => {}
                        }
                    }
                    if let Some(slug) = stage.stage.flow_named() {
                        if !flows.iter().any(|f| f.slug == slug) {
                            self.error(
                                stage.line,
                                &format!("stage.{name}.flow"),
                                format!("no flow has the slug \"{slug}\""),
                            );
                        }
                        let own = flows
                            .iter()
                            .any(|f| f.slug == slug && f.stages.iter().any(|b| b.stage == *name));
                        if own {
                            self.error(
                                stage.line,
                                &format!("stage.{name}.flow"),
                                format!("\"{slug}\" is a flow this stage is in: it would send visitors round in a loop"),
                            );
                        }
                    }
                }
                (stages, flows)
            }
        };
        let routes = self.routes(
            root,
            match remote {
                true => Flows::Remote,
                false => Flows::Embedded(&flows),
            },
            &proxy,
            &session.cookie_domains,
            &policies,
        );
        self.finish(top);
        Config {
            path: self.path.to_path_buf(),
            server,
            session,
            directory,
            executor,
            log,
            proxy,
            admin,
            state,
            executor_api,
            flows,
            stages,
            policies,
            routes,
        }
    }

    /// No two listeners on one address: `serve` could not bind the second.
    fn listeners_apart(
        &mut self,
        server: &Server,
        admin: &AdminConfig,
        executor_api: Option<&ExecutorApiConfig>,
    ) {
        let listeners = [
            ("server.listen", Some(server.listen)),
            ("server.redirect_http", server.redirect_http),
            ("admin.listen", admin.listen),
            ("executor_api.listen", executor_api.map(|api| api.listen)),
        ];
        for (i, (key, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr else { continue };
            let clash = listeners[..i].iter().find(|(_, other)| {
                other.is_some_and(|other| {
                    addr.port() != 0
                        && other.port() == addr.port()
                        && (other.ip() == addr.ip()
                            || other.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                })
            });
            if let Some((other, _)) = clash {
                self.error(
                    None,
                    key,
                    format!("{addr} is {other}'s address too: each listener needs its own"),
                );
            }
        }
    }

    fn server(&mut self, root: &dyn TableLike) -> Server {
        let mut s = self.section(root, "server", "server".into(), Some("SERVER"));
        let listen = match self.string(&mut s, "listen") {
            Some((text, place)) => text.parse::<SocketAddr>().unwrap_or_else(|_| {
                self.error_at(
                    &place,
                    format!(
                        "\"{text}\" is not an address like \"127.0.0.1:8080\" or \"[::]:8443\""
                    ),
                );
                default_listen()
            }),
            None => default_listen(),
        };
        let tls = self.tls(&mut s);
        let redirect_http = match self.string(&mut s, "redirect_http") {
            Some((text, place)) => match text.parse::<SocketAddr>() {
                Ok(_) if tls.is_empty() => {
                    self.error_at(
                        &place,
                        "sends browsers to HTTPS, which this listener does not speak: set server.tls too",
                    );
                    None
                }
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error_at(
                        &place,
                        format!("\"{text}\" is not an address like \"0.0.0.0:80\""),
                    );
                    None
                }
            },
            None => None,
        };
        let mut trusted_proxies = Vec::new();
        if let Some((items, _)) = self.strings(&mut s, "trusted_proxies") {
            for (text, place) in items {
                match parse_net(&text) {
                    Some(net) => trusted_proxies.push(net),
                    None => self.error_at(
                        &place,
                        format!(
                            "\"{text}\" is not an IP address or CIDR range like \"10.0.0.0/8\""
                        ),
                    ),
                }
            }
        }
        let prefix = match self.string(&mut s, "prefix") {
            Some((p, place)) => {
                let valid = p.starts_with('/')
                    && p.len() > 1
                    && !p.ends_with('/')
                    && !p.contains("//")
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b));
                if !valid {
                    self.error_at(&place, "must start with `/`, not end with `/`, and use only letters, digits and `-_.~/` (like \"/_flowgate\")");
                }
                p
            }
            None => "/_flowgate".to_owned(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = self.integer(&mut s, "workers", cores as u64, 1) as usize;
        let max_connections = self.integer(&mut s, "max_connections", 16384, 1) as usize;
        let max_header_bytes = self.integer(&mut s, "max_header_bytes", 32 * 1024, 1024) as usize;
        let max_headers = self.integer(&mut s, "max_headers", 100, 8) as usize;
        let header_read_timeout = self.duration(
            &mut s,
            "header_read_timeout",
            Duration::from_secs(10),
            false,
        );
        let keepalive_timeout =
            self.duration(&mut s, "keepalive_timeout", Duration::from_secs(60), false);
        let shutdown_timeout =
            self.duration(&mut s, "shutdown_timeout", Duration::from_secs(10), true);
        let shutdown_delay = self.duration(&mut s, "shutdown_delay", Duration::ZERO, true);
        let fast_lane = self.bool(&mut s, "fast_lane", true);
        self.finish(s);
        Server {
            listen,
            tls,
            redirect_http,
            trusted_proxies,
            prefix,
            workers,
            max_connections,
            max_header_bytes,
            max_headers,
            header_read_timeout,
            keepalive_timeout,
            shutdown_timeout,
            shutdown_delay,
            fast_lane,
        }
    }

    fn proxy(&mut self, root: &dyn TableLike) -> ProxyConfig {
        let mut s = self.section(root, "proxy", "proxy".into(), Some("PROXY"));
        let connect_timeout =
            self.duration(&mut s, "connect_timeout", Duration::from_secs(5), false);
        let response_timeout =
            self.duration(&mut s, "response_timeout", Duration::from_secs(60), false);
        let pool_idle_timeout =
            self.duration(&mut s, "pool_idle_timeout", Duration::from_secs(90), false);
        let tunnel_idle_timeout = self.duration(
            &mut s,
            "tunnel_idle_timeout",
            Duration::from_secs(3600),
            false,
        );
        let ca_file = self.ca_file(&mut s);
        let escaped_slashes = self.path_rule(&mut s, "escaped_slashes", PathRule::Refuse);
        let path_parameters = self.path_rule(&mut s, "path_parameters", PathRule::Refuse);
        self.finish(s);
        ProxyConfig {
            escaped_slashes,
            path_parameters,
            connect_timeout,
            response_timeout,
            pool_idle_timeout,
            tunnel_idle_timeout,
            ca_file,
        }
    }

    /// `[executor_api]`: the embedded executor served to other flowgates
    /// and authentik clients at authentik's own paths.
    fn executor_api(&mut self, root: &dyn TableLike, remote: bool) -> Option<ExecutorApiConfig> {
        let mut s = self.section(
            root,
            "executor_api",
            "executor_api".into(),
            Some("EXECUTOR_API"),
        );
        let listen = self.string(&mut s, "listen");
        let tls = self.tls(&mut s);
        let present = s.table.is_some() || listen.is_some();
        let line = s.line;
        self.finish(s);
        if !present {
            return None;
        }
        if remote {
            self.error(
                line,
                "executor_api",
                "only for the embedded executor: a remote executor has no flows of its own to serve",
            );
            return None;
        }
        let Some((text, place)) = listen else {
            self.error(
                line,
                "executor_api.listen",
                "missing: an address like \"127.0.0.1:9443\"",
            );
            return None;
        };
        match text.parse::<SocketAddr>() {
            Ok(listen) => Some(ExecutorApiConfig { listen, tls }),
            Err(_) => {
                self.error_at(
                    &place,
                    format!("\"{text}\" is not an address like \"127.0.0.1:9443\""),
                );
                None
            }
        }
    }

    /// `[state]`: which backend keeps sessions and flows in progress.
    fn state(&mut self, root: &dyn TableLike) -> StateConfig {
        let mut s = self.section(root, "state", "state".into(), Some("STATE"));
        let store = self.choice(
            &mut s,
            "store",
            &[
                ("embedded", StoreKind::Embedded),
                ("memory", StoreKind::Memory),
                ("redis", StoreKind::Redis),
            ],
            StoreKind::Embedded,
        );
        let path = match self.string(&mut s, "path") {
            Some((path, place)) => {
                if path.is_empty() {
                    self.error_at(&place, "must not be empty");
                }
                resolve_against(self.path, Path::new(&path))
            }
            None => resolve_against(self.path, Path::new("flowgate.state")),
        };
        let redis_url = match self.string(&mut s, "redis_url") {
            Some((text, place)) => {
                if redis_scheme(&text).is_none() {
                    self.error_at(
                        &place,
                        "expected a URL like \"redis://127.0.0.1:6379/0\" or \"rediss://…\"",
                    );
                }
                Some((text, place))
            }
            None => None,
        };
        let redis_sentinels = match self.strings(&mut s, "redis_sentinels") {
            Some((items, place)) => {
                if items.is_empty() {
                    self.error_at(
                        &place,
                        "must name at least one sentinel, like \"redis://127.0.0.1:26379\"",
                    );
                }
                let mut schemes = Vec::new();
                for (text, at) in &items {
                    match redis_scheme(text) {
                        Some(scheme) => schemes.push(scheme),
                        None => self.error_at(
                            at,
                            "expected a sentinel's URL like \"redis://127.0.0.1:26379\" or \"rediss://…\"",
                        ),
                    }
                }
                if schemes.iter().any(|s| *s != schemes[0]) {
                    self.error_at(
                        &place,
                        "mixes redis:// and rediss://: the sentinels and the master are all spoken to with TLS or all without",
                    );
                }
                Some((items, place, schemes.first().copied()))
            }
            None => None,
        };
        let redis_master_name = self.string(&mut s, "redis_master_name");
        let redis_ca_file = match self.string(&mut s, "redis_ca_file") {
            Some((text, place)) => {
                let path = resolve_against(self.path, Path::new(&text));
                match crate::tls::ca_certificates(&path) {
                    Ok(_) => Some((path, place)),
                    Err(problem) => {
                        self.error_at(&place, problem);
                        None
                    }
                }
            }
            None => None,
        };
        let redis_prefix = self
            .string(&mut s, "redis_prefix")
            .map_or_else(|| "flowgate:".to_owned(), |(p, _)| p);
        match (&redis_url, &redis_sentinels) {
            (Some(_), Some((_, place, _))) => self.error_at(
                place,
                "state.redis_url and state.redis_sentinels both name where Redis is: set one of them",
            ),
            (None, None) if store == StoreKind::Redis => self.error(
                s.line,
                "state.redis_url",
                "missing: store = \"redis\" needs a URL like \"redis://127.0.0.1:6379/0\" \
                 (or state.redis_sentinels and state.redis_master_name)",
            ),
            _ => {}
        }
        // Where Redis is, for a store that is not Redis: a likely slip (the
        // replicas would each keep their own state, sharing nothing).
        if store != StoreKind::Redis {
            let named = redis_url
                .as_ref()
                .map(|(_, place)| place)
                .or(redis_sentinels.as_ref().map(|(_, place, _)| place));
            if let Some(place) = named {
                self.error_at(
                    place,
                    "only with store = \"redis\": with another store nothing is kept in Redis \
                     (set store = \"redis\", or remove this)",
                );
            }
        }
        match (&redis_sentinels, &redis_master_name) {
            (Some((_, place, _)), None) => {
                let line = place.line.or(s.line);
                self.error(
                    line,
                    "state.redis_master_name",
                    "missing: state.redis_sentinels needs the name of the master they watch \
                     (their `sentinel monitor <name> …`), like \"mymaster\"",
                );
            }
            (None, Some((_, place))) => self.error_at(
                place,
                "only with state.redis_sentinels: a redis_url names its server itself",
            ),
            (_, Some((name, place))) if name.is_empty() => {
                self.error_at(place, "must not be empty")
            }
            _ => {}
        }
        if let Some((_, place)) = &redis_ca_file {
            let tls = match (&redis_url, &redis_sentinels) {
                (Some((url, _)), _) => redis_scheme(url) == Some("rediss"),
                (None, Some((_, _, scheme))) => *scheme == Some("rediss"),
                (None, None) => false,
            };
            if !tls {
                self.error_at(
                    place,
                    "only for TLS: the Redis URLs (state.redis_url or state.redis_sentinels) \
                     are redis://, which no certificate is asked of; use rediss://",
                );
            }
        }
        self.finish(s);
        StateConfig {
            store,
            path,
            redis_url: redis_url.map(|(url, _)| url),
            redis_sentinels: redis_sentinels
                .map(|(items, _, _)| items.into_iter().map(|(url, _)| url).collect())
                .unwrap_or_default(),
            redis_master_name: redis_master_name.map(|(name, _)| name),
            redis_ca_file: redis_ca_file.map(|(path, _)| path),
            redis_prefix,
        }
    }

    fn admin(&mut self, root: &dyn TableLike) -> AdminConfig {
        let mut s = self.section(root, "admin", "admin".into(), Some("ADMIN"));
        let enabled = self.bool(&mut s, "enabled", true);
        let listen = match self.string(&mut s, "listen") {
            Some((text, place)) => text.parse::<SocketAddr>().unwrap_or_else(|_| {
                self.error_at(
                    &place,
                    format!("\"{text}\" is not an address like \"127.0.0.1:9090\""),
                );
                default_admin()
            }),
            None => default_admin(),
        };
        let token = match self.string(&mut s, "token_file") {
            Some((file, place)) => {
                let path = resolve_against(self.path, Path::new(&file));
                match std::fs::read(&path) {
                    Ok(mut bytes) => {
                        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                            bytes.pop();
                        }
                        if bytes.len() < 16 || !bytes.iter().all(|b| b.is_ascii_graphic()) {
                            self.error_at(&place, format!("{}: the token must be at least 16 visible ASCII characters (e.g. `openssl rand -hex 32`)", path.display()));
                            None
                        } else {
                            Some(Secret(bytes))
                        }
                    }
                    Err(e) => {
                        self.error_at(&place, format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
            None => None,
        };
        self.finish(s);
        AdminConfig {
            listen: enabled.then_some(listen),
            token,
        }
    }

    /// `tls = { cert, key }`, `tls = [{ … }, { … }]` or `[[server.tls]]`.
    fn tls(&mut self, server: &mut Section<'_>) -> Vec<TlsConfig> {
        server.known.push("tls");
        let key_path = format!("{}.tls", server.path);
        // A table, which no single variable can hold: say so rather than
        // ignore it.
        if server.path == "server" && (self.env)("FLOWGATE_SERVER_TLS").is_some() {
            self.errors.push(ConfigError {
                file: "env FLOWGATE_SERVER_TLS".into(),
                line: None,
                key: "server.tls".into(),
                message: "certificates are set in the config file only \
                          (server.tls = { cert = …, key = … })"
                    .into(),
            });
        }
        let Some((key, item)) = server.table.and_then(|t| t.get_key_value("tls")) else {
            return Vec::new();
        };
        let line = self.line_of(key.span());
        let tables = self.table_list(
            item,
            line,
            &key_path,
            true,
            "a table `{ cert = \"…\", key = \"…\" }`",
        );
        let many =
            tables.len() > 1 || item.as_array().is_some() || item.as_array_of_tables().is_some();
        let mut certificates = Vec::new();
        for (i, (table, line)) in tables.into_iter().enumerate() {
            let path = if many {
                format!("{key_path}[{i}]")
            } else {
                key_path.clone()
            };
            let mut t = self.table_section(table, path.clone(), line);
            let cert = self.existing_file(&mut t, "cert");
            let key = self.existing_file(&mut t, "key");
            self.finish(t);
            if let (Some(cert), Some(key)) = (cert, key) {
                let tls = TlsConfig { cert, key };
                match crate::tls::check(&tls) {
                    Ok(()) => certificates.push(tls),
                    Err(problem) => self.error(line, &path, problem.to_string()),
                }
            }
        }
        certificates
    }

    /// A required path to a readable file, resolved against the config's folder.
    fn existing_file(&mut self, section: &mut Section<'_>, key: &'static str) -> Option<PathBuf> {
        let Some((text, place)) = self.string(section, key) else {
            let path = format!("{}.{key}", section.path);
            if section.table.and_then(|t| t.get(key)).is_none() {
                self.error(section.line, &path, "missing: give the path of a PEM file");
            }
            return None;
        };
        let path = resolve_against(self.path, Path::new(&text));
        if let Err(e) = std::fs::File::open(&path) {
            self.error_at(&place, format!("cannot read {}: {e}", path.display()));
            return None;
        }
        Some(path)
    }

    fn session(&mut self, root: &dyn TableLike) -> SessionConfig {
        let mut s = self.section(root, "session", "session".into(), Some("SESSION"));
        let cookie_name = match self.string(&mut s, "cookie_name") {
            Some((name, place)) => {
                if name.is_empty() || !name.bytes().all(is_cookie_name_byte) {
                    self.error_at(
                        &place,
                        "not a valid cookie name (letters, digits and `!#$%&'*+-.^_`|~` only)",
                    );
                }
                name
            }
            None => "flowgate_session".to_owned(),
        };
        // One domain, or a list of them (SSO across subdomains of several
        // parents).
        let cookie_domains = match self.string_or_strings(&mut s, "cookie_domain") {
            Some(domains) => {
                let mut kept: Vec<String> = Vec::new();
                for (domain, place) in domains {
                    let bare = domain.trim_start_matches('.');
                    if bare.is_empty()
                        || !bare
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                    {
                        self.error_at(&place, format!("\"{domain}\" is not a domain name"));
                    } else if !bare.trim_end_matches('.').contains('.') {
                        self.error_at(
                            &place,
                            format!(
                                "\"{domain}\" is a top-level domain: browsers drop cookies for it; \
                                 name the domain your hosts share, like \"example.{bare}\""
                            ),
                        );
                    } else if bare.contains("..") || bare.ends_with('.') || bare.starts_with('-') {
                        self.error_at(&place, format!("\"{domain}\" is not a domain name"));
                    } else if kept
                        .iter()
                        .any(|k| k.trim_start_matches('.').eq_ignore_ascii_case(bare))
                    {
                        self.error_at(&place, format!("\"{domain}\" is listed twice"));
                    } else {
                        kept.push(domain);
                    }
                }
                kept
            }
            None => Vec::new(),
        };
        let cookie_secure = self.choice(
            &mut s,
            "cookie_secure",
            &[
                ("auto", CookieSecure::Auto),
                ("always", CookieSecure::Always),
                ("never", CookieSecure::Never),
            ],
            CookieSecure::Auto,
        );
        let lifetime = self.duration(&mut s, "lifetime", Duration::from_secs(12 * 3600), false);
        let idle_timeout =
            self.duration(&mut s, "idle_timeout", Duration::from_secs(2 * 3600), false);
        let secret = self.secret(&mut s);
        if let Some((_, place)) = self.get(&mut s, "store") {
            self.error_at(&place, "moved: the store is chosen by [state] store");
        }
        let pre_auth_ttl =
            self.duration(&mut s, "pre_auth_ttl", Duration::from_secs(15 * 60), false);
        let max_pre_auth = self.integer(&mut s, "max_pre_auth", 10_000, 1) as usize;
        let max_pre_auth_per_client =
            self.integer(&mut s, "max_pre_auth_per_client", 100, 1) as usize;
        let mut allowed_redirect_hosts = Vec::new();
        if let Some((items, _)) = self.strings(&mut s, "allowed_redirect_hosts") {
            for (host, place) in items {
                let bare = host.strip_prefix("*.").unwrap_or(&host);
                if bare.is_empty() || bare.contains(['/', ':', '*', ' ']) {
                    self.error_at(&place, format!("\"{host}\" is not a host name (like \"app.example.com\" or \"*.example.com\")"));
                } else {
                    allowed_redirect_hosts.push(host.to_ascii_lowercase());
                }
            }
        }
        self.finish(s);
        SessionConfig {
            cookie_name,
            cookie_domains,
            cookie_secure,
            lifetime,
            idle_timeout,
            secret,
            pre_auth_ttl,
            max_pre_auth,
            max_pre_auth_per_client,
            allowed_redirect_hosts,
        }
    }

    /// `secret_file` wins over `secret` (which `FLOWGATE_SESSION_SECRET`
    /// overrides). Secret values never appear in a message.
    fn secret(&mut self, s: &mut Section<'_>) -> Option<Secret> {
        let from_file = self.string(s, "secret_file");
        let inline = self.string(s, "secret");
        if let (Some((_, file_place)), Some((_, inline_place))) = (&from_file, &inline) {
            if file_place.env.is_none() && inline_place.env.is_none() {
                self.error_at(
                    inline_place,
                    "set either `secret_file` or `secret`, not both",
                );
                return None;
            }
        }
        let (bytes, place) = match (from_file, inline) {
            (Some((file, place)), _) => {
                let path = resolve_against(self.path, Path::new(&file));
                match std::fs::read(&path) {
                    Ok(mut bytes) => {
                        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                            bytes.pop();
                        }
                        (bytes, place)
                    }
                    Err(e) => {
                        self.error_at(&place, format!("cannot read {}: {e}", path.display()));
                        return None;
                    }
                }
            }
            (None, Some((secret, place))) => (secret.into_bytes(), place),
            (None, None) => return None,
        };
        if bytes.len() < MIN_SECRET_BYTES {
            self.error_at(
                &place,
                format!("the secret is {} bytes; use at least {MIN_SECRET_BYTES} (e.g. `openssl rand -base64 48`)", bytes.len()),
            );
            return None;
        }
        Some(Secret(bytes))
    }

    fn directory(&mut self, root: &dyn TableLike, remote: bool) -> DirectoryConfig {
        let mut s = self.section(root, "directory", "directory".into(), Some("DIRECTORY"));
        let (users_file, place) = match self.string(&mut s, "users_file") {
            Some((file, place)) => {
                if file.is_empty() {
                    self.error_at(&place, "must not be empty");
                }
                (resolve_against(self.path, Path::new(&file)), Some(place))
            }
            None => (resolve_against(self.path, Path::new("users.toml")), None),
        };
        // The users file is judged with the config: its problems (each
        // with its own file and line) are this config's problems.
        if self.files == Files::Read && !remote {
            match std::fs::read_to_string(&users_file) {
                Ok(text) => {
                    let file = users_file.display().to_string();
                    if let Err(problems) = crate::directory::FileDirectory::validate(&text, &file) {
                        self.errors.extend(problems.0);
                    }
                }
                Err(e) => {
                    let message =
                        format!("cannot read the users file {}: {e}", users_file.display());
                    match &place {
                        Some(place) => self.error_at(place, message),
                        None => self.error(s.line, "directory.users_file", message),
                    }
                }
            }
        }
        self.finish(s);
        DirectoryConfig { users_file }
    }

    fn executor(&mut self, root: &dyn TableLike) -> ExecutorConfig {
        let mut s = self.section(root, "executor", "executor".into(), Some("EXECUTOR"));
        let remote = self.choice(
            &mut s,
            "kind",
            &[("embedded", false), ("remote", true)],
            false,
        );
        const REMOTE_ONLY: [&str; 9] = [
            "url",
            "api_prefix",
            "ca_file",
            "client_cert",
            "client_key",
            "timeout",
            "outpost_token_file",
            "revalidate",
            "invalidation_flow",
        ];
        if !remote {
            for key in REMOTE_ONLY {
                if let Some((_, place)) = self.get(&mut s, key) {
                    self.error_at(&place, "only for executor.kind = \"remote\"");
                }
            }
            self.finish(s);
            return ExecutorConfig::Embedded;
        }
        let url = match self.string(&mut s, "url") {
            Some((text, place)) => self.remote_url(&text, &place),
            None => {
                self.error(
                    s.line,
                    "executor.url",
                    "missing: where the remote executor is, e.g. \"https://auth.example.com\"",
                );
                None
            }
        };
        let api_prefix = match self.string(&mut s, "api_prefix") {
            Some((prefix, place)) => {
                let trimmed = prefix.trim_end_matches('/').to_owned();
                if !trimmed.starts_with('/') || prefix_problem(&trimmed).is_err() {
                    self.error_at(&place, "expected a path like \"/api/v3\"");
                }
                trimmed
            }
            None => "/api/v3".to_owned(),
        };
        let ca_file = self.ca_file(&mut s);
        let client_cert = self.optional_file(&mut s, "client_cert");
        let client_key = self.optional_file(&mut s, "client_key");
        let client_auth = match (client_cert, client_key) {
            (Some(cert), Some(key)) => {
                let pair = TlsConfig { cert, key };
                if let Err(problem) = crate::tls::check(&pair) {
                    self.error(s.line, "executor.client_cert", problem.to_string());
                }
                Some(pair)
            }
            (None, None) => None,
            _ => {
                self.error(
                    s.line,
                    "executor.client_cert",
                    "client_cert and client_key go together",
                );
                None
            }
        };
        let timeout = self.duration(&mut s, "timeout", Duration::from_secs(10), false);
        let outpost_token = self
            .optional_file(&mut s, "outpost_token_file")
            .and_then(|path| match std::fs::read_to_string(&path) {
                Ok(token) if !token.trim().is_empty() => {
                    Some(Secret(token.trim().as_bytes().to_vec()))
                }
                Ok(_) => {
                    self.error(s.line, "executor.outpost_token_file", "the file is empty");
                    None
                }
                Err(e) => {
                    let message = format!("cannot read {}: {e}", path.display());
                    self.error(s.line, "executor.outpost_token_file", message);
                    None
                }
            });
        let revalidate = self.duration(&mut s, "revalidate", Duration::from_secs(300), false);
        let invalidation_flow = match self.string(&mut s, "invalidation_flow") {
            Some((slug, place)) => {
                if !is_slug(&slug) {
                    self.error_at(&place, "expected a flow slug (letters, digits, - and _)");
                }
                slug
            }
            None => DEFAULT_INVALIDATION_FLOW.to_owned(),
        };
        self.finish(s);
        // A bad or missing url is an error already; the rest of the config
        // is still judged as a remote executor's.
        let url = url.unwrap_or_else(|| http::Uri::from_static("http://invalid.invalid"));
        ExecutorConfig::Remote(Box::new(RemoteConfig {
            url,
            api_prefix,
            ca_file,
            client_auth,
            timeout,
            outpost_token,
            revalidate,
            invalidation_flow,
        }))
    }

    /// `executor.url`: `http(s)://host[:port]`, nothing else.
    fn remote_url(&mut self, text: &str, place: &Place) -> Option<http::Uri> {
        let uri: http::Uri = match text.parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.error_at(place, format!("\"{text}\" is not a URL: {e}"));
                return None;
            }
        };
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(authority)) if authority.as_str().contains('@') => {
                Some("credentials (`user:pw@`) do not belong in the URL")
            }
            (Some("http" | "https"), Some(_)) => None,
            _ => Some("expected http:// or https:// and a host"),
        };
        let problem = problem.or_else(|| {
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            (path_and_query != "/" || text.contains('#'))
                .then_some("only scheme and host (and port): set a path with executor.api_prefix")
        });
        if let Some(problem) = problem {
            self.error_at(place, problem);
            return None;
        }
        Some(uri)
    }

    /// An optional path to a readable file, resolved against the config's folder.
    /// `ca_file`: a PEM file with at least one certificate, read as the
    /// TLS client will read it.
    fn ca_file(&mut self, section: &mut Section<'_>) -> Option<PathBuf> {
        let (text, place) = self.string(section, "ca_file")?;
        let path = resolve_against(self.path, Path::new(&text));
        if let Err(problem) = crate::tls::ca_certificates(&path) {
            self.error_at(&place, problem);
            return None;
        }
        Some(path)
    }

    fn optional_file(&mut self, section: &mut Section<'_>, key: &'static str) -> Option<PathBuf> {
        let (text, place) = self.string(section, key)?;
        let path = resolve_against(self.path, Path::new(&text));
        match std::fs::File::open(&path) {
            Ok(_) => Some(path),
            Err(e) => {
                self.error_at(&place, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn log(&mut self, root: &dyn TableLike) -> LogConfig {
        let mut s = self.section(root, "log", "log".into(), Some("LOG"));
        let format = self.choice(
            &mut s,
            "format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            LogFormat::Text,
        );
        let level = match self.string(&mut s, "level") {
            Some((level, place)) => {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
                    self.error_at(
                        &place,
                        format!("not a log filter (like \"info\" or \"flowgate=debug\"): {e}"),
                    );
                }
                level
            }
            None => "info".to_owned(),
        };
        let access = self.bool(&mut s, "access", true);
        self.finish(s);
        LogConfig {
            format,
            level,
            access,
        }
    }

    /// `[stage.<name>]` tables, plus the built-in names. Each kind reads
    /// its own options (`engine::stage::KINDS`).
    fn stages(&mut self, root: &dyn TableLike) -> BTreeMap<String, StageConfig> {
        let mut stages = BTreeMap::new();
        for (name, _) in stage::BUILTINS {
            if let Some(stage) = StageConfig::builtin(name) {
                stages.insert((*name).to_owned(), stage);
            }
        }
        let read = self.kinded(
            root,
            "stage",
            stage::builtin_kind,
            |kind| stage::kind(kind).map(|k| (k.name, k.read)),
            stage::kind_names,
        );
        for (name, (kind, stage, line)) in read {
            stages.insert(name, StageConfig { kind, stage, line });
        }
        stages
    }

    /// `[policy.<name>]` tables (`engine::policy::KINDS`).
    fn policies(&mut self, root: &dyn TableLike) -> BTreeMap<String, PolicyConfig> {
        self.kinded(
            root,
            "policy",
            |_| None,
            |kind| policy::kind(kind).map(|k| (k.name, k.read)),
            policy::kind_names,
        )
        .into_iter()
        .map(|(name, (kind, policy, _))| (name, PolicyConfig { kind, policy }))
        .collect()
    }

    /// The `[<key>.<name>]` tables, each with a `kind` (or the kind
    /// `default_kind` gives its name) that `find` knows, read by that
    /// kind's reader; unknown options are named once the kind is known.
    fn kinded<T>(
        &mut self,
        root: &dyn TableLike,
        key: &'static str,
        default_kind: fn(&str) -> Option<&'static str>,
        find: FindKind<T>,
        names: fn() -> String,
    ) -> BTreeMap<String, (&'static str, T, Option<usize>)> {
        let mut read = BTreeMap::new();
        let all = self.section(root, key, key.into(), None);
        let Some(table) = all.table else {
            return read;
        };
        for (name, item) in table.iter() {
            let path = format!("{key}.{name}");
            let line = self
                .line_of(table.key(name).and_then(|k| k.span()))
                .or_else(|| self.line_of(item.span()));
            let Some(kind_table) = item.as_table_like() else {
                self.error(
                    line,
                    &path,
                    format!(
                        "expected a table `[{key}.{name}]` with `kind = …`, found {}",
                        type_name(item)
                    ),
                );
                continue;
            };
            if !is_slug(name) {
                self.error(
                    line,
                    &path,
                    format!("{key} names use lower-case letters, digits, `-` and `_`"),
                );
            }
            let mut s = self.table_section(kind_table, path.clone(), line);
            let kind = match self.string(&mut s, "kind") {
                Some((kind, place)) => Some((kind, Some(place))),
                // A table named after a built-in tunes it.
                None => default_kind(name).map(|k| (k.to_owned(), None)),
            };
            let Some((kind, place)) = kind else {
                self.error(line, &path, format!("missing `kind` ({})", names()));
                continue;
            };
            let Some((kind, reader)) = find(&kind) else {
                let message = format!(
                    "\"{kind}\" is not a {key} kind flowgate has; use {}",
                    names()
                );
                match &place {
                    Some(place) => self.error_at(place, message),
                    None => self.error(line, &path, message),
                }
                continue;
            };
            let mut options = Options {
                reader: self,
                section: s,
            };
            let value = reader(&mut options);
            let section = options.section;
            self.finish(section);
            read.insert(name.to_owned(), (kind, value, line));
        }
        read
    }

    /// `policies` and `policy_engine_mode` of a flow, a stage binding or a
    /// route: each entry a policy's name or `{ policy = "…", negate = true }`.
    fn bindings(
        &mut self,
        section: &mut Section<'_>,
        policies: &BTreeMap<String, PolicyConfig>,
    ) -> Bindings {
        let mode = self.choice(
            section,
            "policy_engine_mode",
            &[("any", PolicyMode::Any), ("all", PolicyMode::All)],
            PolicyMode::Any,
        );
        let list = self.policy_list(section, "policies", policies);
        Bindings { mode, list }
    }

    /// The policies named under `key`, each a name or `{ policy = "…",
    /// negate = true }`; a name without a `[policy.<name>]` is an error.
    fn policy_list(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        policies: &BTreeMap<String, PolicyConfig>,
    ) -> Vec<Binding> {
        let mut list = Vec::new();
        let Some((raw, place)) = self.get(section, key) else {
            return list;
        };
        let entries: Vec<(Option<String>, bool, Place)> = match raw {
            Raw::Env(text) => text
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| (Some(t.to_owned()), false, place.clone()))
                .collect(),
            Raw::Toml(item) => {
                let Some(array) = item.as_array() else {
                    self.error_at(
                        &place,
                        format!("expected a list of policy names, found {}", type_name(item)),
                    );
                    return list;
                };
                let mut entries = Vec::new();
                for (i, value) in array.iter().enumerate() {
                    let at = Place {
                        env: None,
                        line: self.line_of(value.span()).or(place.line),
                        key: format!("{}[{i}]", place.key),
                    };
                    if let Some(name) = value.as_str() {
                        entries.push((Some(name.to_owned()), false, at));
                    } else if let Some(table) = value.as_inline_table() {
                        let mut t = self.table_section(table, at.key.clone(), at.line);
                        let name = self.string(&mut t, "policy").map(|(n, _)| n);
                        if name.is_none() {
                            self.error_at(&at, "missing `policy`: the policy's name");
                        }
                        let negate = self.bool(&mut t, "negate", false);
                        self.finish(t);
                        entries.push((name, negate, at));
                    } else {
                        self.error_at(
                            &at,
                            format!(
                                "expected a policy name or {{ policy = …, negate = … }}, found {}",
                                value_type(value)
                            ),
                        );
                    }
                }
                entries
            }
        };
        for (name, negate, at) in entries {
            let Some(name) = name else { continue };
            match policies.get(&name) {
                Some(policy) => list.push(Binding {
                    name,
                    policy: policy.policy.clone(),
                    negate,
                }),
                None => {
                    let known: Vec<&str> = policies.keys().map(String::as_str).collect();
                    let message = match known.is_empty() {
                        true => format!("no policy \"{name}\": define `[policy.{name}]`"),
                        false => format!(
                            "no policy \"{name}\": define `[policy.{name}]` or use one of {}",
                            known.join(", ")
                        ),
                    };
                    self.error_at(&at, message);
                }
            }
        }
        list
    }

    fn flows(
        &mut self,
        root: &dyn TableLike,
        stages: &BTreeMap<String, StageConfig>,
        policies: &BTreeMap<String, PolicyConfig>,
    ) -> Vec<FlowConfig> {
        let mut flows: Vec<FlowConfig> = Vec::new();
        let Some((key, item)) = root.get_key_value("flow") else {
            return vec![
                FlowConfig {
                    slug: DEFAULT_FLOW.to_owned(),
                    title: "Sign in".to_owned(),
                    designation: Designation::Authentication,
                    authentication: FlowAuthentication::None,
                    policies: Bindings::default(),
                    denied_action: DeniedAction::MessageContinue,
                    stages: ["identification", "password", "mfa", "login"]
                        .map(StageBinding::plain)
                        .to_vec(),
                },
                // A signed-in user sets up a second factor, as at
                // authentik's slugs of the same names.
                FlowConfig {
                    slug: "default-authenticator-totp-setup".to_owned(),
                    title: "Set up an authenticator app".to_owned(),
                    designation: Designation::StageConfiguration,
                    authentication: FlowAuthentication::RequireAuthenticated,
                    policies: Bindings::default(),
                    denied_action: DeniedAction::Message,
                    stages: vec![StageBinding::plain("totp-setup")],
                },
                FlowConfig {
                    slug: "default-authenticator-static-setup".to_owned(),
                    title: "Make recovery codes".to_owned(),
                    designation: Designation::StageConfiguration,
                    authentication: FlowAuthentication::RequireAuthenticated,
                    policies: Bindings::default(),
                    denied_action: DeniedAction::Message,
                    stages: vec![StageBinding::plain("recovery-codes")],
                },
                // Run to its end, it signs the visitor out: what remote
                // flowgates (and authentik's clients) call at sign-out.
                FlowConfig {
                    slug: DEFAULT_INVALIDATION_FLOW.to_owned(),
                    title: "Sign out".to_owned(),
                    designation: Designation::Invalidation,
                    authentication: FlowAuthentication::None,
                    policies: Bindings::default(),
                    denied_action: DeniedAction::MessageContinue,
                    stages: Vec::new(),
                },
            ];
        };
        let Some(array) = item.as_array_of_tables() else {
            let line = self.line_of(key.span());
            self.error(
                line,
                "flow",
                format!("expected `[[flow]]` tables, found {}", type_name(item)),
            );
            return flows;
        };
        let mut seen = HashSet::new();
        for (i, table) in array.iter().enumerate() {
            let path = format!("flow[{i}]");
            let line = self.line_of(table.span());
            let mut s = self.table_section(table, path.clone(), line);
            let slug = match self.string(&mut s, "slug") {
                Some((slug, place)) => {
                    if !is_slug(&slug) {
                        self.error_at(&place, "slugs use lower-case letters, digits, `-` and `_`");
                    } else if !seen.insert(slug.clone()) {
                        self.error_at(
                            &place,
                            format!("another flow already has the slug \"{slug}\""),
                        );
                    }
                    slug
                }
                None => {
                    self.error(
                        line,
                        &format!("{path}.slug"),
                        "missing: every flow needs a slug",
                    );
                    String::new()
                }
            };
            let title = self
                .string(&mut s, "title")
                .map(|(t, _)| t)
                .unwrap_or_else(|| "Sign in".to_owned());
            let designation = match self.string(&mut s, "designation") {
                Some((text, place)) => Designation::parse(&text).unwrap_or_else(|| {
                    self.error_at(&place, format!("\"{text}\" is not a flow designation (authentication, authorization, invalidation, enrollment, recovery, stage_configuration, unenrollment)"));
                    Designation::Authentication
                }),
                None => Designation::Authentication,
            };
            let authentication = self.choice(
                &mut s,
                "authentication",
                &[
                    ("none", FlowAuthentication::None),
                    (
                        "require_authenticated",
                        FlowAuthentication::RequireAuthenticated,
                    ),
                    (
                        "require_unauthenticated",
                        FlowAuthentication::RequireUnauthenticated,
                    ),
                    ("require_superuser", FlowAuthentication::RequireSuperuser),
                ],
                FlowAuthentication::None,
            );
            let flow_policies = self.bindings(&mut s, policies);
            let denied_action = self.choice(
                &mut s,
                "denied_action",
                &[
                    ("message_continue", DeniedAction::MessageContinue),
                    ("message", DeniedAction::Message),
                    ("continue", DeniedAction::Continue),
                ],
                DeniedAction::MessageContinue,
            );
            let flow_stages = match self.get(&mut s, "stages") {
                Some((raw, place)) => {
                    let bound = self.stage_bindings(raw, &place, stages, policies);
                    // An invalidation flow may be nothing but its end.
                    if bound.is_empty() && designation != Designation::Invalidation {
                        self.error_at(&place, "a flow needs at least one stage");
                    }
                    bound
                }
                None => {
                    self.error(
                        line,
                        &format!("{path}.stages"),
                        "missing: list the stages, e.g. [\"identification\", \"password\", \"login\"]",
                    );
                    Vec::new()
                }
            };
            self.finish(s);
            flows.push(FlowConfig {
                slug,
                title,
                designation,
                authentication,
                policies: flow_policies,
                denied_action,
                stages: flow_stages,
            });
        }
        flows
    }

    /// A flow's `stages`: each a stage's name, or a table binding one
    /// (`{ stage = "mfa", policies = […], … }`).
    fn stage_bindings(
        &mut self,
        raw: Raw<'_>,
        place: &Place,
        stages: &BTreeMap<String, StageConfig>,
        policies: &BTreeMap<String, PolicyConfig>,
    ) -> Vec<StageBinding> {
        let mut bound = Vec::new();
        let entries: Vec<(Option<StageBinding>, Place)> = match raw {
            Raw::Env(_) => {
                self.error_at(place, "set in the file only");
                return bound;
            }
            Raw::Toml(item) => {
                let Some(array) = item.as_array() else {
                    self.error_at(
                        place,
                        format!("expected a list of stage names, found {}", type_name(item)),
                    );
                    return bound;
                };
                let mut entries = Vec::new();
                for (i, value) in array.iter().enumerate() {
                    let at = Place {
                        env: None,
                        line: self.line_of(value.span()).or(place.line),
                        key: format!("{}[{i}]", place.key),
                    };
                    if let Some(name) = value.as_str() {
                        entries.push((Some(StageBinding::plain(name)), at));
                    } else if let Some(table) = value.as_inline_table() {
                        let mut t = self.table_section(table, at.key.clone(), at.line);
                        let name = self.string(&mut t, "stage").map(|(n, _)| n);
                        if name.is_none() {
                            self.error_at(&at, "missing `stage`: the stage's name");
                        }
                        let binding = StageBinding {
                            stage: name.clone().unwrap_or_default(),
                            policies: self.bindings(&mut t, policies),
                            evaluate_on_plan: self.bool(&mut t, "evaluate_on_plan", false),
                            re_evaluate_policies: self.bool(&mut t, "re_evaluate_policies", true),
                            invalid_response_action: self.choice(
                                &mut t,
                                "invalid_response_action",
                                &[
                                    ("retry", InvalidResponseAction::Retry),
                                    ("restart", InvalidResponseAction::Restart),
                                    (
                                        "restart_with_context",
                                        InvalidResponseAction::RestartWithContext,
                                    ),
                                ],
                                InvalidResponseAction::Retry,
                            ),
                        };
                        if !binding.policies.is_empty()
                            && !binding.evaluate_on_plan
                            && !binding.re_evaluate_policies
                        {
                            self.error_at(
                                &at,
                                "its policies would never be evaluated: set `evaluate_on_plan` or `re_evaluate_policies`",
                            );
                        }
                        self.finish(t);
                        entries.push((name.map(|_| binding), at));
                    } else {
                        self.error_at(
                            &at,
                            format!(
                                "expected a stage name or {{ stage = …, policies = … }}, found {}",
                                value_type(value)
                            ),
                        );
                    }
                }
                entries
            }
        };
        for (binding, at) in entries {
            let Some(mut binding) = binding else { continue };
            if let Some((_, canonical)) = stage::ALIASES
                .iter()
                .find(|(alias, _)| *alias == binding.stage)
            {
                binding.stage = (*canonical).to_owned();
            }
            if stages.contains_key(&binding.stage) {
                bound.push(binding);
            } else {
                let name = &binding.stage;
                let known: Vec<&str> = stages.keys().map(String::as_str).collect();
                self.error_at(
                    &at,
                    format!(
                        "no stage \"{name}\": define `[stage.{name}]` or use one of {}",
                        known.join(", ")
                    ),
                );
            }
        }
        bound
    }

    fn routes(
        &mut self,
        root: &dyn TableLike,
        flows: Flows<'_>,
        proxy: &ProxyConfig,
        cookie_domains: &[String],
        policies: &BTreeMap<String, PolicyConfig>,
    ) -> Vec<RouteConfig> {
        let mut routes = Vec::new();
        let Some((key, item)) = root.get_key_value("route") else {
            self.error(
                None,
                "route",
                "nothing to protect: add a [[route]] with an `upstream`",
            );
            return routes;
        };
        let Some(array) = item.as_array_of_tables() else {
            let line = self.line_of(key.span());
            self.error(
                line,
                "route",
                format!("expected `[[route]]` tables, found {}", type_name(item)),
            );
            return routes;
        };
        let default_flow = match flows {
            Flows::Embedded(flows) => flows
                .iter()
                .find(|f| f.designation == Designation::Authentication)
                .map(|f| f.slug.clone()),
            Flows::Remote => Some(DEFAULT_FLOW.to_owned()),
        };
        let mut seen: Vec<(String, String, usize)> = Vec::new();
        for (i, table) in array.iter().enumerate() {
            let path = format!("route[{i}]");
            let line = self.line_of(table.span());
            let mut s = self.table_section(table, path.clone(), line);
            let host_entry = self.string(&mut s, "host");
            if let Some((host, place)) = &host_entry {
                if let Some(why) = outside_cookie_domains(host, cookie_domains) {
                    self.error_at(place, why);
                }
            }
            let host_text = host_entry.map(|(h, _)| h).unwrap_or_else(|| "*".to_owned());
            let host = HostPattern::parse(&host_text);
            let path_prefix = match self.string(&mut s, "path_prefix") {
                Some((prefix, place)) => {
                    if let Err(why) = prefix_problem(&prefix) {
                        self.error_at(&place, why);
                    }
                    // `/admin/` covers `/admin` too: many apps serve both alike.
                    match prefix.len() > 1 && prefix.ends_with('/') {
                        true => prefix.trim_end_matches('/').to_owned(),
                        false => prefix,
                    }
                }
                None => "/".to_owned(),
            };
            let upstream = match self.string(&mut s, "upstream") {
                Some((text, place)) => self.upstream(&text, &place),
                None => {
                    self.error(
                        line,
                        &format!("{path}.upstream"),
                        "missing: where to send requests, e.g. \"http://127.0.0.1:3000\"",
                    );
                    None
                }
            };
            let known_flow = |reader: &mut Self, slug: &str, place: &Place| match flows {
                Flows::Embedded(flows) if !flows.iter().any(|f| f.slug == slug) => {
                    let mut known: Vec<&str> = flows.iter().map(|f| f.slug.as_str()).collect();
                    known.dedup();
                    reader.error_at(
                        place,
                        format!("no flow \"{slug}\"; declared: {}", known.join(", ")),
                    );
                }
                // A route's flows let visitors in; this one sends them out.
                Flows::Embedded(flows)
                    if flows
                        .iter()
                        .any(|f| f.slug == slug && f.designation == Designation::Invalidation) =>
                {
                    reader.error_at(
                        place,
                        format!(
                            "\"{slug}\" is an invalidation flow: it signs visitors out, never in"
                        ),
                    );
                }
                Flows::Remote if !is_slug(slug) => {
                    reader.error_at(place, "expected the slug of one of the remote's flows")
                }
                _ => {}
            };
            let authorization_flow =
                self.string(&mut s, "authorization_flow")
                    .map(|(slug, place)| {
                        known_flow(self, &slug, &place);
                        slug
                    });
            let flow = match self.string(&mut s, "flow") {
                Some((slug, place)) => {
                    known_flow(self, &slug, &place);
                    slug
                }
                None => match &default_flow {
                    Some(slug) => slug.clone(),
                    None => {
                        self.error(
                            line,
                            &format!("{path}.flow"),
                            "missing, and no flow has designation \"authentication\"",
                        );
                        String::new()
                    }
                },
            };
            let case_insensitive = self.bool(&mut s, "case_insensitive", false);
            let skip_auth_preflight = self.bool(&mut s, "skip_auth_preflight", false);
            let authentik_application = match self.string(&mut s, "authentik_application") {
                Some((slug, place)) => {
                    if !matches!(flows, Flows::Remote) {
                        self.error_at(
                            &place,
                            "only with executor.kind = \"remote\" (an authentik)",
                        );
                    } else if !is_slug(&slug) {
                        self.error_at(&place, "expected an application slug");
                    }
                    Some(slug)
                }
                None => None,
            };
            let mut skip_auth = Vec::new();
            if let Some((items, _)) = self.strings(&mut s, "skip_auth") {
                for (pattern, place) in items {
                    let built = regex::RegexBuilder::new(&pattern)
                        .case_insensitive(case_insensitive)
                        .build();
                    match built {
                        Ok(re) => skip_auth.push(re),
                        Err(e) => self.error_at(
                            &place,
                            format!("not a valid regex: {}", one_line(&e.to_string())),
                        ),
                    }
                }
            }
            let allow = self.allow(&mut s);
            let route_policies = self.bindings(&mut s, policies);
            if route_policies.uses_reputation() {
                self.error(
                    line,
                    &format!("{path}.policies"),
                    "a reputation policy scores logins: bind it to a flow, not a route",
                );
            }
            let headers = self.header_set(&mut s);
            let preserve_host = self.bool(&mut s, "preserve_host", true);
            let escaped_slashes = self.path_rule(&mut s, "escaped_slashes", proxy.escaped_slashes);
            let path_parameters = self.path_rule(&mut s, "path_parameters", proxy.path_parameters);
            self.finish(s);

            // Found whether or not either route has other problems.
            let host_key = host_text.trim().to_ascii_lowercase();
            if let Some((_, _, first)) = seen
                .iter()
                .find(|(h, p, _)| *h == host_key && *p == path_prefix)
            {
                self.error(
                    line,
                    &path,
                    format!("same host and path_prefix as route[{first}]; it would never be used"),
                );
            }
            seen.push((host_key, path_prefix.clone(), i));
            if let Some(upstream) = upstream {
                routes.push(RouteConfig {
                    host,
                    path_prefix,
                    upstream,
                    flow,
                    skip_auth,
                    allow,
                    policies: route_policies,
                    authorization_flow,
                    headers,
                    preserve_host,
                    case_insensitive,
                    skip_auth_preflight,
                    escaped_slashes,
                    path_parameters,
                    authentik_application,
                });
            }
        }
        routes
    }

    fn upstream(&mut self, text: &str, place: &Place) -> Option<http::Uri> {
        let uri = match text.parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(e) => {
                self.error_at(place, format!("\"{text}\" is not a URL: {e}"));
                return None;
            }
        };
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            Some(other) => {
                self.error_at(
                    place,
                    format!("\"{other}://\" upstreams are not spoken to: use http:// or https://"),
                );
                return None;
            }
            None => {
                self.error_at(
                    place,
                    format!("\"{text}\" needs a scheme and host, like \"http://127.0.0.1:3000\""),
                );
                return None;
            }
        }
        let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
            self.error_at(place, format!("\"{text}\" has no host"));
            return None;
        };
        let mut wrong = Vec::new();
        if authority.as_str().contains('@') {
            wrong.push(
                "credentials (`user:pw@`) in an upstream URL are not sent, and would show in logs"
                    .to_owned(),
            );
        }
        let port_text = authority.as_str().rsplit_once(':').map(|(_, p)| p);
        if port_text
            .is_some_and(|p| !p.is_empty() && !p.contains(']') && authority.port_u16().is_none())
        {
            wrong.push("its port is not a number from 1 to 65535".to_owned());
        }
        if authority.port_u16() == Some(0) {
            wrong.push("its port is not a number from 1 to 65535".to_owned());
        }
        if text.contains('#') {
            wrong.push("a #fragment is never sent to a server: remove it".to_owned());
        }
        if uri.query().is_some() {
            wrong.push("an upstream URL cannot carry a query string".to_owned());
        }
        match crate::gate::Canonical::of(uri.path()) {
            Ok(canonical) if canonical.path == uri.path() => {}
            Ok(canonical) => wrong.push(format!(
                "its base path is sent as it is: write it as \"{}\"",
                canonical.path
            )),
            Err(malformed) => wrong.push(format!("its base path: {}", malformed.reason())),
        }
        if !wrong.is_empty() {
            for why in wrong {
                self.error_at(place, why);
            }
            return None;
        }
        Some(uri)
    }

    /// `headers`: a preset's name, or a table of the route's own names.
    fn header_set(&mut self, route: &mut Section<'_>) -> HeaderSet {
        let table = route
            .table
            .and_then(|t| t.get_key_value("headers"))
            .and_then(|(key, item)| Some((key, item.as_table_like()?)));
        let Some((key, table)) = table else {
            let preset = self.choice(
                route,
                "headers",
                &[
                    ("default", HeaderPreset::Default),
                    ("authentik", HeaderPreset::Authentik),
                    ("oauth2-proxy", HeaderPreset::OAuth2Proxy),
                    ("authelia", HeaderPreset::Authelia),
                ],
                HeaderPreset::Default,
            );
            return HeaderSet::preset(preset);
        };
        route.known.push("headers");
        let line = self.line_of(key.span());
        let path = format!("{}.headers", route.path);
        let mut s = self.table_section(table, path.clone(), line);
        let separator = self.choice(&mut s, "groups_separator", &[(",", ','), ("|", '|')], ',');
        let groups = match separator {
            '|' => Field::GroupsPipe,
            _ => Field::GroupsComma,
        };
        let mut fields = Vec::new();
        for (key, field) in [
            ("user", Field::Username),
            ("email", Field::Email),
            ("name", Field::Name),
            ("uid", Field::Uid),
            ("groups", groups),
        ] {
            let Some((name, place)) = self.string(&mut s, key) else {
                continue;
            };
            match custom_header_name(&name) {
                Ok(name) if fields.iter().any(|(taken, _)| *taken == name) => self.error_at(
                    &place,
                    format!("{name} is already another field's header: an app would read one as the other"),
                ),
                Ok(name) => fields.push((name, field)),
                Err(why) => self.error_at(&place, why),
            }
        }
        self.finish(s);
        if fields.is_empty() {
            self.error(
                line,
                &path,
                "names no header: give at least one of user, email, name, uid, groups",
            );
            return HeaderSet::default();
        }
        HeaderSet::custom(fields)
    }

    fn allow(&mut self, route: &mut Section<'_>) -> Allow {
        route.known.push("allow");
        let Some((key, item)) = route.table.and_then(|t| t.get_key_value("allow")) else {
            return Allow::default();
        };
        let line = self.line_of(key.span());
        let path = format!("{}.allow", route.path);
        let Some(table) = item.as_table_like() else {
            self.error(
                line,
                &path,
                format!(
                    "expected a table like {{ groups = [\"admins\"] }}, found {}",
                    type_name(item)
                ),
            );
            return Allow::default();
        };
        let mut s = self.table_section(table, path, line);
        let groups = self
            .strings(&mut s, "groups")
            .map(|(items, _)| items.into_iter().map(|(g, _)| g).collect())
            .unwrap_or_default();
        let users = self
            .strings(&mut s, "users")
            .map(|(items, _)| items.into_iter().map(|(u, _)| u).collect())
            .unwrap_or_default();
        self.finish(s);
        Allow { groups, users }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

fn line_starts(src: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(src.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => value_type(v),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::InlineTable(_) => "a table",
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("\"{text}\" is not a duration like \"90s\", \"15m\" or \"12h\" ({e})"))
}

fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The known key closest to a misspelt one, if close enough to suggest.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// A route's own identity header name: a valid field name, and none that
/// describes the connection or that flowgate writes itself.
fn custom_header_name(name: &str) -> Result<http::HeaderName, String> {
    let parsed = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("\"{name}\" is not a header name"))?;
    const TAKEN: [&str; 14] = [
        "host",
        "cookie",
        "connection",
        "content-length",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ];
    if TAKEN.contains(&parsed.as_str()) || parsed.as_str().starts_with("proxy-") {
        return Err(format!(
            "\"{name}\" is a header flowgate or HTTP itself sets: pick another name"
        ));
    }
    Ok(parsed)
}

/// Why a route for `host` cannot keep a session cookie set for `domain`
/// (`session.cookie_domain`), if it cannot: browsers drop a cookie whose
/// domain does not cover the host that sets it, and sign-in there would
/// never hold.
fn outside_cookie_domains(host: &str, domains: &[String]) -> Option<String> {
    if domains.is_empty() {
        return None;
    }
    let host = host.trim().to_ascii_lowercase();
    let name = match host.strip_prefix("*.") {
        Some(parent) => parent.to_owned(),
        None if host == "*" => return None,
        None => host.clone(),
    };
    let bare: Vec<String> = domains
        .iter()
        .map(|d| d.trim().trim_start_matches('.').to_ascii_lowercase())
        .collect();
    let covered = bare
        .iter()
        .any(|domain| name == *domain || name.ends_with(&format!(".{domain}")));
    (!covered).then(|| {
        let listed = bare.join(", ");
        format!(
            "session.cookie_domain is \"{listed}\": browsers drop that cookie on {host}, so \
             nobody could stay signed in there (use a host under it, add its parent to \
             cookie_domain, or name no cookie_domain)"
        )
    })
}

/// Why `prefix` could never match a request, if it could not: requests are
/// routed on their canonical path (`gate::Canonical`), so a prefix must be
/// one.
fn prefix_problem(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
        return Err("must be a path starting with `/` (no query)".into());
    }
    match crate::gate::Canonical::of(prefix) {
        Err(crate::gate::Malformed::Byte) => {
            let encoded = percent_encoding::utf8_percent_encode(prefix, percent_encoding::CONTROLS);
            Err(format!(
                "requests carry this path percent-encoded: write \"{encoded}\""
            ))
        }
        Err(malformed) => Err(format!("no request can match it: {}", malformed.reason())),
        Ok(canonical) if canonical.escaped_slash || canonical.parameters => Err(
            "requests are routed on their path without `;` parameters and refused with \
             `%2F`, `%5C` or `\\`: a prefix with them never matches"
                .into(),
        ),
        Ok(canonical) if canonical.path != prefix => Err(format!(
            "requests are matched on their canonical path: write \"{}\"",
            canonical.path
        )),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[route]]\nupstream = \"http://127.0.0.1:3000\"\n";

    fn read(src: &str) -> Result<Config, ConfigErrors> {
        from_str(src, Path::new("/etc/flowgate/flowgate.toml"), &|_| None)
    }

    fn errors(src: &str) -> Vec<ConfigError> {
        read(src).expect_err("config should be refused").0
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = read(MINIMAL).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.server.prefix, "/_flowgate");
        assert_eq!(config.session.cookie_name, "flowgate_session");
        assert_eq!(config.session.lifetime, Duration::from_secs(12 * 3600));
        assert_eq!(config.session.idle_timeout, Duration::from_secs(2 * 3600));
        assert_eq!(config.session.cookie_secure, CookieSecure::Auto);
        assert!(config.session.secret.is_none());
        assert_eq!(
            config.directory.users_file,
            PathBuf::from("/etc/flowgate/users.toml")
        );
        let slugs: Vec<&str> = config.flows.iter().map(|f| f.slug.as_str()).collect();
        assert_eq!(
            slugs,
            [
                DEFAULT_FLOW,
                "default-authenticator-totp-setup",
                "default-authenticator-static-setup",
                DEFAULT_INVALIDATION_FLOW
            ]
        );
        assert_eq!(config.routes[0].flow, DEFAULT_FLOW);
        assert_eq!(config.routes[0].host, HostPattern::Any);
        assert_eq!(config.routes[0].path_prefix, "/");
        assert!(config.routes[0].preserve_host);
    }

    #[test]
    fn every_error_is_reported_with_line_and_key() {
        let src = "\
[server]
listen = \"nowhere\"
prefix = \"no-slash\"

[session]
lifetime = \"forever\"
cookie_secure = \"sometimes\"

[[route]]
upstream = \"ftp://files\"
skip_auth = [\"(unclosed\"]
";
        let errors = errors(src);
        let found: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (Some(2), "server.listen"),
                (Some(3), "server.prefix"),
                (Some(6), "session.lifetime"),
                (Some(7), "session.cookie_secure"),
                (Some(10), "route[0].upstream"),
                (Some(11), "route[0].skip_auth[0]"),
            ],
            "{errors:#?}"
        );
        let shown = errors[0].to_string();
        assert!(
            shown.starts_with("/etc/flowgate/flowgate.toml:2: server.listen: "),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_a_suggestion() {
        let errors = errors(
            "[sesion]\nlifetime = \"1h\"\n\n[[route]]\nupstream = \"http://a:1\"\nskip_uath = []\n",
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!(
            (errors[0].line, errors[0].key.as_str()),
            (Some(1), "sesion")
        );
        assert!(
            errors[0].message.contains("session"),
            "{}",
            errors[0].message
        );
        assert_eq!(
            (errors[1].line, errors[1].key.as_str()),
            (Some(6), "route[0].skip_uath")
        );
        assert!(
            errors[1].message.contains("skip_auth"),
            "{}",
            errors[1].message
        );
    }

    #[test]
    fn a_toml_syntax_error_has_its_line() {
        let errors = errors("[server]\nlisten = \"127.0.0.1:1\"\nprefix = \n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(3));
        assert!(errors[0].message.starts_with("not valid TOML"));
        assert!(!errors[0].message.contains('\n'), "{}", errors[0].message);
    }

    #[test]
    fn nothing_to_protect_is_an_error() {
        let errors = errors("[server]\nlisten = \"127.0.0.1:9\"\n");
        assert_eq!(errors[0].key, "route");
        assert!(errors[0].message.contains("nothing to protect"));
    }

    #[test]
    fn environment_overrides_win_and_bad_ones_name_the_variable() {
        let env = |name: &str| match name {
            "FLOWGATE_SERVER_LISTEN" => Some("0.0.0.0:9000".to_owned()),
            "FLOWGATE_SESSION_IDLE_TIMEOUT" => Some("5m".to_owned()),
            "FLOWGATE_SESSION_TRUSTED" => Some("ignored".to_owned()),
            _ => None,
        };
        let config = from_str(MINIMAL, Path::new("f.toml"), &env).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.session.idle_timeout, Duration::from_secs(300));

        let env = |name: &str| (name == "FLOWGATE_SESSION_LIFETIME").then(|| "soon".to_owned());
        let errors = from_str(MINIMAL, Path::new("f.toml"), &env).unwrap_err().0;
        assert_eq!(errors[0].file, "env FLOWGATE_SESSION_LIFETIME");
        assert_eq!(errors[0].key, "session.lifetime");
    }

    #[test]
    fn secrets_are_checked_for_length_and_never_echoed() {
        let src = format!("[session]\nsecret = \"short-secret-value\"\n{MINIMAL}");
        let errors = errors(&src);
        assert_eq!(errors[0].key, "session.secret");
        assert!(!errors[0].to_string().contains("short-secret-value"));

        let env = |name: &str| (name == "FLOWGATE_SESSION_SECRET").then(|| "x".repeat(40));
        let config = from_str(MINIMAL, Path::new("f.toml"), &env).unwrap();
        assert_eq!(config.session.secret, Some(Secret(vec![b'x'; 40])));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), format!("{}\n", "y".repeat(48))).unwrap();
        let src = format!("[session]\nsecret_file = \"secret\"\n{MINIMAL}");
        let config = from_str(&src, &dir.path().join("flowgate.toml"), &|_| None).unwrap();
        assert_eq!(
            config.session.secret,
            Some(Secret(vec![b'y'; 48])),
            "trailing newline trimmed"
        );
    }

    #[test]
    fn flows_and_stages_are_cross_checked() {
        let src = "\
[stage.closed]
kind = \"deny\"
message = \"Closed\"

[stage.odd]
kind = \"captcha\"

[[flow]]
slug = \"main\"
stages = [\"identify\", \"password\", \"nope\"]

[[flow]]
slug = \"main\"
stages = [\"closed\"]

[[route]]
upstream = \"http://127.0.0.1:1\"
flow = \"missing\"
";
        let errors = errors(src);
        let found: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (Some(6), "stage.odd.kind"),
                (Some(10), "flow[0].stages[2]"),
                (Some(13), "flow[1].slug"),
                (Some(18), "route[0].flow"),
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn policies_and_their_bindings_are_cross_checked() {
        let src = "\
[policy.staff]
kind = \"group\"
groups = [\"staff\"]

[policy.office]
kind = \"network\"
cidrs = [\"10.0.0.0/8\", \"not-a-net\"]

[policy.scores]
kind = \"reputation\"

[policy.odd]
kind = \"astrology\"

[stage.profile]
kind = \"prompt\"

[[stage.profile.field]]
key = \"age\"
type = \"numbre\"

[[flow]]
slug = \"main\"
policies = [\"staff\", { policy = \"nobody\" }]
stages = [\"identification\", { stage = \"deny\", policies = [\"office\"], colour = 1 }, \"profile\"]

[stage.elsewhere]
kind = \"redirect\"
flow = \"nowhere\"

[[route]]
upstream = \"http://127.0.0.1:1\"
policies = [\"scores\"]
";
        let errors = errors(src);
        let found: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (Some(7), "policy.office.cidrs[1]"),
                (Some(13), "policy.odd.kind"),
                (Some(20), "stage.profile.field[0].type"),
                (Some(24), "flow[0].policies[1]"),
                (Some(25), "flow[0].stages[1].colour"),
                (Some(27), "stage.elsewhere.flow"),
                (Some(31), "route[0].policies"),
            ],
            "{errors:#?}"
        );
        assert!(
            errors[3].message.contains("no policy \"nobody\""),
            "{errors:#?}"
        );
        assert!(
            errors[6].message.contains("bind it to a flow"),
            "{errors:#?}"
        );
    }

    #[test]
    fn an_expression_with_a_mistake_is_reported_at_its_own_line() {
        let src = "\
[policy.odd]
kind = \"expression\"
expression = '''
\"admins\" in user.groups
  && request.path.startsWith(\"/x\"))
'''

[policy.unknown-name]
kind = \"expression\"
expression = 'usr.username == \"alice\"'

[[route]]
upstream = \"http://127.0.0.1:1\"
policies = [\"odd\", \"unknown-name\"]
";
        let errors = errors(src);
        let found: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (Some(5), "policy.odd.expression"),
                (Some(10), "policy.unknown-name.expression"),
            ],
            "{errors:#?}"
        );
        assert!(errors[1].message.contains("usr"), "{errors:#?}");
    }

    #[test]
    fn stage_tables_configure_stages() {
        let src = "\
[stage.identification]
password = true
user_fields = [\"email\"]

[stage.remember]
kind = \"user_login\"
remember_me_offset = \"30d\"

[[flow]]
slug = \"one-form\"
stages = [\"identification\", \"remember\"]

[[route]]
upstream = \"http://127.0.0.1:1/base\"
";
        let config = read(src).unwrap();
        assert_eq!(
            format!("{:?}", config.stages["identification"]),
            "Identification { user_fields: [Email], password: true, pretend_user_exists: true, enable_remember_me: false }"
        );
        assert_eq!(config.stages["remember"].kind, "user_login");
        assert_eq!(
            format!("{:?}", config.stages["remember"]),
            format!(
                "UserLogin {{ remember_me_offset: {:?} }}",
                Duration::from_secs(30 * 86400)
            )
        );
        assert_eq!(config.routes[0].flow, "one-form");
        assert_eq!(config.routes[0].upstream.path(), "/base");
    }

    #[test]
    fn duplicate_routes_and_odd_upstreams_are_refused() {
        let src = "[[route]]\nupstream = \"https://a.example\"\n\n[[route]]\nupstream = \"ftp://b:1\"\n\n[[route]]\nupstream = \"https://a.example/other\"\n";
        let errors = errors(src);
        // The duplicate with a broken upstream is a duplicate all the same.
        let found: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            [
                (Some(4), "route[1]"),
                (Some(5), "route[1].upstream"),
                (Some(7), "route[2]")
            ],
            "{errors:#?}"
        );
        assert!(errors[2]
            .message
            .contains("same host and path_prefix as route[0]"));
    }

    #[test]
    fn path_prefixes_are_canonical_paths_a_request_can_match() {
        assert_eq!(prefix_problem("/admin"), Ok(()));
        assert_eq!(prefix_problem("/admin/"), Ok(()));
        assert_eq!(prefix_problem("/caf%C3%A9"), Ok(()));
        let said = |p: &str| prefix_problem(p).unwrap_err();
        assert!(
            said("/caf\u{e9}").contains("\"/caf%C3%A9\""),
            "{}",
            said("/caf\u{e9}")
        );
        assert!(said("/caf%c3%a9").contains("\"/caf%C3%A9\""));
        assert!(said("/a//b").contains("\"/a/b\""));
        assert!(said("/a/../b").contains("\"/b\""));
        assert!(said("/%61dmin").contains("\"/admin\""));
        assert!(said("/a%zz").contains("broken"));
        assert!(said("/a;b").contains("never matches"));
        assert!(said("/a%2Fb").contains("never matches"));
        assert!(said("admin").contains("starting with"));
    }

    #[test]
    fn a_trailing_slash_on_a_prefix_covers_the_bare_path() {
        let config = from_str(
            "[session]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
             [[route]]\npath_prefix = \"/admin/\"\nupstream = \"http://127.0.0.1:1\"\n",
            Path::new("/tmp/flowgate.toml"),
            &|_| None,
        );
        let config = match config {
            Ok(config) => config,
            Err(errors) => panic!("{errors}"),
        };
        assert_eq!(config.routes[0].path_prefix, "/admin");
    }

    #[test]
    fn a_route_names_its_identity_headers_by_preset_or_its_own() {
        let route = |headers: &str| {
            format!(
                "[session]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
                 [[route]]\nupstream = \"http://127.0.0.1:1\"\nheaders = {headers}\n"
            )
        };
        let read = |text: &str| from_str(text, Path::new("/tmp/flowgate.toml"), &|_| None);
        let config = read(&route("\"authelia\"")).unwrap();
        let names: Vec<&str> = config.routes[0]
            .headers
            .fields()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "remote-user",
                "remote-groups",
                "remote-email",
                "remote-name"
            ]
        );
        let config = read(&route(
            "{ user = \"X-WEBAUTH-USER\", groups = \"X-Roles\" }",
        ))
        .unwrap();
        let own = config.routes[0].headers.own_names();
        assert_eq!(own.len(), 2);
        assert_eq!(own[0].0.as_str(), "x-webauth-user");
        for (bad, says) in [
            ("{ user = \"Cookie\" }", "flowgate or HTTP itself sets"),
            ("{ user = \"X Bad\" }", "not a header name"),
            (
                "{ groups_separator = \";\" , user = \"X-U\" }",
                "is not one of",
            ),
            ("{}", "names no header"),
            ("{ usr = \"X-U\" }", "usr"),
            ("\"nginx\"", "is not one of"),
        ] {
            let errors = read(&route(bad)).unwrap_err().to_string();
            assert!(errors.contains(says), "{bad}: {errors}");
            assert!(errors.contains("route[0].headers"), "{bad}: {errors}");
        }
    }

    #[test]
    fn a_redirect_listener_needs_tls() {
        let text = "[server]\nredirect_http = \"0.0.0.0:80\"\n\
                    [session]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
                    [[route]]\nupstream = \"http://127.0.0.1:1\"\n";
        let errors = from_str(text, Path::new("/tmp/flowgate.toml"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(errors.contains("server.redirect_http"), "{errors}");
        assert!(errors.contains("set server.tls too"), "{errors}");
    }

    #[test]
    fn check_finds_what_serve_would_trip_over_in_routes() {
        let text = "[session]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
                    cookie_domain = \".home.test\"\n\
                    [[route]]\nhost = \"app.home.test\"\nupstream = \"http://user:pw@127.0.0.1:1\"\n\
                    [[route]]\nhost = \"app.home.test\"\nupstream = \"http://127.0.0.1:99999/x#y\"\n\
                    [[route]]\nhost = \"elsewhere.test\"\nupstream = \"ftp://127.0.0.1/\"\n\
                    [[route]]\nhost = \"*.home.test\"\nupstream = \"http://127.0.0.1:1/a/../b\"\n";
        let errors = from_str(text, Path::new("/tmp/flowgate.toml"), &|_| None)
            .unwrap_err()
            .to_string();
        for expected in [
            "route[0].upstream: credentials",
            "route[1].upstream: its port is not a number",
            "route[1].upstream: a #fragment",
            "route[1]: same host and path_prefix as route[0]",
            "route[2].upstream: \"ftp://\" upstreams are not spoken to",
            "route[2].host: session.cookie_domain is \"home.test\"",
            "route[3].upstream: its base path is sent as it is: write it as \"/b\"",
        ] {
            assert!(errors.contains(expected), "{expected}:\n{errors}");
        }
        assert!(!errors.contains("route[3].host"), "{errors}");
    }

    #[test]
    fn a_redis_address_without_the_redis_store_is_refused() {
        for line in [
            "redis_url = \"redis://127.0.0.1:6379/0\"",
            "redis_sentinels = [\"redis://127.0.0.1:26379\"]\nredis_master_name = \"m\"",
        ] {
            let text = format!("[state]\nstore = \"embedded\"\n{line}\n\n[[route]]\nupstream = \"http://127.0.0.1:1\"\n");
            let errors = from_str(&text, Path::new("/tmp/flowgate.toml"), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(errors.contains("flowgate.toml:3: state.redis_"), "{errors}");
            assert!(errors.contains("only with store = \"redis\""), "{errors}");
        }
    }

    #[test]
    fn cookie_domain_may_list_several_parents() {
        let text = "[session]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
                    cookie_domain = [\".home.test\", \"corp.example\", \"a.corp.example\"]\n\
                    [[route]]\nhost = \"app.home.test\"\nupstream = \"http://127.0.0.1:1\"\n\
                    [[route]]\nhost = \"*.corp.example\"\nupstream = \"http://127.0.0.1:2\"\n";
        let config = from_str(text, Path::new("/tmp/flowgate.toml"), &|_| None).unwrap();
        assert_eq!(
            config.session.cookie_domains,
            [".home.test", "corp.example", "a.corp.example"]
        );
        let errors = from_str(
            &text
                .replace("\"a.corp.example\"]", "\"a b\", \"HOME.test\"]")
                .replace("app.home.test", "app.other.test"),
            Path::new("/tmp/flowgate.toml"),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        let bad = |domain: &str| {
            from_str(
                &text.replace("\"a.corp.example\"", &format!("\"{domain}\"")),
                Path::new("/tmp/flowgate.toml"),
                &|_| None,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(
            bad(".com").contains("\".com\" is a top-level domain"),
            "{}",
            bad(".com")
        );
        assert!(bad("a..corp.example").contains("is not a domain name"));
        for expected in [
            "session.cookie_domain[2]: \"a b\" is not a domain name",
            "session.cookie_domain[3]: \"HOME.test\" is listed twice",
            "route[0].host: session.cookie_domain is \"home.test, corp.example\"",
        ] {
            assert!(errors.contains(expected), "{expected}:\n{errors}");
        }
        // From the environment: comma-separated.
        let env = |name: &str| {
            (name == "FLOWGATE_SESSION_COOKIE_DOMAIN").then(|| "home.test, corp.example".to_owned())
        };
        let config = from_str(text, Path::new("/tmp/flowgate.toml"), &env).unwrap();
        assert_eq!(config.session.cookie_domains, ["home.test", "corp.example"]);
    }

    #[test]
    fn remote_only_keys_are_refused_with_the_embedded_executor_and_back() {
        let embedded = errors(
            "[[route]]\nupstream = \"http://127.0.0.1:9\"\nauthentik_application = \"wiki\"\n\n\
             [executor]\nrevalidate = \"1m\"\n",
        );
        let text: Vec<String> = embedded
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with("route[0].authentik_application: only with")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.starts_with("executor.revalidate: only for")),
            "{text:?}"
        );
        let remote = errors(
            "[executor]\nkind = \"remote\"\nurl = \"https://auth.test/path\"\n\n\
             [[flow]]\nslug = \"x\"\nstages = [\"password\"]\n\n\
             [[route]]\nupstream = \"http://127.0.0.1:9\"\n",
        );
        let text: Vec<String> = remote
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with("executor.url: only scheme and host")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.starts_with("flow: only for the embedded executor")),
            "{text:?}"
        );
    }

    #[test]
    fn tls_from_the_environment_is_refused_not_ignored() {
        let text = "[session]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
                    [[route]]\nupstream = \"http://127.0.0.1:1\"\n";
        let env = |var: &str| (var == "FLOWGATE_SERVER_TLS").then(|| "cert.pem".to_owned());
        let errors = from_str(text, Path::new("/tmp/flowgate.toml"), &env)
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains(
                "env FLOWGATE_SERVER_TLS: server.tls: certificates are set in the config file only"
            ),
            "{errors}"
        );
    }

    #[test]
    fn redis_sentinels_and_a_ca_file_are_read_and_cross_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("redis-ca.pem"), ca.pem()).unwrap();
        let path = dir.path().join("flowgate.toml");
        let read = |state: &str, env: &dyn Fn(&str) -> Option<String>| {
            let text = format!("{MINIMAL}\n[state]\nstore = \"redis\"\n{state}");
            from_str(&text, &path, env)
        };
        let none = |_: &str| None;
        let config = read(
            "redis_sentinels = [\"rediss://10.0.0.1:26379\", \"rediss://10.0.0.2:26379\"]\n\
             redis_master_name = \"mymaster\"\nredis_ca_file = \"redis-ca.pem\"\n",
            &none,
        )
        .unwrap();
        assert_eq!(config.state.redis_url, None);
        assert_eq!(
            config.state.redis_sentinels,
            ["rediss://10.0.0.1:26379", "rediss://10.0.0.2:26379"]
        );
        assert_eq!(config.state.redis_master_name.as_deref(), Some("mymaster"));
        assert_eq!(
            config.state.redis_ca_file,
            Some(dir.path().join("redis-ca.pem"))
        );
        // From the environment, a comma-separated list, like every list.
        let env = |var: &str| {
            (var == "FLOWGATE_STATE_REDIS_SENTINELS")
                .then(|| "redis://10.0.0.3:26379, redis://10.0.0.4:26379".to_owned())
        };
        let config = read("redis_master_name = \"m\"\n", &env).unwrap();
        assert_eq!(
            config.state.redis_sentinels,
            ["redis://10.0.0.3:26379", "redis://10.0.0.4:26379"]
        );
        let refused = |state: &str| -> Vec<(Option<usize>, String, String)> {
            read(state, &none)
                .expect_err("should be refused")
                .0
                .into_iter()
                .map(|e| (e.line, e.key, e.message))
                .collect()
        };
        // Lines: MINIMAL is 1-2, a blank line, `[state]` 4, `store` 5.
        let both = refused(
            "redis_url = \"redis://10.0.0.1:6379/0\"\nredis_sentinels = [\"redis://10.0.0.1:26379\"]\n\
             redis_master_name = \"mymaster\"\n",
        );
        assert_eq!(both.len(), 1, "{both:?}");
        assert_eq!(
            (both[0].0, both[0].1.as_str()),
            (Some(7), "state.redis_sentinels")
        );
        assert!(
            both[0].2.contains("state.redis_url") && both[0].2.contains("state.redis_sentinels"),
            "{both:?}"
        );
        let nameless = refused("redis_sentinels = [\"redis://10.0.0.1:26379\"]\n");
        assert_eq!(nameless.len(), 1, "{nameless:?}");
        assert_eq!(
            (nameless[0].0, nameless[0].1.as_str()),
            (Some(6), "state.redis_master_name")
        );
        assert!(nameless[0].2.starts_with("missing"), "{nameless:?}");
        let alone = refused("redis_url = \"redis://10.0.0.1:6379/0\"\nredis_master_name = \"m\"\n");
        assert_eq!(
            (alone[0].0, alone[0].1.as_str()),
            (Some(7), "state.redis_master_name")
        );
        assert!(alone[0].2.contains("redis_sentinels"), "{alone:?}");
        let odd = refused(
            "redis_sentinels = [\n  \"redis://10.0.0.1:26379\",\n  \"http://10.0.0.2:26379\",\n]\n\
             redis_master_name = \"m\"\n",
        );
        assert_eq!(
            odd.iter().map(|e| (e.0, e.1.as_str())).collect::<Vec<_>>(),
            [(Some(8), "state.redis_sentinels[1]")],
            "{odd:?}"
        );
        let mixed = refused(
            "redis_sentinels = [\"redis://10.0.0.1:26379\", \"rediss://10.0.0.2:26379\"]\n\
             redis_master_name = \"m\"\n",
        );
        assert_eq!(
            (mixed[0].0, mixed[0].1.as_str()),
            (Some(6), "state.redis_sentinels")
        );
        assert!(mixed[0].2.contains("mixes"), "{mixed:?}");
        let empty = refused("redis_sentinels = []\nredis_master_name = \"m\"\n");
        assert!(empty[0].2.contains("at least one"), "{empty:?}");
        // A CA file for a Redis spoken to without TLS would do nothing.
        let plain =
            refused("redis_url = \"redis://10.0.0.1:6379/0\"\nredis_ca_file = \"redis-ca.pem\"\n");
        assert_eq!(
            (plain[0].0, plain[0].1.as_str()),
            (Some(7), "state.redis_ca_file")
        );
        assert!(plain[0].2.contains("rediss://"), "{plain:?}");
        let missing =
            refused("redis_url = \"rediss://10.0.0.1:6379/0\"\nredis_ca_file = \"nowhere.pem\"\n");
        assert_eq!(
            (missing[0].0, missing[0].1.as_str()),
            (Some(7), "state.redis_ca_file")
        );
        assert!(missing[0].2.contains("nowhere.pem"), "{missing:?}");
        // Neither: the URL is missing, and the sentinels are named as the other way.
        let neither = refused("");
        assert_eq!(neither[0].1, "state.redis_url");
        assert!(neither[0].2.contains("redis_sentinels"), "{neither:?}");
    }
}
