//! Loading and validating the TOML configuration.
//!
//! `raw` mirrors the file; this module turns it into [`Config`], whose values are all
//! checked and resolved (defaults applied, upstream names turned into indexes, regexes
//! compiled). Every error names the file, the line and column, and what to change.

mod raw;
pub mod units;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use regex::Regex;
use toml::Spanned;

use std::sync::Arc;

use raw::{
    RawCompress, RawConfig, RawHealthCheck, RawMatch, RawRoute, RawStatic, RawTimeouts, RawUpstream,
};
pub use units::{Cidr, Rate, Size, Timer};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Where it was read from, for messages.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub log: LogConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// What a request gets when no route matches, and what routes inherit.
    pub defaults: RouteSettings,
    /// In match order: the first route whose matchers all match wins.
    pub routes: Vec<RouteConfig>,
    pub maintenance: Option<MaintenanceConfig>,
    pub admin: Option<AdminConfig>,
}

/// The admin listener: metrics, health, live state and the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Who may connect; loopback only unless configured.
    pub allow: Vec<Cidr>,
}

/// The maintenance switch: while on, requests under `path_prefix` get the page with 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// On regardless of the flag file.
    pub enabled: bool,
    /// On while this file exists (`touch` it to start maintenance, `rm` to end it).
    pub flag_file: Option<PathBuf>,
    /// The HTML page to show; a built-in one when absent.
    pub page: Option<PathBuf>,
    pub path_prefix: String,
    pub retry_after: Duration,
}

/// HTTPS listeners and what goes with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    /// PEM certificate chain (certbot's `fullchain.pem`).
    pub certificate: PathBuf,
    /// PEM private key (certbot's `privkey.pem`).
    pub key: PathBuf,
    /// The `Strict-Transport-Security` value sent on HTTPS responses.
    pub hsts: Option<String>,
    /// Plain-HTTP listeners answer with a redirect to HTTPS (except ACME challenges).
    pub redirect_http: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// How long a client may take to send a complete request head (slowloris guard);
    /// also how long an idle keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// The `X-Forwarded-Server` value.
    pub name: String,
    /// How many body bytes are read at most to find a GraphQL `operationName`.
    pub graphql_peek_limit: usize,
    /// Worker threads, each with its own single-threaded runtime (see `server::workers`).
    pub workers: usize,
    pub acme_challenge_root: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    /// Proxies whose `X-Forwarded-For` is believed; everyone else's is replaced.
    pub trusted_proxies: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// Apache's `combined`, what goaccess and fail2ban read.
    Combined,
    /// One JSON object per line, with route, timings and request id.
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub access: AccessLogTarget,
    pub format: AccessLogFormat,
    /// The diagnostic log's level filter (`RUST_LOG` wins when set).
    pub level: String,
}

/// Where an upstream listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddress {
    /// `host:port`; resolved at connect time so a name may point elsewhere later.
    Tcp {
        authority: String,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddress::Tcp { authority } => f.write_str(authority),
            UpstreamAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// One or more servers (Gunicorn instances) serving the same application.
    pub servers: Vec<UpstreamAddress>,
    pub balance: Balance,
    /// Requests in flight at once per server: Gunicorn's worker count. More wait in
    /// the proxy's queue, where they can be seen and timed out, not in the backlog.
    pub max_connections: Option<usize>,
    /// Requests allowed to wait for a free slot; more get 503 at once.
    pub max_queue: usize,
    /// The longest a request waits in the queue before it gets 503.
    pub queue_timeout: Duration,
    /// Gunicorn's `--timeout`: used to recognise a killed worker and to warn in `check`.
    pub worker_timeout: Option<Duration>,
    pub health_check: Option<HealthCheckConfig>,
    /// Failures (connect errors, dropped connections, 502/503/504) within
    /// `fail_timeout` that take a server out for `fail_timeout`.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Forward the client's `Host` instead of the upstream's address (Apache `ProxyPreserveHost`).
    pub preserve_host: bool,
    /// An idle pooled connection is dropped after this; keep it below the upstream's own
    /// keep-alive so we never reuse a connection the upstream is closing.
    pub keepalive_timeout: Duration,
    pub max_idle_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The server with the fewest requests in flight (best for slow, uneven requests).
    LeastOutstanding,
    RoundRobin,
}

