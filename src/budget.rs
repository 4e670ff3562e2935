//! The timeout budget: for each route, the chain of limits a slow request meets —
//! the browser, the proxy's timers, Gunicorn's worker timeout — and where a link would
//! cut the request before the proxy's own `response_header` timer can answer with a
//! clear 504.
//!
//! Gunicorn's side is read from its systemd unit (`ExecStart` with `--timeout`, its
//! `Environment=` and the `EnvironmentFile=` it names, drop-ins included), so the
//! warning can name the exact line to change: `GUNICORN_TIMEOUT=3660` in GeoNature's
//! `environ` file, or the route's `timeouts.response_header` in the proxy's file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Config, Serve, Timer, UpstreamAddress};
use crate::route::RouteTable;

/// Gunicorn's own default `--timeout`, and GeoNature's `GUNICORN_TIMEOUT` default.
pub const GUNICORN_DEFAULT_TIMEOUT: u64 = 30;
/// How much longer than the proxy's timer Gunicorn's should be: the worker's clock
/// also runs while the request body is read.
pub const MARGIN: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: no ExecStart= in [Service]")]
    NoExecStart(String),
}

/// Where Gunicorn's timeout was found, so the fix can name the line to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeoutSource {
    /// `--gunicorn-timeout` on the command line.
    Flag,
    /// `VAR=value` in an `EnvironmentFile=` (GeoNature's `BASE_DIR/environ`).
    EnvironmentFile {
        var: String,
        path: PathBuf,
        line: usize,
    },
    /// `Environment=VAR=value` in the unit or a drop-in.
    UnitEnvironment {
        var: String,
        unit: PathBuf,
        line: usize,
        env_file: Option<PathBuf>,
    },
    /// `${VAR}` in `ExecStart` with `VAR` set nowhere: GeoNature's default applies.
    VariableUnset {
        var: String,
        unit: PathBuf,
        env_file: Option<PathBuf>,
    },
    /// A number written in `ExecStart`.
    Literal { unit: PathBuf, line: usize },
    /// No `--timeout` at all: Gunicorn's default.
    GunicornDefault { unit: PathBuf, line: usize },
}

/// What the proxy knows of the Gunicorn behind it.
#[derive(Debug, Clone)]
pub struct Gunicorn {
    /// `None`: `--timeout 0`, no limit.
    pub timeout: Option<Duration>,
    pub source: TimeoutSource,
    /// `--bind`, to tell which upstream is this Gunicorn.
    pub bind: Option<String>,
    /// The unit's name for `systemctl restart` (`geonature`).
    pub service: Option<String>,
    /// Things worth knowing about how the values were read.
    pub notes: Vec<String>,
}

impl Gunicorn {
    /// Only a timeout, from the command line.
    pub fn from_timeout(secs: u64) -> Gunicorn {
        Gunicorn {
            timeout: (secs > 0).then(|| Duration::from_secs(secs)),
            source: TimeoutSource::Flag,
            bind: None,
            service: None,
            notes: Vec::new(),
        }
    }

    /// The sentence that tells where the timeout comes from.
    pub fn describe(&self) -> String {
        let secs = self.timeout.map_or(0, |t| t.as_secs());
        let none = if secs == 0 { " (no timeout)" } else { "" };
        match &self.source {
            TimeoutSource::Flag => {
                format!("--timeout {secs}{none} (given with --gunicorn-timeout)")
            }
            TimeoutSource::EnvironmentFile { var, path, line } => {
                format!("{var}={secs}{none} in {}:{line}", path.display())
            }
            TimeoutSource::UnitEnvironment {
                var, unit, line, ..
            } => format!(
                "Environment={var}={secs}{none} in {}:{line}",
                unit.display()
            ),
            TimeoutSource::VariableUnset { var, .. } => {
                format!("{var} is set nowhere: {secs} s, GeoNature's default")
            }
            TimeoutSource::Literal { unit, line } => {
                format!(
                    "--timeout={secs}{none} in ExecStart at {}:{line}",
                    unit.display()
                )
            }
            TimeoutSource::GunicornDefault { unit, line } => format!(
                "no --timeout in ExecStart at {}:{line}: Gunicorn's default {secs} s",
                unit.display()
            ),
        }
    }

