//! The serde mirror of the TOML file, exactly as an operator writes it.
//!
//! Nothing here is trusted: `config::Config::from_raw` checks every cross-reference and
//! builds the validated types. Unknown keys are rejected so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::units::{RequiredDuration, Size, Timer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    pub maintenance: Option<Spanned<RawMaintenance>>,
    pub admin: Option<Spanned<RawAdmin>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
    pub allow: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<Vec<String>>>,
    pub header_read_timeout: Option<RequiredDuration>,
    pub shutdown_grace: Option<RequiredDuration>,
    /// Sent upstream as `X-Forwarded-Server`; the host name when absent.
    pub name: Option<String>,
    pub graphql_peek_limit: Option<Spanned<Size>>,
    /// Worker threads; the number of CPUs when absent.
    pub workers: Option<Spanned<i64>>,
    /// Served at `/.well-known/acme-challenge/` on every listener (certbot --webroot).
    pub acme_challenge_root: Option<String>,
    pub tls: Option<Spanned<RawTls>>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: Spanned<Vec<String>>,
    pub certificate: String,
    pub key: String,
    pub hsts: Option<Spanned<String>>,
    pub redirect_http: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaintenance {
    pub enabled: Option<bool>,
    pub flag_file: Option<String>,
    pub page: Option<String>,
    pub path_prefix: Option<String>,
    pub retry_after: Option<RequiredDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub access: Option<String>,
    pub format: Option<Spanned<String>>,
    pub level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub address: Option<Spanned<String>>,
    pub servers: Option<Spanned<Vec<String>>>,
    pub balance: Option<Spanned<String>>,
    #[serde(default)]
    pub preserve_host: bool,
    pub keepalive_timeout: Option<RequiredDuration>,
    pub max_idle_connections: Option<usize>,
    pub max_connections: Option<Spanned<usize>>,
    pub max_queue: Option<usize>,
    pub queue_timeout: Option<RequiredDuration>,
    pub worker_timeout: Option<RequiredDuration>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<RequiredDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: String,
    pub interval: Option<RequiredDuration>,
    pub timeout: Option<RequiredDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    pub max_request_body: Option<Size>,
    pub compress: Option<Spanned<RawCompress>>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<Timer>,
    pub response_header: Option<Timer>,
    pub idle: Option<Timer>,
    pub total: Option<Timer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    #[serde(rename = "match")]
    pub matcher: Spanned<RawMatch>,
    pub upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    pub max_request_body: Option<Size>,
    pub compress: Option<Spanned<RawCompress>>,
    /// Serve files from disk instead of forwarding.
    #[serde(rename = "static")]
    pub static_files: Option<Spanned<RawStatic>>,
    pub max_concurrent: Option<usize>,
    pub on_limit: Option<Spanned<String>>,
    pub allow: Option<Spanned<Vec<String>>>,
    pub deny: Option<Spanned<Vec<String>>>,
    pub client_max_concurrent: Option<u32>,
    pub client_rate: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatic {
    pub root: Option<String>,
    pub roots: Option<Vec<String>>,
    pub strip_prefix: Option<String>,
    pub index: Option<String>,
    pub precompressed: Option<bool>,
    pub allow_symlinks_outside: Option<bool>,
    pub cache_control: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompress {
    pub types: Vec<String>,
    pub min_size: Option<Size>,
    pub algorithms: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub path_regex: Option<Spanned<String>>,
    pub methods: Option<Spanned<Vec<String>>>,
    pub graphql_operations: Option<Spanned<Vec<String>>>,
}