/// An active health check: `GET path` every `interval`; a 2xx or 3xx within `timeout`
/// is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// What happens to a request over a route's `max_concurrent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    /// Wait (up to the upstream's `queue_timeout`) for one to finish.
    Queue,
    /// Answer 503 with Retry-After at once.
    Reject,
}

/// Per-route limits on concurrency and on each client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLimits {
    pub max_concurrent: Option<usize>,
    pub on_limit: OnLimit,
    pub client_max_concurrent: Option<u32>,
    pub client_rate: Option<Rate>,
}

impl RouteLimits {
    pub const NONE: RouteLimits = RouteLimits {
        max_concurrent: None,
        on_limit: OnLimit::Queue,
        client_max_concurrent: None,
        client_rate: None,
    };
}

/// Apache's `Require ip`: a client in `deny` is refused; when `allow` is not empty, only
/// clients in it are let in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessRules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl AccessRules {
    pub fn permits(&self, client: std::net::IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(client))
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(client)))
    }
}

/// The four upstream timers of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Timer,
    pub response_header: Timer,
    pub idle: Timer,
    pub total: Timer,
}

impl Timeouts {
    fn overridden_by(self, raw: &RawTimeouts) -> Timeouts {
        Timeouts {
            connect: raw.connect.unwrap_or(self.connect),
            response_header: raw.response_header.unwrap_or(self.response_header),
            idle: raw.idle.unwrap_or(self.idle),
            total: raw.total.unwrap_or(self.total),
        }
    }
}

/// What a route decides for the requests it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSettings {
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub timeouts: Timeouts,
    pub max_request_body: Size,
    /// Response compression; `None` leaves bodies as they are.
    pub compress: Option<Arc<CompressConfig>>,
    pub limits: RouteLimits,
    pub access: Option<Arc<AccessRules>>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub matcher: MatchConfig,
    pub settings: RouteSettings,
    pub serve: Serve,
}

/// Where a route's answers come from.
#[derive(Debug, Clone)]
pub enum Serve {
    /// Forwarded to the route's upstream.
    Proxy,
    /// Files from disk (Apache's `Alias`), never forwarded.
    Static(Arc<StaticConfig>),
}

/// A static route: like Apache's `Alias` with `Options -Indexes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    /// Searched in order: the first that holds the file wins (GeoNature's `custom/`
    /// folder before `backend/static`).
    pub roots: Vec<PathBuf>,
    /// Removed from the request path before it is looked up under a root.
    pub strip_prefix: String,
    /// Served for a directory (`/geonature/` gives `index.html`).
    pub index: String,
    /// Serve `file.br` / `file.gz` siblings to clients that accept them.
    pub precompressed: bool,
    /// Follow symbolic links that lead outside the root.
    pub allow_symlinks_outside: bool,
    pub cache_control: Option<String>,
}

/// Which responses are compressed on the fly, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressConfig {
    /// Media types (without parameters) that are compressed.
    pub types: Vec<String>,
    /// Bodies known to be smaller than this are sent as they are.
    pub min_size: u64,
    /// In order of preference when the client accepts several.
    pub algorithms: Vec<Compression>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Brotli,
    Gzip,
}

/// A route's matchers; absent ones match everything.
#[derive(Debug, Clone, Default)]
pub struct MatchConfig {
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<Regex>,
    pub methods: Option<Vec<Method>>,
    pub graphql_operations: Option<Vec<String>>,
}

pub const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    connect: Timer(Some(Duration::from_secs(5))),
    response_header: Timer(Some(Duration::from_secs(60))),
    idle: Timer(Some(Duration::from_secs(60))),
    total: Timer(None),
};
const DEFAULT_LISTEN: &str = "127.0.0.1:8088";
const DEFAULT_UPSTREAM: (&str, &str) = ("geonature", "127.0.0.1:8080");
const DEFAULT_MAX_REQUEST_BODY: u64 = 1 << 30;

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Settings that are valid but will not do what the operator likely wants.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let fallback = RouteConfig {
            name: "(defaults)".into(),
            matcher: MatchConfig::default(),
            settings: self.defaults.clone(),
            serve: Serve::Proxy,
        };
        for route in self.routes.iter().chain(std::iter::once(&fallback)) {
            if matches!(route.serve, Serve::Proxy) {
                if let Some(upstream) = self.upstreams.get(route.settings.upstream) {
                    warnings.extend(route_warnings(route, upstream));
                }
            }
        }
        warnings
    }

    /// Validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let located = Locator { text, path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            located.error(e.span().unwrap_or(0..0), e.message().trim_end().to_string())
        })?;
        Validator { at: located }.config(raw, path)
    }
}