    /// The exact change that makes Gunicorn wait `secs`.
    pub fn fix(&self, secs: u64) -> String {
        let restart = match &self.service {
            Some(s) => format!("systemctl restart {s}"),
            None => "restart Gunicorn".into(),
        };
        let reload_restart = match &self.service {
            Some(s) => format!("systemctl daemon-reload && systemctl restart {s}"),
            None => "restart Gunicorn".into(),
        };
        match &self.source {
            TimeoutSource::Flag => format!("start Gunicorn with --timeout={secs} (then check again with --gunicorn-timeout {secs})"),
            TimeoutSource::EnvironmentFile { var, path, line } => format!(
                "{var}={secs} in {} (line {line}), then `{restart}`",
                path.display()
            ),
            TimeoutSource::UnitEnvironment {
                var,
                unit,
                line,
                env_file: Some(env),
            } => format!(
                "add {var}={secs} to {} (the unit's EnvironmentFile; it overrides Environment={var} at {}:{line}), then `{restart}`",
                env.display(),
                unit.display()
            ),
            TimeoutSource::UnitEnvironment {
                var, unit, line, ..
            } => format!(
                "Environment={var}={secs} at {}:{line} (or in `systemctl edit`), then `{reload_restart}`",
                unit.display()
            ),
            TimeoutSource::VariableUnset {
                var,
                env_file: Some(env),
                ..
            } => format!("add {var}={secs} to {}, then `{restart}`", env.display()),
            TimeoutSource::VariableUnset { var, unit, .. } => format!(
                "add Environment={var}={secs} to [Service] in {}, then `{reload_restart}`",
                unit.display()
            ),
            TimeoutSource::Literal { unit, line } => format!(
                "--timeout={secs} in ExecStart at {}:{line}, then `{reload_restart}`",
                unit.display()
            ),
            TimeoutSource::GunicornDefault { unit, line } => format!(
                "add --timeout={secs} to ExecStart at {}:{line}, then `{reload_restart}`",
                unit.display()
            ),
        }
    }
}

/// A value and where it was set.
#[derive(Debug, Clone)]
enum Origin {
    Unit(PathBuf, usize),
    File(PathBuf, usize),
}

