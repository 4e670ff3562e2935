//! quadrige-proxy: a streaming HTTP reverse proxy with per-route timeouts, made to
//! replace Apache httpd in front of GeoNature's Gunicorn.
//!
//! A request's journey:
//! 1. [`server`] accepts the connection and parses the request head with hyper, under
//!    the slowloris guard.
//! 2. [`proxy`] runs the phases: **route** ([`route`], with the [`graphql`] peek when a
//!    route needs the operation name) → **admit** (body limits) → **forward** (an
//!    [`upstream`] pooled connection, which the request's own task drives: it writes the
//!    head and body, and reads the response, under the connect, upload-idle and
//!    response-header timers) → **respond** (headers rewritten, body streamed).
//!    Static routes skip forwarding: [`static_files`] answers from disk. Either answer
//!    may then be compressed on the fly by [`compress`].
//! 3. [`body`] streams both directions with backpressure and keeps the idle and total
//!    timers running after the head is sent, aborting the transfer when one fires.
//! 4. [`access_log`] writes the exchange when its response body is done.
//!
//! Everything per-route comes from [`config`], validated once at start-up.

pub mod access_log;
pub mod admin;
pub mod apache_import;
pub mod body;
pub mod budget;
pub mod compress;
pub mod config;
mod escape;
pub mod graphql;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod server;
pub mod static_files;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use server::{Server, ServerError};