/// Turns byte spans into `file:line:column` errors.
struct Locator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Locator<'_> {
    fn error(&self, span: Range<usize>, message: String) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line,
            column,
            message,
        }
    }
}

struct Validator<'a> {
    at: Locator<'a>,
}

impl Validator<'_> {
    fn config(&self, raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let upstreams = self.upstreams(&raw)?;
        let default_upstream = match &raw.defaults.upstream {
            Some(name) => self.upstream_index(&upstreams, name)?,
            None if upstreams.len() == 1 => 0,
            None => {
                return Err(self.at.error(
                    0..0,
                    "several upstreams are defined: say which one serves unmatched requests with `[defaults] upstream = \"...\"`".into(),
                ))
            }
        };
        let defaults = RouteSettings {
            upstream: default_upstream,
            timeouts: DEFAULT_TIMEOUTS.overridden_by(&raw.defaults.timeouts),
            max_request_body: raw
                .defaults
                .max_request_body
                .unwrap_or(Size(Some(DEFAULT_MAX_REQUEST_BODY))),
            compress: self.compress(raw.defaults.compress.as_ref())?,
            limits: RouteLimits::NONE,
            access: None,
        };
        let mut routes = Vec::with_capacity(raw.routes.len());
        for route in &raw.routes {
            let route = self.route(route, &defaults, &upstreams)?;
            if routes.iter().any(|r: &RouteConfig| r.name == route.name) {
                return Err(self.at.error(
                    0..0,
                    format!(
                        "two routes are named `{}`: names must be unique",
                        route.name
                    ),
                ));
            }
            routes.push(route);
        }
        Ok(Config {
            source: path.to_path_buf(),
            server: self.server(&raw)?,
            log: self.log(&raw)?,
            upstreams,
            defaults,
            routes,
            maintenance: self.maintenance(&raw)?,
            admin: self.admin(&raw)?,
        })
    }

    fn maintenance(&self, raw: &RawConfig) -> Result<Option<MaintenanceConfig>, ConfigError> {
        let Some(m) = &raw.maintenance else {
            return Ok(None);
        };
        let span = m.span();
        let m = m.get_ref();
        let path_prefix = m.path_prefix.clone().unwrap_or_else(|| "/geonature".into());
        if !path_prefix.starts_with('/') {
            return Err(self
                .at
                .error(span, "maintenance `path_prefix` must start with `/`".into()));
        }
        Ok(Some(MaintenanceConfig {
            enabled: m.enabled.unwrap_or(false),
            flag_file: m.flag_file.as_deref().map(|f| self.resolve(f)),
            page: m.page.as_deref().map(|p| self.resolve(p)),
            path_prefix,
            retry_after: m.retry_after.map_or(Duration::from_secs(300), |d| d.0),
        }))
    }

    fn tls(&self, raw: &RawConfig) -> Result<Option<TlsConfig>, ConfigError> {
        let Some(tls) = &raw.server.tls else {
            return Ok(None);
        };
        let t = tls.get_ref();
        if t.listen.get_ref().is_empty() {
            return Err(self.at.error(
                t.listen.span(),
                "`tls.listen` needs at least one address".into(),
            ));
        }
        let listen = t
            .listen
            .get_ref()
            .iter()
            .map(|a| parse_listen(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| self.at.error(t.listen.span(), m))?;
        let hsts = match &t.hsts {
            Some(v)
                if http::HeaderValue::from_str(v.get_ref()).is_err() || v.get_ref().is_empty() =>
            {
                return Err(self
                    .at
                    .error(v.span(), "`hsts` is not a valid header value".into()))
            }
            other => other.as_ref().map(|v| v.get_ref().clone()),
        };
        Ok(Some(TlsConfig {
            listen,
            certificate: self.resolve(&t.certificate),
            key: self.resolve(&t.key),
            hsts,
            redirect_http: t.redirect_http.unwrap_or(false),
        }))
    }

    fn server(&self, raw: &RawConfig) -> Result<ServerConfig, ConfigError> {
        let s = &raw.server;
        let listen = match &s.listen {
            None => vec![parse_listen(DEFAULT_LISTEN).expect("the default listen address parses")],
            Some(list) if list.get_ref().is_empty() => {
                return Err(self
                    .at
                    .error(list.span(), "`listen` needs at least one address".into()))
            }
            Some(list) => list
                .get_ref()
                .iter()
                .map(|a| parse_listen(a))
                .collect::<Result<_, _>>()
                .map_err(|m| self.at.error(list.span(), m))?,
        };
        let peek_limit = match &s.graphql_peek_limit {
            None => 64 * 1024,
            Some(size) => match size.get_ref().0 {
                Some(n) if (64..=16 << 20).contains(&n) => n as usize,
                _ => {
                    return Err(self.at.error(
                        size.span(),
                        "`graphql_peek_limit` must be between 64B and 16MiB".into(),
                    ))
                }
            },
        };
        let workers = match &s.workers {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n @ 1..=1024) => n,
                _ => {
                    return Err(self
                        .at
                        .error(n.span(), "`workers` must be between 1 and 1024".into()))
                }
            },
        };
        Ok(ServerConfig {
            listen,
            workers,
            header_read_timeout: s
                .header_read_timeout
                .map_or(Duration::from_secs(20), |d| d.0),
            shutdown_grace: s.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            name: s.name.clone().unwrap_or_else(host_name),
            graphql_peek_limit: peek_limit,
            acme_challenge_root: s.acme_challenge_root.as_deref().map(|r| self.resolve(r)),
            tls: self.tls(raw)?,
            trusted_proxies: match &s.trusted_proxies {
                None => vec![
                    Cidr::parse("127.0.0.0/8").expect("a valid range"),
                    Cidr::parse("::1").expect("a valid address"),
                ],
                Some(list) => self.cidrs(Some(list))?,
            },
        })
    }

    fn log(&self, raw: &RawConfig) -> Result<LogConfig, ConfigError> {
        let access = match raw.log.access.as_deref() {
            None | Some("stdout") => AccessLogTarget::Stdout,
            Some("off") => AccessLogTarget::Off,
            Some(path) => AccessLogTarget::File(PathBuf::from(path)),
        };
        let format = match &raw.log.format {
            None => AccessLogFormat::Combined,
            Some(f) => match f.get_ref().as_str() {
                "combined" => AccessLogFormat::Combined,
                "json" => AccessLogFormat::Json,
                other => {
                    return Err(self.at.error(
                        f.span(),
                        format!("unknown log format `{other}`: use \"combined\" or \"json\""),
                    ))
                }
            },
        };
        let level = match &raw.log.level {
            None => "info".to_string(),
            Some(l) => {
                let level = l.get_ref().to_ascii_lowercase();
                if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                    return Err(self.at.error(
                        l.span(),
                        format!(
                            "unknown log level `{level}`: use error, warn, info, debug or trace"
                        ),
                    ));
                }
                level
            }
        };
        Ok(LogConfig {
            access,
            format,
            level,
        })
    }

    fn upstreams(&self, raw: &RawConfig) -> Result<Vec<UpstreamConfig>, ConfigError> {
        if raw.upstreams.is_empty() {
            let (name, address) = DEFAULT_UPSTREAM;
            let server = UpstreamAddress::Tcp {
                authority: address.into(),
            };
            return Ok(vec![UpstreamConfig::single(name, server)]);
        }
        raw.upstreams
            .iter()
            .map(|(name, up)| self.upstream(name, up))
            .collect()
    }

    fn upstream(
        &self,
        name: &str,
        up: &Spanned<RawUpstream>,
    ) -> Result<UpstreamConfig, ConfigError> {
        let raw = up.get_ref();
        let servers = match (&raw.address, &raw.servers) {
            (Some(address), None) => vec![parse_upstream_address(address.get_ref())
                .map_err(|m| self.at.error(address.span(), m))?],
            (None, Some(list)) if !list.get_ref().is_empty() => list
                .get_ref()
                .iter()
                .map(|a| parse_upstream_address(a))
                .collect::<Result<_, _>>()
                .map_err(|m| self.at.error(list.span(), m))?,
            _ => {
                return Err(self.at.error(
                    up.span(),
                    format!("upstream `{name}` needs `address = \"host:port\"` or `servers = [\"host:port\", ...]` (not both)"),
                ))
            }
        };
        let balance = match &raw.balance {
            None => Balance::LeastOutstanding,
            Some(b) => match b.get_ref().as_str() {
                "least_outstanding" => Balance::LeastOutstanding,
                "round_robin" => Balance::RoundRobin,
                other => {
                    return Err(self.at.error(
                        b.span(),
                        format!(
                        "unknown balance `{other}`: use \"least_outstanding\" or \"round_robin\""
                    ),
                    ))
                }
            },
        };
        if let Some(max) = raw.max_connections.as_ref().filter(|m| *m.get_ref() == 0) {
            return Err(self.at.error(
                max.span(),
                "`max_connections` must be at least 1 (omit it for no limit)".into(),
            ));
        }
        Ok(UpstreamConfig {
            name: name.to_string(),
            servers,
            balance,
            max_connections: raw.max_connections.as_ref().map(|m| *m.get_ref()),
            max_queue: raw.max_queue.unwrap_or(1000),
            queue_timeout: raw.queue_timeout.map_or(Duration::from_secs(30), |d| d.0),
            worker_timeout: raw.worker_timeout.map(|d| d.0),
            health_check: raw.health_check.as_ref().map(|h| health_check(h.get_ref())),
            max_fails: raw.max_fails.unwrap_or(3),
            fail_timeout: raw.fail_timeout.map_or(Duration::from_secs(10), |d| d.0),
            preserve_host: raw.preserve_host,
            // Gunicorn's own --keep-alive defaults to 2 s: stay under it.
            keepalive_timeout: raw
                .keepalive_timeout
                .map_or(Duration::from_secs(1), |d| d.0),
            max_idle_connections: raw.max_idle_connections.unwrap_or(32),
        })
    }

    fn upstream_index(
        &self,
        upstreams: &[UpstreamConfig],
        name: &Spanned<String>,
    ) -> Result<usize, ConfigError> {
        upstreams
            .iter()
            .position(|u| &u.name == name.get_ref())
            .ok_or_else(|| {
                let known: Vec<_> = upstreams.iter().map(|u| u.name.as_str()).collect();
                self.at.error(
                    name.span(),
                    format!(
                        "unknown upstream `{}`; defined upstreams: {}",
                        name.get_ref(),
                        known.join(", ")
                    ),
                )
            })
    }

    fn route(
        &self,
        route: &Spanned<RawRoute>,
        defaults: &RouteSettings,
        upstreams: &[UpstreamConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let raw = route.get_ref();
        let name = raw.name.get_ref().trim();
        if name.is_empty() {
            return Err(self
                .at
                .error(raw.name.span(), "a route name cannot be empty".into()));
        }
        let upstream = match &raw.upstream {
            Some(n) => self.upstream_index(upstreams, n)?,
            None => defaults.upstream,
        };
        let compress = match &raw.compress {
            Some(c) => self.compress(Some(c))?,
            None => defaults.compress.clone(),
        };
        let serve = match &raw.static_files {
            None => Serve::Proxy,
            Some(s) => Serve::Static(Arc::new(self.static_files(s)?)),
        };
        Ok(RouteConfig {
            name: name.to_string(),
            matcher: self.matcher(&raw.matcher)?,
            settings: RouteSettings {
                upstream,
                timeouts: defaults.timeouts.overridden_by(&raw.timeouts),
                max_request_body: raw.max_request_body.unwrap_or(defaults.max_request_body),
                compress,
                limits: self.limits(raw)?,
                access: self.access(raw)?,
            },
            serve,
        })
    }

    fn limits(&self, raw: &RawRoute) -> Result<RouteLimits, ConfigError> {
        let on_limit = match &raw.on_limit {
            None => OnLimit::Queue,
            Some(v) => match v.get_ref().as_str() {
                "queue" => OnLimit::Queue,
                "reject" => OnLimit::Reject,
                other => {
                    return Err(self.at.error(
                        v.span(),
                        format!("unknown on_limit `{other}`: use \"queue\" or \"reject\""),
                    ))
                }
            },
        };
        let client_rate = match &raw.client_rate {
            None => None,
            Some(r) => Some(Rate::parse(r.get_ref()).map_err(|m| self.at.error(r.span(), m))?),
        };
        Ok(RouteLimits {
            max_concurrent: raw.max_concurrent.filter(|n| *n > 0),
            on_limit,
            client_max_concurrent: raw.client_max_concurrent.filter(|n| *n > 0),
            client_rate,
        })
    }

    fn access(&self, raw: &RawRoute) -> Result<Option<Arc<AccessRules>>, ConfigError> {
        if raw.allow.is_none() && raw.deny.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(AccessRules {
            allow: self.cidrs(raw.allow.as_ref())?,
            deny: self.cidrs(raw.deny.as_ref())?,
        })))
    }

    fn cidrs(&self, list: Option<&Spanned<Vec<String>>>) -> Result<Vec<Cidr>, ConfigError> {
        let Some(list) = list else {
            return Ok(Vec::new());
        };
        list.get_ref()
            .iter()
            .map(|c| Cidr::parse(c))
            .collect::<Result<_, _>>()
            .map_err(|m| self.at.error(list.span(), m))
    }

    fn admin(&self, raw: &RawConfig) -> Result<Option<AdminConfig>, ConfigError> {
        let Some(admin) = &raw.admin else {
            return Ok(None);
        };
        let a = admin.get_ref();
        let listen =
            parse_listen(a.listen.get_ref()).map_err(|m| self.at.error(a.listen.span(), m))?;
        let allow = match &a.allow {
            None => vec![
                Cidr::parse("127.0.0.0/8").expect("a valid range"),
                Cidr::parse("::1").expect("a valid address"),
            ],
            Some(list) => self.cidrs(Some(list))?,
        };
        Ok(Some(AdminConfig { listen, allow }))
    }

    fn static_files(&self, raw: &Spanned<RawStatic>) -> Result<StaticConfig, ConfigError> {
        let s = raw.get_ref();
        let roots: Vec<PathBuf> = match (&s.root, &s.roots) {
            (Some(root), None) => vec![self.resolve(root)],
            (None, Some(roots)) if !roots.is_empty() => roots.iter().map(|r| self.resolve(r)).collect(),
            _ => {
                return Err(self.at.error(
                    raw.span(),
                    "a static route needs `root = \"/dir\"` or `roots = [\"/first\", \"/second\"]` (not both)".into(),
                ))
            }
        };
        let strip_prefix = s.strip_prefix.clone().unwrap_or_default();
        if !strip_prefix.is_empty() && !strip_prefix.starts_with('/') {
            return Err(self
                .at
                .error(raw.span(), "`strip_prefix` must start with `/`".into()));
        }
        let index = s.index.clone().unwrap_or_else(|| "index.html".into());
        if index.is_empty() || index.contains('/') {
            return Err(self
                .at
                .error(raw.span(), "`index` must be a plain file name".into()));
        }
        Ok(StaticConfig {
            roots,
            strip_prefix: strip_prefix.trim_end_matches('/').to_string(),
            index,
            precompressed: s.precompressed.unwrap_or(true),
            allow_symlinks_outside: s.allow_symlinks_outside.unwrap_or(false),
            cache_control: s.cache_control.clone(),
        })
    }

    /// A relative path is taken from the config file's folder, not the working directory.
    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match self.at.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    fn compress(
        &self,
        raw: Option<&Spanned<RawCompress>>,
    ) -> Result<Option<Arc<CompressConfig>>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let c: &RawCompress = raw.get_ref();
        if c.types.is_empty() {
            return Ok(None);
        }
        let algorithms = match &c.algorithms {
            None => vec![Compression::Brotli, Compression::Gzip],
            Some(names) => names
                .iter()
                .map(|n| match n.as_str() {
                    "br" | "brotli" => Ok(Compression::Brotli),
                    "gzip" => Ok(Compression::Gzip),
                    other => Err(self.at.error(
                        raw.span(),
                        format!("unknown compression `{other}`: use \"br\" or \"gzip\""),
                    )),
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Some(Arc::new(CompressConfig {
            types: c
                .types
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            min_size: c.min_size.and_then(|s| s.0).unwrap_or(1024),
            algorithms,
        })))
    }

    fn matcher(&self, raw: &Spanned<RawMatch>) -> Result<MatchConfig, ConfigError> {
        let m = raw.get_ref();
        let path = |p: &Option<Spanned<String>>, key: &str| match p {
            Some(p) if !p.get_ref().starts_with('/') => Err(self
                .at
                .error(p.span(), format!("`{key}` must start with `/`"))),
            other => Ok(other.as_ref().map(|p| p.get_ref().clone())),
        };
        let path_regex = match &m.path_regex {
            None => None,
            Some(r) => Some(Regex::new(r.get_ref()).map_err(|e| {
                self.at
                    .error(r.span(), format!("invalid `path_regex`: {e}"))
            })?),
        };
        let methods = match &m.methods {
            None => None,
            Some(list) => Some(
                list.get_ref()
                    .iter()
                    .map(|name| parse_method(name))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|msg| self.at.error(list.span(), msg))?,
            ),
        };
        let graphql_operations = match &m.graphql_operations {
            None => None,
            Some(ops) if ops.get_ref().is_empty() => {
                return Err(self
                    .at
                    .error(ops.span(), "`graphql_operations` is empty".into()))
            }
            Some(ops) => Some(ops.get_ref().clone()),
        };
        let matcher = MatchConfig {
            path: path(&m.path, "path")?,
            path_prefix: path(&m.path_prefix, "path_prefix")?,
            path_regex,
            methods,
            graphql_operations,
        };
        if matcher.path.is_none()
            && matcher.path_prefix.is_none()
            && matcher.path_regex.is_none()
            && matcher.methods.is_none()
            && matcher.graphql_operations.is_none()
        {
            return Err(self.at.error(
                raw.span(),
                "`match` is empty: name at least one of path, path_prefix, path_regex, methods, graphql_operations".into(),
            ));
        }
        Ok(matcher)
    }
}

