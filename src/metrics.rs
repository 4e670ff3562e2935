//! Counters, gauges and histograms, allocated once per route and per upstream when the
//! configuration is built (as Envoy does), so recording is a few relaxed atomic
//! additions: no lock, no allocation, no label lookup on the request path. Also the
//! registry of requests in flight that the status page lists.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds in seconds: from a fast API call to a 60-minute extraction.
const BOUNDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// A latency histogram with fixed buckets (Prometheus `le` semantics when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let index = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// The `q` quantile (0..1) as the upper bound of the bucket holding it.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(BOUNDS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let counts = self.counts();
        let mut cumulative = 0;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Everything counted for one route.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// Responses by status class: 1xx..5xx.
    pub responses: [Counter; 5],
    pub response_header_seconds: Histogram,
    pub total_seconds: Histogram,
    pub in_flight: Gauge,
    pub queued: Gauge,
    /// Requests refused by admission control (503).
    pub refused: Counter,
    /// 403 (access rules) and 429 (per-client limits).
    pub forbidden: Counter,
    pub rate_limited: Counter,
    /// Timer expiries by timer: connect, response_header, idle, total.
    pub timeouts: [Counter; 4],
    pub bytes_sent: Counter,
    /// Transfers aborted after the response head.
    pub aborted: Counter,
    /// Request body bytes forwarded upstream.
    pub bytes_received: Counter,
}

impl RouteMetrics {
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].inc();
    }

    pub fn error_rate(&self) -> f64 {
        let total: u64 = self.responses.iter().map(Counter::get).sum();
        if total == 0 {
            return 0.0;
        }
        self.responses[4].get() as f64 / total as f64
    }
}

/// Everything counted for one upstream.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    pub connect_failed: Counter,
    pub connect_timeout: Counter,
    pub closed_early: Counter,
    pub invalid_response: Counter,
    pub io_error: Counter,
    /// Failures that look like Gunicorn killing a worker at its --timeout.
    pub worker_kills: Counter,
    pub retries: Counter,
    pub queue_full: Counter,
    pub queue_timeout: Counter,
    pub health_changes: Counter,
}

pub const TIMER_NAMES: [&str; 4] = ["connect", "response_header", "idle", "total"];

/// Prometheus' text format wants every sample of a family together, after one TYPE line.
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition {
            out: String::with_capacity(16 * 1024),
        }
    }

    /// One family: `rows` are (labels, value) pairs, labels already rendered.
    pub fn family<I>(&mut self, name: &str, kind: &str, help: &str, rows: I)
    where
        I: IntoIterator<Item = (String, f64)>,
    {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            if labels.is_empty() {
                let _ = writeln!(self.out, "{name} {value}");
            } else {
                let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
            }
        }
    }

    /// One histogram family over several label sets.
    pub fn histograms<'a, I>(&mut self, name: &str, help: &str, rows: I)
    where
        I: IntoIterator<Item = (String, &'a Histogram)>,
    {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (labels, histogram) in rows {
            histogram.render(&mut self.out, name, &labels);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Default for Exposition {
    fn default() -> Self {
        Exposition::new()
    }
}

/// Escapes a Prometheus label value.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Where a request in flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Routing = 0,
    Queued = 1,
    Connecting = 2,
    WaitingForUpstream = 3,
    Streaming = 4,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Routing => "routing",
            Stage::Queued => "queued",
            Stage::Connecting => "connecting",
            Stage::WaitingForUpstream => "waiting for the upstream",
            Stage::Streaming => "streaming",
        }
    }

    fn from_u8(value: u8) -> Stage {
        match value {
            1 => Stage::Queued,
            2 => Stage::Connecting,
            3 => Stage::WaitingForUpstream,
            4 => Stage::Streaming,
            _ => Stage::Routing,
        }
    }
}

/// A route name that is no configured route's: `-` before routing, `(refused)`,
/// `(maintenance)`... Every request starts with one, so each thread keeps one `Arc` of
/// each, made at its first use: a clone is then neither an allocation nor a write to a
/// reference count that every worker thread writes.
pub fn fixed_name(name: &'static str) -> Arc<str> {
    thread_local! {
        static NAMES: RefCell<Vec<(&'static str, Arc<str>)>> = const { RefCell::new(Vec::new()) };
    }
    NAMES
        .try_with(|names| {
            let mut names = names.borrow_mut();
            if let Some((_, shared)) = names.iter().find(|(known, _)| *known == name) {
                return shared.clone();
            }
            let shared = Arc::<str>::from(name);
            names.push((name, shared.clone()));
            shared
        })
        // Only while the thread's locals are torn down.
        .unwrap_or_else(|_| Arc::from(name))
}

/// The route name of a request not routed yet.
pub fn unrouted() -> Arc<str> {
    fixed_name("-")
}

/// One request in flight, as the status page shows it.
#[derive(Debug)]
pub struct Tracked {
    pub started: Instant,
    pub client: IpAddr,
    /// The status page's text is made when the page is asked for, not for every
    /// request. The target is the exchange's own copy (see `access_log::Exchange`).
    method: Method,
    target: Arc<str>,
    pub route: Mutex<Arc<str>>,
    stage: AtomicU8,
}

/// Longest request text the status page shows, in bytes, before `…`.
const REQUEST_TEXT_MAX: usize = 160;

impl Tracked {
    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Ordering::Relaxed))
    }

    pub fn set_route(&self, route: &Arc<str>) {
        *self.route.lock().unwrap_or_else(|e| e.into_inner()) = route.clone();
    }

    /// Method and path, cut to a readable length.
    pub fn request(&self) -> String {
        let path = self.target.split('?').next().unwrap_or_default();
        let mut request = format!("{} {path}", self.method);
        if request.len() > REQUEST_TEXT_MAX {
            let cut = (0..=REQUEST_TEXT_MAX)
                .rev()
                .find(|i| request.is_char_boundary(*i))
                .unwrap_or(0);
            request.truncate(cut);
            request.push('…');
        }
        request
    }
}

