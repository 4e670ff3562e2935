//! The access log: one line per exchange, in Apache's `combined` format (what goaccess
//! and fail2ban read) or as JSON with the route, timings and request id.
//!
//! An [`Exchange`] record travels with the response body and is written when that body
//! is dropped, so every exchange is logged exactly once with its final status and byte
//! count, aborted transfers included. Lines go through a bounded channel to a writer
//! thread: a slow disk never blocks a request, and when the channel is full lines are
//! counted as dropped instead of piling up in memory.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Version};
use tokio::time::Instant;

use crate::config::{AccessLogFormat, AccessLogTarget, LogConfig};
use crate::escape;
use crate::metrics::{self, LiveGuard, RouteMetrics};
use crate::route::Route;
use crate::server::io::ExchangeUnderWay;

/// Where access lines go.
pub struct AccessLog {
    sink: Option<SyncSender<String>>,
    format: AccessLogFormat,
    /// Lines lost because the writer could not keep up.
    pub dropped: AtomicU64,
}

const QUEUE_LINES: usize = 16 * 1024;

impl AccessLog {
    /// Opens the configured target and starts its writer thread.
    pub fn open(config: &LogConfig) -> io::Result<Arc<AccessLog>> {
        let writer: Box<dyn Write + Send> = match &config.access {
            AccessLogTarget::Off => return Ok(AccessLog::disabled()),
            AccessLogTarget::Stdout => Box::new(io::stdout()),
            AccessLogTarget::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (sender, receiver) = mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(receiver, writer))?;
        Ok(Arc::new(AccessLog {
            sink: Some(sender),
            format: config.format,
            dropped: AtomicU64::new(0),
        }))
    }

    pub fn disabled() -> Arc<AccessLog> {
        Arc::new(AccessLog {
            sink: None,
            format: AccessLogFormat::Combined,
            dropped: AtomicU64::new(0),
        })
    }

    /// A copy of a request header the log line will show, none when nothing is logged.
    fn detached_header(
        &self,
        request: &http::request::Parts,
        name: http::header::HeaderName,
    ) -> Option<HeaderValue> {
        let value = request.headers.get(name).filter(|_| self.sink.is_some())?;
        HeaderValue::from_bytes(value.as_bytes()).ok()
    }