fn route_warnings(route: &RouteConfig, upstream: &UpstreamConfig) -> Vec<String> {
    let (name, t) = (&route.name, &route.settings.timeouts);
    let mut warnings = Vec::new();
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if let Some(worker) = upstream.worker_timeout {
        let longest = [t.response_header.0, t.idle.0]
            .into_iter()
            .map(|d| d.unwrap_or(Duration::MAX))
            .max();
        if longest.is_some_and(|d| d > worker) {
            warnings.push(format!(
                "route `{name}`: its timers ({} response_header, {} idle) exceed upstream `{}`'s worker_timeout {}: Gunicorn kills the worker first and the client gets a 502; raise GUNICORN_TIMEOUT (and worker_timeout) to at least the route's longest timer",
                t.response_header, t.idle, upstream.name, show(worker)
            ));
        }
    }
    if let (Some(total), Some(header)) = (t.total.0, t.response_header.0) {
        let queued = if upstream.max_connections.is_some()
            || route.settings.limits.max_concurrent.is_some()
        {
            upstream.queue_timeout
        } else {
            Duration::ZERO
        };
        if queued + header > total {
            warnings.push(format!(
                "route `{name}`: queue wait ({}) + response_header ({}) exceed total ({}): the total timer cuts requests the response_header timer would allow",
                show(queued), show(header), show(total)
            ));
        }
    }
    if let (Some(cap), Some(workers)) = (
        route.settings.limits.max_concurrent,
        upstream.max_connections,
    ) {
        if cap * upstream.servers.len() >= workers * upstream.servers.len() {
            warnings.push(format!(
                "route `{name}`: max_concurrent {cap} can take every worker of upstream `{}` (max_connections {workers}): other requests would queue behind it",
                upstream.name
            ));
        }
    }
    warnings
}