/// Shards of the registry of requests in flight: worker threads registering and
/// forgetting requests at the same time mostly take different locks.
const LIVE_SHARDS: usize = 16;

/// One shard, on a cache line of its own so that neighbouring locks do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(Mutex<HashMap<u64, Arc<Tracked>>>);

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The requests in flight, for the status page.
#[derive(Debug, Default)]
pub struct Live {
    next: AtomicU64,
    shards: [Shard; LIVE_SHARDS],
}

impl Live {
    /// Registers a request; it is listed until the returned guard is dropped.
    pub fn track(
        self: &Arc<Self>,
        client: IpAddr,
        method: &Method,
        target: &Arc<str>,
    ) -> LiveGuard {
        let tracked = Arc::new(Tracked {
            started: Instant::now(),
            client,
            method: method.clone(),
            target: target.clone(),
            route: Mutex::new(unrouted()),
            stage: AtomicU8::new(Stage::Routing as u8),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(id).lock().insert(id, tracked.clone());
        LiveGuard {
            live: self.clone(),
            id,
            tracked,
        }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id % LIVE_SHARDS as u64) as usize]
    }

    /// The requests in flight, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Tracked>> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(shard.lock().values().cloned());
        }
        all.sort_by_key(|t| t.started);
        all
    }
}

/// Keeps a request listed in [`Live`] while it lives.
#[derive(Debug)]
pub struct LiveGuard {
    live: Arc<Live>,
    id: u64,
    pub tracked: Arc<Tracked>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.shard(self.id).lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_without_labels_is_written_without_braces() {
        let mut e = Exposition::new();
        e.family("g", "gauge", "help", [(String::new(), 2.0)]);
        e.family("c", "counter", "help", [("route=\"r\"".to_string(), 1.0)]);
        let out = e.finish();
        assert!(out.contains("\ng 2\n"), "{out}");
        assert!(out.contains("\nc{route=\"r\"} 1\n"), "{out}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_when_rendered() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(200));
        h.observe(Duration::from_secs(7200));
        let mut out = String::new();
        h.render(&mut out, "x", "route=\"r\"");
        let mut e = Exposition::new();
        e.histograms("y", "help", [("route=\"r\"".to_string(), &h)]);
        let family = e.finish();
        assert!(
            family.starts_with("# HELP y help\n# TYPE y histogram\ny_bucket{"),
            "{family}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"0.005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"0.25\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"3600\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{route=\"r\"} 3\n"), "{out}");
        assert_eq!(h.quantile(0.5), Some(0.25));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn live_lists_requests_until_their_guard_drops() {
        let live = Arc::new(Live::default());
        let client = "192.0.2.1".parse().unwrap();
        let guard = live.track(client, &Method::GET, &Arc::from("/x?y=1"));
        guard.tracked.set_stage(Stage::Queued);
        let later = live.track(client, &Method::POST, &Arc::from("/z"));
        let listed = live.snapshot();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].stage(), Stage::Queued);
        assert_eq!(listed[0].request(), "GET /x");
        assert_eq!(listed[1].request(), "POST /z");
        assert_eq!(&**listed[1].route.lock().unwrap(), "-");
        drop((guard, listed));
        assert_eq!(live.snapshot().len(), 1);
        drop(later);
        assert!(live.snapshot().is_empty());
    }

    #[test]
    fn long_requests_are_cut_on_a_character_boundary() {
        let live = Arc::new(Live::default());
        let path = format!("/{}", "é".repeat(100));
        let guard = live.track(
            "192.0.2.1".parse().unwrap(),
            &Method::GET,
            &Arc::from(path.as_str()),
        );
        let text = guard.tracked.request();
        assert!(text.ends_with('…'), "{text}");
        assert_eq!(text.len(), 159 + '…'.len_utf8(), "{text}");
        assert!(format!("GET {path}").starts_with(text.trim_end_matches('…')));
    }

    #[test]
    fn fixed_names_are_shared_within_a_thread() {
        assert!(Arc::ptr_eq(&unrouted(), &unrouted()));
        assert_eq!(&*fixed_name("(refused)"), "(refused)");
        assert!(!Arc::ptr_eq(&fixed_name("(refused)"), &unrouted()));
    }
}