    fn write(&self, exchange: &Exchange) {
        let Some(sink) = &self.sink else { return };
        let line = match self.format {
            AccessLogFormat::Combined => exchange.combined_line(),
            AccessLogFormat::Json => exchange.json_line(),
        };
        match sink.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes whatever is queued, then flushes once: a burst costs one write call.
fn write_lines(receiver: Receiver<String>, mut writer: Box<dyn Write + Send>) {
    let mut buffer = io::BufWriter::with_capacity(64 * 1024, &mut writer);
    while let Ok(line) = receiver.recv() {
        let _ = buffer.write_all(line.as_bytes());
        while let Ok(line) = receiver.try_recv() {
            let _ = buffer.write_all(line.as_bytes());
        }
        let _ = buffer.flush();
    }
}

/// nginx's status for a request whose client left before the response head.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What the log phase needs to know about one request.
///
/// It lives as long as the response body, minutes for a big download, so it keeps
/// nothing of the parsed request: hyper's header values and target are views into the
/// connection's 8 KiB read buffer, and one clone would keep that buffer allocated for
/// the whole transfer (measured: 8 KiB more per slow download).
pub struct Exchange {
    log: Arc<AccessLog>,
    pub started: Instant,
    wall: SystemTime,
    client: IpAddr,
    method: Method,
    /// The request target (path and query, `*` for none), copied.
    pub target: Arc<str>,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    pub request_id: HeaderValue,
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
    pub status: u16,
    pub bytes_sent: u64,
    /// The route's counters, fed when the exchange ends.
    metrics: Option<Arc<RouteMetrics>>,
    /// How long the upstream took to send its response head.
    pub response_header_after: Option<Duration>,
    /// The route's idle time, which also bounds how long a client may take nothing.
    pub client_idle: Option<Duration>,
    /// Why the transfer was cut short, if it was.
    outcome: Option<String>,
    /// The request's status-page entry: listed exactly as long as this record lives,
    /// which is as long as the response body, without a box of its own.
    listed: Option<LiveGuard>,
    /// The client connection's mark of an exchange under way: the connection may park
    /// once this record is written (see `server::connection`).
    under_way: Option<ExchangeUnderWay>,
}

impl Exchange {
    pub fn begin(
        log: Arc<AccessLog>,
        request: &http::request::Parts,
        client: IpAddr,
        request_id: HeaderValue,
    ) -> Box<Exchange> {
        let referer = log.detached_header(request, http::header::REFERER);
        let user_agent = log.detached_header(request, http::header::USER_AGENT);
        Box::new(Exchange {
            log,
            started: Instant::now(),
            wall: SystemTime::now(),
            client,
            method: request.method.clone(),
            target: Arc::from(request.uri.path_and_query().map_or("*", |pq| pq.as_str())),
            version: request.version,
            referer,
            user_agent,
            request_id,
            route: metrics::unrouted(),
            upstream: None,
            status: 0,
            bytes_sent: 0,
            metrics: None,
            response_header_after: None,
            client_idle: None,
            outcome: None,
            listed: None,
            under_way: None,
        })
    }

    /// Keeps the client connection marked busy until this record is written.
    pub fn keep_under_way(&mut self, mark: ExchangeUnderWay) {
        self.under_way = Some(mark);
    }

    /// Keeps the request listed on the status page until this record is written.
    pub fn keep_listed(&mut self, live: LiveGuard) {
        self.listed = Some(live);
    }

    /// The route is known: name it in the log and count the exchange in its metrics.
    pub fn enter_route(&mut self, route: &Route) {
        self.route = route.name.clone();
        self.client_idle = route.settings.timeouts.idle.0;
        route.metrics.in_flight.inc();
        self.metrics = Some(route.metrics.clone());
    }

    /// The route's counters, once the route is known.
    pub fn metrics(&self) -> Option<&RouteMetrics> {
        self.metrics.as_deref()
    }

    pub fn abort(&mut self, reason: String) {
        self.outcome = Some(reason);
    }

    /// The response body was dropped before its end with no other reason recorded: the
    /// client left, or the server stopped after its grace. A HEAD response's body is
    /// never sent, so it is not one.
    pub fn body_left_unfinished(&mut self) {
        if self.outcome.is_none() && self.method != Method::HEAD {
            self.outcome = Some(format!(
                "the connection to the client closed after {} bytes of the response body",
                self.bytes_sent
            ));
        }
    }

    /// No response head was ever sent: the client left while the request was queued or
    /// the upstream was working (or the server stopped after its grace). Logged as nginx
    /// does (499, "client closed request"), not as a status 0 that log tools reject.
    fn record_closed_before_head(&mut self) {
        self.status = CLIENT_CLOSED_REQUEST;
        if self.outcome.is_none() {
            self.outcome = Some(format!(
                "the connection to the client closed before the response head, after {} ms",
                self.started.elapsed().as_millis()
            ));
        }
    }

    fn combined_line(&self) -> String {
        let mut line = String::with_capacity(256);
        let _ = write!(line, "{} - - [", self.client);
        write_clf_time(&mut line, self.wall);
        line.push_str("] \"");
        escape::apache_log_into(&mut line, self.request_line().as_bytes());
        let _ = write!(line, "\" {} ", self.status);
        match self.bytes_sent {
            0 => line.push('-'),
            n => {
                let _ = write!(line, "{n}");
            }
        }
        for header in [&self.referer, &self.user_agent] {
            line.push_str(" \"");
            match header {
                Some(v) => escape::apache_log_into(&mut line, v.as_bytes()),
                None => line.push('-'),
            }
            line.push('"');
        }
        line.push('\n');
        line
    }

    fn json_line(&self) -> String {
        let mut line = String::with_capacity(384);
        let millis = self
            .wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let _ = write!(
            line,
            "{{\"time_unix_ms\":{millis},\"client\":\"{}\",\"request\":\"",
            self.client
        );
        escape::json_into(&mut line, &self.request_line());
        let _ = write!(
            line,
            "\",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3}",
            self.status,
            self.bytes_sent,
            self.started.elapsed().as_secs_f64() * 1000.0
        );
        if let Some(d) = self.response_header_after {
            let _ = write!(
                line,
                ",\"response_header_ms\":{:.3}",
                d.as_secs_f64() * 1000.0
            );
        }
        let fields = [
            ("route", Some(self.route.as_ref())),
            ("upstream", self.upstream.as_deref()),
            ("request_id", self.request_id.to_str().ok()),
            (
                "referer",
                self.referer.as_ref().and_then(|v| v.to_str().ok()),
            ),
            (
                "user_agent",
                self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            ),
            ("aborted", self.outcome.as_deref()),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                let _ = write!(line, ",\"{name}\":\"");
                escape::json_into(&mut line, value);
                line.push('"');
            }
        }
        line.push_str("}\n");
        line
    }

    /// As the client wrote it for HTTP/1.1; HTTP/2's `:scheme` and `:authority` are
    /// left out, as Apache does.
    fn request_line(&self) -> String {
        format!("{} {} {:?}", self.method, self.target, self.version)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let cut_after_head = self.outcome.is_some();
        if self.status == 0 {
            self.record_closed_before_head();
        }
        if let Some(m) = &self.metrics {
            m.in_flight.dec();
            m.record_status(self.status);
            m.total_seconds.observe(self.started.elapsed());
            if let Some(head) = self.response_header_after {
                m.response_header_seconds.observe(head);
            }
            m.bytes_sent.add(self.bytes_sent);
            if cut_after_head {
                m.aborted.inc();
            }
        }
        let log = self.log.clone();
        log.write(self);
    }
}

/// Writes `10/Oct/2000:13:55:36 +0000`, the common log format's time, in UTC.
fn write_clf_time(out: &mut String, time: SystemTime) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
}