fn health_check(raw: &RawHealthCheck) -> HealthCheckConfig {
    HealthCheckConfig {
        path: raw.path.clone(),
        interval: raw.interval.map_or(Duration::from_secs(5), |d| d.0),
        timeout: raw.timeout.map_or(Duration::from_secs(2), |d| d.0),
    }
}

impl UpstreamConfig {
    /// One server with every other setting at its default.
    pub fn single(name: &str, server: UpstreamAddress) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            servers: vec![server],
            balance: Balance::LeastOutstanding,
            max_connections: None,
            max_queue: 1000,
            queue_timeout: Duration::from_secs(30),
            worker_timeout: None,
            health_check: None,
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
            preserve_host: false,
            keepalive_timeout: Duration::from_secs(1),
            max_idle_connections: 32,
        }
    }

    /// The servers as the config wrote them, for messages.
    pub fn describe_servers(&self) -> String {
        let servers: Vec<String> = self.servers.iter().map(|s| s.to_string()).collect();
        servers.join(", ")
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("invalid listen address `{text}`: write it as IP:port, like \"127.0.0.1:8088\" or \"[::]:80\"")
    })
}

fn parse_method(name: &str) -> Result<Method, String> {
    let upper = name.to_ascii_uppercase();
    Method::from_bytes(upper.as_bytes()).map_err(|_| format!("invalid HTTP method `{name}`"))
}