/// Reads Gunicorn's timeout and bind address from its systemd unit, the unit's drop-ins
/// (`NAME.service.d/*.conf`) and the environment files they name.
pub fn read_unit(path: &Path) -> Result<Gunicorn, BudgetError> {
    let mut files = vec![path.to_path_buf()];
    let dropins = PathBuf::from(format!("{}.d", path.display()));
    if let Ok(entries) = std::fs::read_dir(&dropins) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    let mut notes = Vec::new();
    let mut env: HashMap<String, (String, Origin)> = HashMap::new();
    let mut env_files: Vec<(PathBuf, bool)> = Vec::new();
    let mut exec: Option<(String, PathBuf, usize)> = None;
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| BudgetError::Read {
            path: file.display().to_string(),
            source,
        })?;
        for (line, key, value) in unit_entries(&text, "Service") {
            match key.as_str() {
                "Environment" => {
                    for word in split_words(&value) {
                        if let Some((k, v)) = word.split_once('=') {
                            env.insert(
                                k.to_string(),
                                (v.to_string(), Origin::Unit(file.clone(), line)),
                            );
                        }
                    }
                }
                "EnvironmentFile" if value.is_empty() => env_files.clear(),
                "EnvironmentFile" => {
                    let optional = value.starts_with('-');
                    env_files.push((PathBuf::from(value.trim_start_matches('-')), optional));
                }
                "ExecStart" if value.is_empty() => exec = None,
                "ExecStart" => exec = Some((value, file.clone(), line)),
                _ => {}
            }
        }
    }
    // EnvironmentFile= overrides Environment=, whatever their order.
    let mut main_env_file = None;
    for (file, optional) in &env_files {
        match std::fs::read_to_string(file) {
            Ok(text) => {
                main_env_file.get_or_insert_with(|| file.clone());
                for (line, k, v) in env_file_entries(&text) {
                    env.insert(k, (v, Origin::File(file.clone(), line)));
                }
            }
            Err(e) if *optional => {
                main_env_file.get_or_insert_with(|| file.clone());
                notes.push(format!(
                    "EnvironmentFile {} is not there ({e}); it is optional (`-`)",
                    file.display()
                ));
            }
            Err(e) => notes.push(format!(
                "EnvironmentFile {} cannot be read ({e}): systemd would refuse to start the unit",
                file.display()
            )),
        }
    }
    let (command, unit, exec_line) =
        exec.ok_or_else(|| BudgetError::NoExecStart(path.display().to_string()))?;
    let words = split_words(command.trim_start_matches(['-', '@', ':', '+', '!']));
    if !words.iter().any(|w| w.contains("gunicorn")) {
        notes.push("ExecStart does not look like Gunicorn: read as if it were".into());
    }
    let mut timeout_word: Option<String> = None;
    let mut bind: Option<String> = None;
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        let next = words.get(i + 1).cloned();
        let (key, value, used_next) = match w.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string()), false),
            _ => (w.clone(), next, true),
        };
        match key.as_str() {
            "--timeout" | "-t" => timeout_word = value,
            "--bind" | "-b" => bind = value,
            "-c" | "--config" => notes.push(format!(
                "Gunicorn also reads {}: a `timeout` set there is not seen here",
                value.unwrap_or_default()
            )),
            _ => {}
        }
        i += if matches!(
            key.as_str(),
            "--timeout" | "-t" | "--bind" | "-b" | "-c" | "--config"
        ) && used_next
        {
            2
        } else {
            1
        };
    }
    let expand = |text: &str| -> (String, Option<String>, bool) {
        let mut var = None;
        let mut unset = false;
        let out = expand_vars(text, |name| {
            var = Some(name.to_string());
            match env.get(name) {
                Some((v, _)) => v.clone(),
                None => {
                    unset = true;
                    String::new()
                }
            }
        });
        (out, var, unset)
    };
    let service = path
        .file_name()
        .map(|f| f.to_string_lossy().trim_end_matches(".service").to_string());
    let (timeout, source) = match timeout_word {
        None => (
            Some(GUNICORN_DEFAULT_TIMEOUT),
            TimeoutSource::GunicornDefault {
                unit: unit.clone(),
                line: exec_line,
            },
        ),
        Some(word) => {
            let (value, var, unset) = expand(&word);
            let secs = if unset || value.trim().is_empty() {
                Some(GUNICORN_DEFAULT_TIMEOUT)
            } else {
                match value.trim().parse::<f64>() {
                    Ok(n) if n >= 0.0 => Some(n.ceil() as u64),
                    _ => {
                        notes.push(format!(
                            "--timeout `{value}` is not a number: Gunicorn's default 30 s assumed"
                        ));
                        Some(GUNICORN_DEFAULT_TIMEOUT)
                    }
                }
            };
            let source = match (var, unset) {
                (Some(var), true) => TimeoutSource::VariableUnset {
                    var,
                    unit: unit.clone(),
                    env_file: main_env_file.clone(),
                },
                (Some(var), false) => match env.get(&var).map(|e| e.1.clone()) {
                    Some(Origin::File(path, line)) => {
                        TimeoutSource::EnvironmentFile { var, path, line }
                    }
                    Some(Origin::Unit(unit, line)) => TimeoutSource::UnitEnvironment {
                        var,
                        unit,
                        line,
                        env_file: main_env_file.clone(),
                    },
                    None => TimeoutSource::Literal {
                        unit: unit.clone(),
                        line: exec_line,
                    },
                },
                (None, _) => TimeoutSource::Literal {
                    unit: unit.clone(),
                    line: exec_line,
                },
            };
            (secs, source)
        }
    };
    Ok(Gunicorn {
        timeout: timeout.filter(|s| *s > 0).map(Duration::from_secs),
        source,
        bind: bind.map(|b| expand(&b).0),
        service,
        notes,
    })
}

