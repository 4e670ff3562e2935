//! Whether a server should get requests: passive failure detection (nginx's
//! `max_fails`/`fail_timeout`) and optional active checks (`GET path` every interval).
//!
//! Passive (only with several servers, as in nginx): `max_fails` failures — connection refused, connection dropped before a
//! response, 502/503/504 from the server — within `fail_timeout` take the server out for
//! `fail_timeout`; then it gets requests again on trial. Active: a failed check takes the
//! server out until a check passes, whatever the passive state says; a check that only
//! timed out while the server had requests of ours in flight counts for nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{header, Request};
use tokio::time::Instant;

use super::pool::Endpoint;
use super::Upstream;
use crate::body::RequestBody;
use crate::config::{HealthCheckConfig, UpstreamConfig};

pub struct Health {
    origin: Instant,
    max_fails: u32,
    fail_timeout: Duration,
    /// Milliseconds after `origin` until which the server is out (passive).
    down_until_ms: AtomicU64,
    /// Failures in the current window: (count, window start).
    window: Mutex<(u32, Instant)>,
    /// The last active check failed.
    check_failed: AtomicBool,
}

impl Health {
    pub fn new(config: &UpstreamConfig) -> Health {
        let origin = Instant::now();
        Health {
            origin,
            max_fails: config.max_fails.max(1),
            fail_timeout: config.fail_timeout,
            down_until_ms: AtomicU64::new(0),
            window: Mutex::new((0, origin)),
            check_failed: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn is_up(&self) -> bool {
        !self.check_failed.load(Ordering::Relaxed)
            && self.down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Counts a failure; returns true when it takes the server out.
    pub fn record_failure(&self) -> bool {
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(window.1) > self.fail_timeout {
            *window = (0, now);
        }
        window.0 += 1;
        if window.0 < self.max_fails {
            return false;
        }
        *window = (0, now);
        let until = self.now_ms() + self.fail_timeout.as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Relaxed);
        true
    }

    /// An active check's verdict; returns true when it changed the server's state.
    fn record_check(&self, healthy: bool) -> bool {
        self.check_failed.swap(!healthy, Ordering::Relaxed) == healthy
    }
}

/// Runs the active check of one server for as long as its upstream exists (a reload
/// builds new upstreams; the old checks then end by themselves).
pub fn spawn_checker(upstream: Weak<Upstream>, endpoint: Weak<Endpoint>, check: HealthCheckConfig) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(check.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let (Some(upstream), Some(endpoint)) = (upstream.upgrade(), endpoint.upgrade()) else {
                return;
            };
            let healthy = match tokio::time::timeout(check.timeout, probe(&endpoint, &check.path))
                .await
            {
                Ok(healthy) => healthy,
                Err(_) if endpoint.in_flight.load(Ordering::Relaxed) > 0 => {
                    // Gunicorn's sync workers take one request each: while ours keep them
                    // all busy (a long export), the probe waits in its backlog. The server
                    // is busy, not down; taking it out would turn every request away with
                    // 503 instead of letting it wait for a worker. If it has hung, the
                    // routes' timers end our requests and the next probe decides.
                    tracing::debug!(
                        upstream = %upstream.name,
                        server = %endpoint.address,
                        "health check timed out while requests of ours are in flight: inconclusive"
                    );
                    continue;
                }
                Err(_) => false,
            };
            if endpoint.health.record_check(healthy) {
                tracing::warn!(
                    upstream = %upstream.name,
                    server = %endpoint.address,
                    path = %check.path,
                    "health check: server is {}",
                    if healthy { "back up" } else { "DOWN" }
                );
                upstream.metrics.health_changes.inc();
                if healthy {
                    upstream.dispatch();
                }
            }
        }
    });
}

/// One `GET path` on a fresh connection: healthy when it answers 2xx or 3xx.
async fn probe(endpoint: &Arc<Endpoint>, path: &str) -> bool {
    let Ok(mut connection) = endpoint.connect(None).await else {
        return false;
    };
    let Ok(mut request) = Request::get(path)
        .header(header::HOST, endpoint.host_header.clone())
        .header(header::USER_AGENT, "quadrige-proxy-health-check")
        .body(RequestBody::empty())
    else {
        return false;
    };
    match connection
        .send(
            &mut request,
            &super::ExtraFields::default(),
            tokio::time::Instant::now(),
        )
        .await
    {
        Ok(response) => response.status().is_success() || response.status().is_redirection(),
        Err(_) => false,
    }
}