fn parse_upstream_address(text: &str) -> Result<UpstreamAddress, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("unix socket path in `{text}` must be absolute"));
        }
        return Ok(UpstreamAddress::Unix(PathBuf::from(path)));
    }
    if text.starts_with("https://") {
        return Err(
            "TLS to the upstream is not supported: Gunicorn listens in plain HTTP on loopback"
                .into(),
        );
    }
    let authority = text
        .strip_prefix("http://")
        .unwrap_or(text)
        .trim_end_matches('/');
    let valid = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        && http::uri::Authority::try_from(authority).is_ok();
    if !valid {
        return Err(format!(
            "invalid upstream address `{text}`: write host:port (\"127.0.0.1:8080\") or unix:/path/to.sock"
        ));
    }
    Ok(UpstreamAddress::Tcp {
        authority: authority.to_string(),
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "quadrige-proxy".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn empty_config_gets_geonature_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8088".parse().unwrap()]);
        assert_eq!(c.upstreams[0].describe_servers(), "127.0.0.1:8080");
        assert_eq!(c.defaults.timeouts, DEFAULT_TIMEOUTS);
        assert_eq!(c.defaults.max_request_body, Size(Some(1 << 30)));
    }

    #[test]
    fn route_timeouts_override_defaults_one_by_one() {
        let c = parse(
            r#"
[defaults]
timeouts = { connect = "2s", idle = "30s" }
[[routes]]
name = "long"
match = { path_prefix = "/x/" }
timeouts = { response_header = "30m" }
"#,
        )
        .unwrap();
        let t = c.routes[0].settings.timeouts;
        assert_eq!(t.connect, Timer::secs(2));
        assert_eq!(t.response_header, Timer::secs(1800));
        assert_eq!(t.idle, Timer::secs(30));
        assert_eq!(t.total, Timer::DISABLED);
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let e = error_of("[server]\nlisten = [\"127.0.0.1:1\"]\nlisten_backlog = 3\n");
        assert!(e.starts_with("test.toml:3:1:"), "{e}");
        assert!(e.contains("listen_backlog"), "{e}");
    }

    #[test]
    fn bad_duration_is_reported_with_its_line_and_column() {
        let e = error_of("[[routes]]\nname = \"a\"\nmatch = { path = \"/a\" }\ntimeouts = { idle = \"5 parsecs\" }\n");
        assert!(e.starts_with("test.toml:4:21:"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn unknown_upstream_names_the_known_ones() {
        let e = error_of(
            "[upstreams.geonature]\naddress = \"127.0.0.1:8080\"\n[[routes]]\nname = \"a\"\nmatch = { path = \"/a\" }\nupstream = \"usershub\"\n",
        );
        assert!(e.starts_with("test.toml:6:12:"), "{e}");
        assert!(e.contains("defined upstreams: geonature"), "{e}");
    }

    #[test]
    fn invalid_regex_and_method_are_rejected() {
        assert!(
            error_of("[[routes]]\nname = \"a\"\nmatch = { path_regex = \"(\" }\n")
                .contains("path_regex")
        );
        assert!(
            error_of("[[routes]]\nname = \"a\"\nmatch = { methods = [\"G ET\"] }\n")
                .contains("method")
        );
    }

    #[test]
    fn empty_match_and_duplicate_names_are_rejected() {
        assert!(error_of("[[routes]]\nname = \"a\"\nmatch = {}\n").contains("`match` is empty"));
        let dup = "[[routes]]\nname = \"a\"\nmatch = { path = \"/a\" }\n[[routes]]\nname = \"a\"\nmatch = { path = \"/b\" }\n";
        assert!(error_of(dup).contains("two routes are named"));
    }

    #[test]
    fn upstream_addresses_accept_apache_style_urls_and_unix_sockets() {
        assert_eq!(
            parse_upstream_address("http://127.0.0.1:8000/").unwrap(),
            UpstreamAddress::Tcp {
                authority: "127.0.0.1:8000".into()
            }
        );
        assert_eq!(
            parse_upstream_address("unix:/run/gn.sock").unwrap(),
            UpstreamAddress::Unix("/run/gn.sock".into())
        );
        assert!(parse_upstream_address("127.0.0.1").is_err());
        assert!(parse_upstream_address("https://x:1").is_err());
    }
}
