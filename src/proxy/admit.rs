//! The admit phase: who may use a route, how many at once, and how often.
//!
//! In order: the route's access rules (`allow`/`deny`, 403), the per-client limits
//! (`client_max_concurrent`, `client_rate`, 429), the route's own cap (`max_concurrent`,
//! queue or 503), then a slot on an upstream server (FIFO queue, 503). A request capped
//! by its route waits for its route *before* it queues for the upstream, so queued
//! extractions never stand in front of short requests in the upstream's queue: with long
//! routes capped below `max_connections`, the remaining workers always serve the rest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{OnLimit, Rate, RouteSettings};

/// Why the admit phase refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this address may not use this route (allow/deny rules)")]
    Forbidden,
    #[error(
        "too many requests from this address on this route at once (client_max_concurrent = {0})"
    )]
    ClientConcurrency(u32),
    #[error("too many requests from this address on this route (client_rate {0} per {1:?})")]
    ClientRate(u32, Duration),
    #[error("this route already runs its maximum of {0} requests at once (max_concurrent)")]
    RouteBusy(usize),
}

/// A route's runtime gate: its concurrency cap and per-client bookkeeping.
#[derive(Debug)]
pub struct RouteGate {
    concurrency: Option<(Arc<Semaphore>, usize, OnLimit)>,
    clients: Option<ClientTable>,
}

impl RouteGate {
    pub fn new(settings: &RouteSettings) -> RouteGate {
        let limits = settings.limits;
        let clients = (limits.client_max_concurrent.is_some() || limits.client_rate.is_some())
            .then(|| ClientTable {
                max_concurrent: limits.client_max_concurrent,
                rate: limits.client_rate,
                entries: Arc::new(Mutex::new(HashMap::new())),
            });
        RouteGate {
            concurrency: limits
                .max_concurrent
                .map(|n| (Arc::new(Semaphore::new(n)), n, limits.on_limit)),
            clients,
        }
    }

    /// Counts the client in; the guard counts it out when dropped.
    pub fn admit_client(&self, client: IpAddr) -> Result<Option<ClientGuard>, (Refusal, Duration)> {
        match &self.clients {
            None => Ok(None),
            Some(table) => table.admit(client).map(Some),
        }
    }

    /// A place under the route's cap: at once, after waiting up to `wait`, or refused.
    pub async fn admit_route(
        &self,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        let Some((semaphore, max, on_limit)) = &self.concurrency else {
            return Ok(None);
        };
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        if *on_limit == OnLimit::Reject {
            return Err(Refusal::RouteBusy(*max));
        }
        match tokio::time::timeout(wait, semaphore.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(Refusal::RouteBusy(*max)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ClientState {
    in_flight: u32,
    /// Token bucket for the rate: tokens left and when they were counted.
    tokens: f64,
    counted_at: Instant,
}

/// Per-client-address counters for one route.
#[derive(Debug)]
struct ClientTable {
    max_concurrent: Option<u32>,
    rate: Option<Rate>,
    entries: Arc<Mutex<HashMap<IpAddr, ClientState>>>,
}

/// Above this many tracked addresses, idle ones are forgotten.
const MAX_TRACKED_CLIENTS: usize = 10_000;

impl ClientTable {
    fn admit(&self, client: IpAddr) -> Result<ClientGuard, (Refusal, Duration)> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_TRACKED_CLIENTS {
            let rate = self.rate;
            entries.retain(|_, s| {
                s.in_flight > 0 || rate.is_some_and(|r| refill(s, r, now) < f64::from(r.requests))
            });
        }
        let capacity = self.rate.map_or(0.0, |r| f64::from(r.requests));
        let state = entries.entry(client).or_insert(ClientState {
            in_flight: 0,
            tokens: capacity,
            counted_at: now,
        });
        if let Some(max) = self.max_concurrent.filter(|max| state.in_flight >= *max) {
            return Err((Refusal::ClientConcurrency(max), Duration::from_secs(1)));
        }
        if let Some(rate) = self.rate {
            let tokens = refill(state, rate, now);
            if tokens < 1.0 {
                let per_token = rate.per.as_secs_f64() / f64::from(rate.requests);
                let wait = Duration::from_secs_f64((1.0 - tokens) * per_token);
                return Err((Refusal::ClientRate(rate.requests, rate.per), wait));
            }
            state.tokens = tokens - 1.0;
            state.counted_at = now;
        }
        state.in_flight += 1;
        Ok(ClientGuard {
            entries: self.entries.clone(),
            client,
        })
    }
}

/// The bucket's tokens at `now` (without storing them).
fn refill(state: &ClientState, rate: Rate, now: Instant) -> f64 {
    let per_second = f64::from(rate.requests) / rate.per.as_secs_f64();
    let elapsed = now.duration_since(state.counted_at).as_secs_f64();
    (state.tokens + elapsed * per_second).min(f64::from(rate.requests))
}

/// Counts one request of a client on a route until dropped.
#[derive(Debug)]
pub struct ClientGuard {
    entries: Arc<Mutex<HashMap<IpAddr, ClientState>>>,
    client: IpAddr,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = entries.get_mut(&self.client) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteLimits;

    fn gate(limits: RouteLimits) -> RouteGate {
        let mut settings = crate::config::Config::parse("", std::path::Path::new("t.toml"))
            .unwrap()
            .defaults;
        settings.limits = limits;
        RouteGate::new(&settings)
    }

    #[tokio::test]
    async fn client_concurrency_is_counted_per_address_and_released_on_drop() {
        let g = gate(RouteLimits {
            client_max_concurrent: Some(1),
            ..RouteLimits::NONE
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = g.admit_client(a).unwrap();
        assert_eq!(
            g.admit_client(a).unwrap_err().0,
            Refusal::ClientConcurrency(1)
        );
        assert!(g.admit_client(b).is_ok());
        drop(first);
        assert!(g.admit_client(a).is_ok());
    }

    #[tokio::test]
    async fn client_rate_refuses_beyond_the_burst_and_says_when_to_retry() {
        let rate = Rate {
            requests: 2,
            per: Duration::from_secs(60),
        };
        let g = gate(RouteLimits {
            client_rate: Some(rate),
            ..RouteLimits::NONE
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        drop(g.admit_client(a).unwrap());
        drop(g.admit_client(a).unwrap());
        let (refusal, retry) = g.admit_client(a).unwrap_err();
        assert_eq!(refusal, Refusal::ClientRate(2, Duration::from_secs(60)));
        assert!(
            retry > Duration::from_secs(25) && retry <= Duration::from_secs(30),
            "{retry:?}"
        );
    }

    #[tokio::test]
    async fn a_rejecting_route_cap_refuses_at_once_and_a_queueing_one_waits() {
        let reject = gate(RouteLimits {
            max_concurrent: Some(1),
            on_limit: OnLimit::Reject,
            ..RouteLimits::NONE
        });
        let held = reject.admit_route(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            reject
                .admit_route(Duration::from_secs(5))
                .await
                .unwrap_err(),
            Refusal::RouteBusy(1)
        );
        drop(held);
        let queue = gate(RouteLimits {
            max_concurrent: Some(1),
            ..RouteLimits::NONE
        });
        let held = queue.admit_route(Duration::from_secs(5)).await.unwrap();
        let waiting =
            tokio::spawn(async move { queue.admit_route(Duration::from_secs(5)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert!(waiting.await.unwrap());
    }
}