/// Days since 1970-01-01 to a (year, month, day) date, after Howard Hinnant's
/// `civil_from_days`: exact for the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_matches_apache() {
        let mut s = String::new();
        write_clf_time(&mut s, UNIX_EPOCH + Duration::from_secs(971_186_136));
        assert_eq!(s, "10/Oct/2000:13:55:36 +0000");
        let mut s = String::new();
        write_clf_time(&mut s, UNIX_EPOCH + Duration::from_secs(1_709_164_800));
        assert_eq!(s, "29/Feb/2024:00:00:00 +0000");
    }

    fn exchange() -> Box<Exchange> {
        let request = http::Request::get("/geonature/api/x?a=1")
            .header("referer", "http://h/\"q\"")
            .header("user-agent", "curl/8")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        // A log that is written (here, nowhere): only then are Referer and User-Agent kept.
        let (sink, _unread) = mpsc::sync_channel(1);
        let log = Arc::new(AccessLog {
            sink: Some(sink),
            format: AccessLogFormat::Combined,
            dropped: AtomicU64::new(0),
        });
        let mut ex = Exchange::begin(
            log,
            &request,
            "192.0.2.7".parse().unwrap(),
            HeaderValue::from_static("abc"),
        );
        ex.status = 200;
        ex.bytes_sent = 42;
        ex
    }

    #[test]
    fn combined_line_has_apaches_fields_in_order() {
        let line = exchange().combined_line();
        let after_time = line.split_once("] ").unwrap().1;
        assert!(line.starts_with("192.0.2.7 - - ["), "{line}");
        assert_eq!(
            after_time,
            "\"GET /geonature/api/x?a=1 HTTP/1.1\" 200 42 \"http://h/\\\"q\\\"\" \"curl/8\"\n"
        );
    }

    #[test]
    fn json_line_carries_route_and_request_id() {
        let mut ex = exchange();
        ex.route = Arc::from("quadrige");
        ex.abort("idle timer".into());
        let line = ex.json_line();
        assert!(line.contains("\"route\":\"quadrige\""), "{line}");
        assert!(line.contains("\"request_id\":\"abc\""), "{line}");
        assert!(line.contains("\"aborted\":\"idle timer\""), "{line}");
        assert!(line.contains("\"status\":200,\"bytes\":42"), "{line}");
    }
}