/// `(line, key, value)` of a unit file's section, continuation lines joined.
fn unit_entries(text: &str, wanted: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let (line_no, mut line) = match pending.take() {
            Some((n, mut acc)) => {
                acc.push(' ');
                acc.push_str(raw.trim());
                (n, acc)
            }
            None => (index + 1, raw.trim().to_string()),
        };
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.ends_with('\\') {
            line.pop();
            pending = Some((line_no, line));
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_string();
            continue;
        }
        if section != wanted {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((line_no, k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// `KEY=value` lines of an environment file (`export` and quotes tolerated).
fn env_file_entries(text: &str) -> Vec<(usize, String, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                return None;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (k, v) = line.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((i + 1, k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// Splits a command line or an `Environment=` value: blanks separate, quotes group.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            (None, c) => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

/// `${NAME}` and `$NAME`, replaced through `lookup`.
fn expand_vars(text: &str, mut lookup: impl FnMut(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(inner) = after.strip_prefix('{') {
            if let Some(end) = inner.find('}') {
                out.push_str(&lookup(&inner[..end]));
                rest = &inner[end + 1..];
                continue;
            }
        }
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if len == 0 {
            out.push('$');
            rest = after;
        } else {
            out.push_str(&lookup(&after[..len]));
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    out
}

/// Lines of the routes' timers in the proxy's file, found by reading it again.
#[derive(Debug, Default)]
pub struct TimerLines {
    routes: HashMap<String, (usize, bool)>,
    defaults: Option<(usize, bool)>,
}

#[derive(Deserialize)]
struct ScanDoc {
    #[serde(default)]
    routes: Vec<ScanRoute>,
    defaults: Option<ScanDefaults>,
}

#[derive(Deserialize)]
struct ScanRoute {
    name: Spanned<String>,
    timeouts: Option<Spanned<ScanTimeouts>>,
}

#[derive(Deserialize)]
struct ScanDefaults {
    timeouts: Option<Spanned<ScanTimeouts>>,
}

#[derive(Deserialize)]
struct ScanTimeouts {
    response_header: Option<Spanned<String>>,
}

impl TimerLines {
    /// Reads the lines from the configuration text; nothing when it cannot be read.
    pub fn scan(text: &str) -> TimerLines {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let place = |name_start: usize, t: &Option<Spanned<ScanTimeouts>>| match t {
            Some(t) => match &t.get_ref().response_header {
                Some(rh) => (line_of(rh.span().start), true),
                None => (line_of(t.span().start), false),
            },
            None => (line_of(name_start), false),
        };
        let Ok(doc) = toml::from_str::<ScanDoc>(text) else {
            return TimerLines::default();
        };
        TimerLines {
            routes: doc
                .routes
                .iter()
                .map(|r| {
                    (
                        r.name.get_ref().trim().to_string(),
                        place(r.name.span().start, &r.timeouts),
                    )
                })
                .collect(),
            defaults: doc
                .defaults
                .as_ref()
                .and_then(|d| d.timeouts.as_ref())
                .map(|t| match &t.get_ref().response_header {
                    Some(rh) => (line_of(rh.span().start), true),
                    None => (line_of(t.span().start), false),
                }),
        }
    }

    fn describe(&self, route: &str, file: &Path, value: &str) -> String {
        let found = if route == "(defaults)" {
            self.defaults
        } else {
            self.routes.get(route).copied()
        };
        match found {
            Some((line, true)) => format!(
                "timeouts.response_header = \"{value}\" at {}:{line}",
                file.display()
            ),
            Some((line, false)) => format!(
                "response_header = \"{value}\" in the timeouts of `{route}` ({}:{line})",
                file.display()
            ),
            None if route == "(defaults)" => format!(
                "timeouts = {{ response_header = \"{value}\" }} in [defaults] of {}",
                file.display()
            ),
            None => format!(
                "timeouts = {{ response_header = \"{value}\" }} on route `{route}` in {}",
                file.display()
            ),
        }
    }
}

/// One route's chain and what is wrong with it.
#[derive(Debug, Clone)]
pub struct RouteBudget {
    pub route: String,
    pub chain: String,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub text: String,
    /// Each a complete change that removes the warning.
    pub fixes: Vec<String>,
}

/// Which upstream is the Gunicorn that was read, and how that was decided.
fn gunicorn_upstream(config: &Config, gunicorn: &Gunicorn) -> (usize, String) {
    let default = config.defaults.upstream;
    let Some(bind) = &gunicorn.bind else {
        return (
            default,
            format!(
                "assumed to be the defaults' upstream `{}`",
                config.upstreams[default].name
            ),
        );
    };
    let found = config
        .upstreams
        .iter()
        .position(|u| u.servers.iter().any(|s| same_address(bind, s)));
    match found {
        Some(i) => (
            i,
            format!(
                "upstream `{}` (its --bind {bind})",
                config.upstreams[i].name
            ),
        ),
        None => (
            default,
            format!(
                "no upstream has its --bind {bind}: assumed to be the defaults' upstream `{}`",
                config.upstreams[default].name
            ),
        ),
    }
}

fn same_address(bind: &str, server: &UpstreamAddress) -> bool {
    match server {
        UpstreamAddress::Unix(path) => bind.strip_prefix("unix:") == Some(&path.to_string_lossy()),
        UpstreamAddress::Tcp { authority } => {
            let split = |a: &str| {
                a.rsplit_once(':')
                    .map(|(h, p)| (h.trim_matches(['[', ']']).to_string(), p.to_string()))
            };
            let (Some((bh, bp)), Some((uh, up))) = (split(bind), split(authority)) else {
                return false;
            };
            let loopback = |h: &str| matches!(h, "127.0.0.1" | "localhost" | "::1");
            bp == up
                && (bh == uh || (matches!(bh.as_str(), "0.0.0.0" | "::" | "") && loopback(&uh)))
        }
    }
}

fn show(timer: Option<Duration>) -> String {
    match timer {
        Some(d) => humantime::format_duration(d).to_string(),
        None => "no limit".into(),
    }
}

/// The chain of every route, in match order, fallback last.
pub fn budget(
    config: &Config,
    gunicorn: &Gunicorn,
    browser: Option<Duration>,
    lines: &TimerLines,
) -> (String, Vec<RouteBudget>) {
    let (target, how) = gunicorn_upstream(config, gunicorn);
    let mut header = format!("Gunicorn: {}; {how}", gunicorn.describe());
    for note in &gunicorn.notes {
        let _ = write!(header, "\n  note: {note}");
    }
    let table = RouteTable::new(config);
    let mut needed = 0u64;
    let mut out = Vec::new();
    for route in table.iter() {
        let name = route.name.to_string();
        let s = &route.settings;
        if let Serve::Static(_) = route.serve {
            out.push(RouteBudget {
                route: name,
                chain: "static files: no chain".into(),
                warnings: Vec::new(),
            });
            continue;
        }
        let upstream = &config.upstreams[s.upstream];
        if s.upstream != target {
            out.push(RouteBudget {
                route: name,
                chain: format!(
                    "upstream `{}` is not this Gunicorn: no Gunicorn link",
                    upstream.name
                ),
                warnings: Vec::new(),
            });
            continue;
        }
        let Timer(header_timer) = s.timeouts.response_header;
        let Timer(total) = s.timeouts.total;
        let proxy = match (header_timer, total) {
            (Some(h), Some(t)) => Some(h.min(t)),
            (h, t) => h.or(t),
        };
        let proxy_label = match (header_timer, total) {
            (Some(h), Some(t)) if t < h => format!("total {}", show(Some(t))),
            (None, Some(t)) => format!("total {}", show(Some(t))),
            _ => format!("response_header {}", show(header_timer)),
        };
        let chain = format!(
            "browser {} → proxy {proxy_label} → gunicorn {}",
            match browser {
                Some(b) => show(Some(b)),
                None => "no limit set".into(),
            },
            show(gunicorn.timeout)
        );
        let mut warnings = Vec::new();
        if let (Some(b), Some(p)) = (browser, proxy) {
            if b < p {
                warnings.push(Warning {
                    text: format!(
                        "the browser gives up after {}, before the proxy's {proxy_label}: the user sees the browser's own error, not the proxy's 504",
                        show(Some(b))
                    ),
                    fixes: vec![lines.describe(&name, &config.source, &secs_text(b.as_secs().saturating_sub(5).max(1)))],
                });
            }
        } else if let (Some(b), None) = (browser, proxy) {
            warnings.push(Warning {
                text: format!(
                    "no proxy timer: the browser's {} is the only limit",
                    show(Some(b))
                ),
                fixes: vec![lines.describe(
                    &name,
                    &config.source,
                    &secs_text(b.as_secs().saturating_sub(5).max(1)),
                )],
            });
        }
        if let (Some(h), Some(t)) = (header_timer, total) {
            if t < h {
                warnings.push(Warning {
                    text: format!(
                        "total ({}) ends the exchange before response_header ({}) can fire",
                        show(Some(t)),
                        show(Some(h))
                    ),
                    fixes: vec![lines.describe(&name, &config.source, &secs_text(t.as_secs()))],
                });
            }
        }
        if let Some(g) = gunicorn.timeout {
            let kills_first = proxy.is_none_or(|p| g <= p);
            if kills_first {
                let mut fixes = Vec::new();
                match proxy {
                    Some(p) => {
                        needed = needed.max(p.as_secs() + MARGIN);
                        fixes.push(gunicorn.fix(p.as_secs() + MARGIN));
                        let shorter = (g.as_secs() * 9 / 10).max(1);
                        fixes.push(lines.describe(&name, &config.source, &secs_text(shorter)));
                    }
                    None => fixes.push(lines.describe(
                        &name,
                        &config.source,
                        &secs_text((g.as_secs() * 9 / 10).max(1)),
                    )),
                }
                warnings.push(Warning {
                    text: format!(
                        "Gunicorn kills the worker after {}, before the proxy's {proxy_label}: the client gets a 502 (upstream closed) instead of the proxy's 504 naming the timer",
                        show(Some(g))
                    ),
                    fixes,
                });
            }
        }
        out.push(RouteBudget {
            route: name,
            chain,
            warnings,
        });
    }
    // The proxy's own idea of Gunicorn's timeout, used to recognise a killed worker.
    let upstream = &config.upstreams[target];
    if let (Some(w), Some(g)) = (upstream.worker_timeout, gunicorn.timeout) {
        if w != g {
            let _ = write!(
                header,
                "\n  note: [upstreams.{}] worker_timeout is {} but Gunicorn's --timeout is {}: make them equal (worker_timeout = \"{}\" in {}, or Gunicorn's value)",
                upstream.name,
                show(Some(w)),
                show(Some(g)),
                secs_text(g.as_secs()),
                config.source.display()
            );
        }
    }
    if needed > 0 {
        let _ = write!(
            header,
            "\n  one change covers every route below: {}",
            gunicorn.fix(needed)
        );
    }
    (header, out)
}

fn secs_text(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The budget as `check` prints it.
pub fn render(header: &str, budgets: &[RouteBudget]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "timeout budget, browser → proxy → Gunicorn (the proxy's timer should fire first):"
    );
    let _ = writeln!(out, "{header}");
    let width = budgets.iter().map(|b| b.route.len()).max().unwrap_or(0);
    let mut count = 0;
    for b in budgets {
        let status = if b.warnings.is_empty() {
            ""
        } else {
            "  WARNING"
        };
        let _ = writeln!(out, "  {:<width$}  {}{status}", b.route, b.chain);
        for w in &b.warnings {
            count += 1;
            let _ = writeln!(out, "    warning: {}", w.text);
            for (i, fix) in w.fixes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "      {} {fix}",
                    if i == 0 { "change:" } else { "or:    " }
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "{}",
        match count {
            0 => "no warning: every proxied route's timer fires before Gunicorn kills the worker"
                .to_string(),
            n => format!("{n} warning(s)"),
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qp-budget-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const UNIT: &str = "[Unit]\nDescription=GeoNature\n\n[Service]\nEnvironment=GUNICORN_PORT=8000\nEnvironment=GUNICORN_TIMEOUT=30\nEnvironmentFile=-@ENV@\nExecStart=/venv/bin/gunicorn geonature:create_app() \\\n    --bind \"127.0.0.1:${GUNICORN_PORT}\" --timeout=\"${GUNICORN_TIMEOUT}\"\n";

    #[test]
    fn the_environment_file_wins_over_the_unit() {
        let dir = temp_dir("envfile");
        let env = write(
            &dir,
            "environ",
            "# GeoNature\nexport FOO=1\nGUNICORN_TIMEOUT=600\n",
        );
        let unit = write(
            &dir,
            "geonature.service",
            &UNIT.replace("@ENV@", &env.display().to_string()),
        );
        let g = read_unit(&unit).unwrap();
        assert_eq!(g.timeout, Some(Duration::from_secs(600)));
        assert_eq!(g.bind.as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(
            g.fix(3660),
            format!(
                "GUNICORN_TIMEOUT=3660 in {} (line 3), then `systemctl restart geonature`",
                env.display()
            )
        );
    }

    #[test]
    fn without_the_file_the_units_default_applies_and_the_fix_adds_it() {
        let dir = temp_dir("noenv");
        let env = dir.join("environ");
        let unit = write(
            &dir,
            "geonature.service",
            &UNIT.replace("@ENV@", &env.display().to_string()),
        );
        let g = read_unit(&unit).unwrap();
        assert_eq!(g.timeout, Some(Duration::from_secs(30)));
        assert!(
            matches!(g.source, TimeoutSource::UnitEnvironment { line: 6, .. }),
            "{:?}",
            g.source
        );
        assert!(g
            .fix(120)
            .starts_with(&format!("add GUNICORN_TIMEOUT=120 to {}", env.display())));
        assert!(g.notes[0].contains("optional"));
    }

    #[test]
    fn literal_and_missing_timeouts_point_at_exec_start() {
        let dir = temp_dir("literal");
        let unit = write(
            &dir,
            "gn.service",
            "[Service]\nExecStart=/bin/gunicorn app -t 90 -b unix:/run/gn.sock\n",
        );
        let g = read_unit(&unit).unwrap();
        assert_eq!(g.timeout, Some(Duration::from_secs(90)));
        assert_eq!(g.bind.as_deref(), Some("unix:/run/gn.sock"));
        assert!(g.fix(200).starts_with("--timeout=200 in ExecStart at"));
        let unit = write(
            &dir,
            "gn2.service",
            "[Service]\nExecStart=/bin/gunicorn app\n",
        );
        let g = read_unit(&unit).unwrap();
        assert_eq!(g.timeout, Some(Duration::from_secs(30)));
        assert!(matches!(
            g.source,
            TimeoutSource::GunicornDefault { line: 2, .. }
        ));
        let unit = write(
            &dir,
            "gn3.service",
            "[Service]\nExecStart=/bin/gunicorn app --timeout 0\n",
        );
        assert_eq!(read_unit(&unit).unwrap().timeout, None);
    }

    #[test]
    fn drop_ins_override_the_unit() {
        let dir = temp_dir("dropin");
        let unit = write(&dir, "geonature.service", "[Service]\nEnvironment=GUNICORN_TIMEOUT=30\nExecStart=/bin/gunicorn app --timeout=${GUNICORN_TIMEOUT}\n");
        std::fs::create_dir_all(dir.join("geonature.service.d")).unwrap();
        write(
            &dir.join("geonature.service.d"),
            "override.conf",
            "[Service]\nEnvironment=GUNICORN_TIMEOUT=900\n",
        );
        let g = read_unit(&unit).unwrap();
        assert_eq!(g.timeout, Some(Duration::from_secs(900)));
        assert!(g.describe().contains("override.conf:2"), "{}", g.describe());
    }

    const CONFIG: &str = r#"
[upstreams.geonature]
address = "127.0.0.1:8000"
[upstreams.usershub]
address = "127.0.0.1:5001"
[defaults]
upstream = "geonature"
timeouts = { response_header = "60s" }

[[routes]]
name = "files"
match = { path_prefix = "/geonature/api/static/" }
static = { root = "/srv/static", strip_prefix = "/geonature/api/static" }

[[routes]]
name = "extraction"
match = { path = "/geonature/api/quadrige/data-extractions" }
timeouts = { response_header = "60m", idle = "10m" }

[[routes]]
name = "capped"
match = { path_prefix = "/geonature/api/capped" }
timeouts = { total = "2m" }

[[routes]]
name = "usershub"
match = { path_prefix = "/usershub" }
upstream = "usershub"
"#;

    #[test]
    fn a_route_longer_than_gunicorns_timeout_is_flagged_with_both_fixes() {
        let config = Config::parse(CONFIG, Path::new("proxy.toml")).unwrap();
        let lines = TimerLines::scan(CONFIG);
        let mut g = Gunicorn::from_timeout(600);
        g.source = TimeoutSource::EnvironmentFile {
            var: "GUNICORN_TIMEOUT".into(),
            path: "/home/gn/geonature/environ".into(),
            line: 1,
        };
        g.service = Some("geonature".into());
        g.bind = Some("127.0.0.1:8000".into());
        let (header, budgets) = budget(&config, &g, None, &lines);
        assert!(
            header.contains("upstream `geonature` (its --bind 127.0.0.1:8000)"),
            "{header}"
        );
        let by_name = |n: &str| budgets.iter().find(|b| b.route == n).unwrap();
        assert_eq!(by_name("files").chain, "static files: no chain");
        assert!(by_name("usershub").chain.contains("not this Gunicorn"));
        let extraction = by_name("extraction");
        assert_eq!(extraction.warnings.len(), 1, "{extraction:?}");
        assert_eq!(
            extraction.warnings[0].fixes[0],
            "GUNICORN_TIMEOUT=3660 in /home/gn/geonature/environ (line 1), then `systemctl restart geonature`"
        );
        assert_eq!(
            extraction.warnings[0].fixes[1],
            "timeouts.response_header = \"9m\" at proxy.toml:18"
        );
        // total 2m under response_header 60s? No: 60s < 2m, and both are under 600 s.
        assert!(
            by_name("capped").warnings.is_empty(),
            "{:?}",
            by_name("capped")
        );
        assert!(by_name("(defaults)").warnings.is_empty());
        let text = render(&header, &budgets);
        assert!(text.contains("1 warning(s)"), "{text}");
        assert!(
            text.contains("one change covers every route below: GUNICORN_TIMEOUT=3660"),
            "{text}"
        );
    }

    #[test]
    fn a_short_gunicorn_timeout_flags_the_defaults_and_a_browser_limit_is_a_link() {
        let config = Config::parse(CONFIG, Path::new("proxy.toml")).unwrap();
        let lines = TimerLines::scan(CONFIG);
        let g = Gunicorn::from_timeout(30);
        let (_, budgets) = budget(&config, &g, Some(Duration::from_secs(300)), &lines);
        let defaults = budgets.iter().find(|b| b.route == "(defaults)").unwrap();
        assert_eq!(defaults.warnings.len(), 1);
        assert!(defaults.warnings[0].fixes[0].contains("--timeout=120"));
        assert!(
            defaults.warnings[0].fixes[1].contains("at proxy.toml:8"),
            "{:?}",
            defaults.warnings[0]
        );
        let extraction = budgets.iter().find(|b| b.route == "extraction").unwrap();
        assert_eq!(extraction.warnings.len(), 2, "{extraction:?}");
        assert!(extraction.warnings[0]
            .text
            .contains("browser gives up after 5m"));
    }

    #[test]
    fn a_worker_timeout_that_disagrees_with_gunicorn_is_noted_once() {
        let text = CONFIG.replace(
            "address = \"127.0.0.1:8000\"",
            "address = \"127.0.0.1:8000\"\nworker_timeout = \"60m\"",
        );
        let config = Config::parse(&text, Path::new("proxy.toml")).unwrap();
        let g = Gunicorn::from_timeout(600);
        let (header, _) = budget(&config, &g, None, &TimerLines::scan(&text));
        assert_eq!(
            header
                .matches("worker_timeout is 1h but Gunicorn's --timeout is 10m")
                .count(),
            1,
            "{header}"
        );
    }

    #[test]
    fn addresses_match_through_wildcard_binds() {
        let tcp = |a: &str| UpstreamAddress::Tcp {
            authority: a.into(),
        };
        assert!(same_address("0.0.0.0:8000", &tcp("127.0.0.1:8000")));
        assert!(same_address("127.0.0.1:8000", &tcp("127.0.0.1:8000")));
        assert!(!same_address("127.0.0.1:8001", &tcp("127.0.0.1:8000")));
        assert!(same_address(
            "unix:/run/a.sock",
            &UpstreamAddress::Unix("/run/a.sock".into())
        ));
    }

    #[test]
    fn words_split_like_systemd() {
        assert_eq!(
            split_words(r#"GUNICORN_TIMEOUT=30 "A=b c" --bind "h:${P}""#),
            vec!["GUNICORN_TIMEOUT=30", "A=b c", "--bind", "h:${P}"]
        );
        assert_eq!(expand_vars("${A}:$B.x", |n| n.to_lowercase()), "a:b.x");
    }
}
