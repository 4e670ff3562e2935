//! Why an exchange failed before its response head was sent, and the answer the client
//! gets for it: the right status (502 bad gateway, 504 timer, 408/413 client faults),
//! and a short body saying what happened, on which route, which timer, after how long,
//! with the request id — JSON for API clients, a small HTML page for people.

use std::fmt;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::config::units::human_bytes;
use crate::escape;
use crate::upstream::{AdmitError, ConnectError};

use super::admit::Refusal;

use super::conformance::Malformed;
use super::headers::X_REQUEST_ID;

/// The four per-route upstream timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    Connect = 0,
    ResponseHeader = 1,
    Idle = 2,
    Total = 3,
}

impl TimerKind {
    pub fn key(self) -> &'static str {
        match self {
            TimerKind::Connect => "connect",
            TimerKind::ResponseHeader => "response_header",
            TimerKind::Idle => "idle",
            TimerKind::Total => "total",
        }
    }
}

impl fmt::Display for TimerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// A failure the client learns about through a generated response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not connect to the upstream: {0}")]
    Connect(ConnectError),
    #[error("{}", timeout_message(*.timer, *.limit))]
    Timeout { timer: TimerKind, limit: Duration },
    #[error("the upstream closed the connection without sending a complete response head (a Gunicorn worker killed by its --timeout, or a crash, looks like this)")]
    UpstreamClosed,
    #[error("the upstream's worker failed or was killed while handling the request, and Gunicorn answered with its own error page (500 Internal Server Error); Gunicorn kills a worker at its --timeout: if this request needs longer, raise GUNICORN_TIMEOUT above the route's timers")]
    WorkerFailed,
    #[error("the upstream sent an invalid response: {0}")]
    InvalidResponse(String),
    #[error("the connection to the upstream failed: {0}")]
    UpstreamIo(String),
    #[error("the client sent no request body data for {} (idle timer); the request was not completed", humantime::format_duration(*.limit))]
    ClientBodyTimeout { limit: Duration },
    #[error("the request body is larger than this route's limit of {} (max_request_body)", human_bytes(*.limit))]
    BodyTooLarge { limit: u64 },
    #[error("the client stopped sending its request body before the end")]
    ClientAborted,
    #[error("{refusal}")]
    Refused {
        refusal: Refusal,
        retry_after: Duration,
    },
    #[error("{0}; the request was not sent, try again later")]
    Unavailable(AdmitError, Duration),
    /// Refused before routing: see `conformance`.
    #[error("{0}")]
    Malformed(Malformed),
}

fn timeout_message(timer: TimerKind, limit: Duration) -> String {
    let limit = humantime::format_duration(limit);
    match timer {
        TimerKind::Connect => format!("no connection to the upstream within {limit} (connect timer)"),
        TimerKind::ResponseHeader => format!(
            "the upstream sent no response head within {limit} after receiving the request (response_header timer); if this request needs longer, raise the route's timeouts.response_header and Gunicorn's --timeout"
        ),
        TimerKind::Idle => format!(
            "the upstream stopped reading the request body for {limit} (idle timer)"
        ),
        TimerKind::Total => format!(
            "the exchange did not complete within {limit} (total timer); if this request needs longer, raise the route's timeouts.total"
        ),
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect(ConnectError::Timeout(_)) | ProxyError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Connect(_)
            | ProxyError::UpstreamClosed
            | ProxyError::WorkerFailed
            | ProxyError::InvalidResponse(_)
            | ProxyError::UpstreamIo(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientAborted => StatusCode::BAD_REQUEST,
            ProxyError::Refused { refusal, .. } => match refusal {
                Refusal::Forbidden => StatusCode::FORBIDDEN,
                Refusal::ClientConcurrency(_) | Refusal::ClientRate(..) => {
                    StatusCode::TOO_MANY_REQUESTS
                }
                Refusal::RouteBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            ProxyError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Malformed(m) => m.status(),
        }
    }

    /// When the client may try again, for `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::Refused {
                refusal: Refusal::Forbidden,
                ..
            } => None,
            ProxyError::Refused { retry_after, .. } | ProxyError::Unavailable(_, retry_after) => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// A stable machine-readable name for the failure.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Connect(ConnectError::Timeout(_)) => "upstream_connect_timeout",
            ProxyError::Connect(_) => "upstream_connect_failed",
            ProxyError::Timeout { .. } => "upstream_timeout",
            ProxyError::UpstreamClosed => "upstream_closed",
            ProxyError::WorkerFailed => "upstream_worker_failed",
            ProxyError::InvalidResponse(_) => "upstream_invalid_response",
            ProxyError::UpstreamIo(_) => "upstream_io_error",
            ProxyError::ClientBodyTimeout { .. } => "client_body_timeout",
            ProxyError::BodyTooLarge { .. } => "request_body_too_large",
            ProxyError::ClientAborted => "client_aborted",
            ProxyError::Refused { refusal, .. } => match refusal {
                Refusal::Forbidden => "forbidden",
                Refusal::ClientConcurrency(_) => "client_concurrency_limit",
                Refusal::ClientRate(..) => "client_rate_limit",
                Refusal::RouteBusy(_) => "route_busy",
            },
            ProxyError::Unavailable(AdmitError::QueueFull(_), _) => "upstream_queue_full",
            ProxyError::Unavailable(AdmitError::QueueTimeout(_), _) => "upstream_queue_timeout",
            ProxyError::Unavailable(AdmitError::NoHealthyServer, _) => "no_healthy_server",
            ProxyError::Malformed(m) => m.code(),
        }
    }

    /// The timer that fired, with its limit.
    pub fn timer(&self) -> Option<(TimerKind, Duration)> {
        match self {
            ProxyError::Connect(ConnectError::Timeout(limit)) => Some((TimerKind::Connect, *limit)),
            ProxyError::Timeout { timer, limit } => Some((*timer, *limit)),
            ProxyError::ClientBodyTimeout { limit } => Some((TimerKind::Idle, *limit)),
            _ => None,
        }
    }

    /// Whether the client's connection cannot be reused (its request body was not read).
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::ClientBodyTimeout { .. }
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::ClientAborted
                | ProxyError::Malformed(_)
        )
    }
}

/// Where the failure happened, for the message.
pub struct ErrorContext<'a> {
    pub route: &'a str,
    pub upstream: &'a str,
    pub elapsed: Duration,
    pub request_id: &'a HeaderValue,
    pub json: bool,
}

/// Builds the generated response for `error`.
pub fn error_response(error: &ProxyError, ctx: &ErrorContext<'_>) -> Response<ResponseBody> {
    let status = error.status();
    let (body, content_type) = if ctx.json {
        (json_body(error, ctx), "application/json")
    } else {
        (html_body(error, ctx), "text/html; charset=utf-8")
    };
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
    if error.closes_connection() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let ProxyError::Malformed(Malformed::Connect) = error {
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    if let Some(after) = error.retry_after() {
        // Whole seconds, rounded up: "0" would invite an immediate retry.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

fn json_body(error: &ProxyError, ctx: &ErrorContext<'_>) -> String {
    let mut out = String::with_capacity(512);
    out.push_str("{\"status\":");
    out.push_str(error.status().as_str());
    out.push_str(",\"error\":\"");
    out.push_str(error.code());
    out.push_str("\",\"message\":\"");
    escape::json_into(&mut out, &error.to_string());
    out.push_str("\",\"route\":\"");
    escape::json_into(&mut out, ctx.route);
    out.push_str("\",\"upstream\":\"");
    escape::json_into(&mut out, ctx.upstream);
    out.push('"');
    if let Some((timer, limit)) = error.timer() {
        out.push_str(",\"timer\":\"");
        out.push_str(timer.key());
        out.push_str("\",\"limit\":\"");
        out.push_str(&humantime::format_duration(limit).to_string());
        out.push('"');
    }
    out.push_str(",\"after_ms\":");
    out.push_str(&ctx.elapsed.as_millis().to_string());
    out.push_str(",\"request_id\":\"");
    escape::json_into(&mut out, ctx.request_id.to_str().unwrap_or("-"));
    out.push_str("\"}\n");
    out
}

fn html_body(error: &ProxyError, ctx: &ErrorContext<'_>) -> String {
    let status = error.status();
    let title = format!(
        "{} {}",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    let mut out = String::with_capacity(1024);
    out.push_str("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>");
    out.push_str(&title);
    out.push_str("</title></head>\n<body><h1>");
    out.push_str(&title);
    out.push_str("</h1>\n<p>");
    escape::html_into(&mut out, &error.to_string());
    out.push_str(".</p>\n<ul>\n<li>route: ");
    escape::html_into(&mut out, ctx.route);
    out.push_str("</li>\n<li>upstream: ");
    escape::html_into(&mut out, ctx.upstream);
    out.push_str("</li>\n");
    if let Some((timer, limit)) = error.timer() {
        out.push_str("<li>timer: ");
        out.push_str(timer.key());
        out.push_str(" (");
        out.push_str(&humantime::format_duration(limit).to_string());
        out.push_str(")</li>\n");
    }
    out.push_str("<li>after: ");
    out.push_str(&format!("{:.1} s", ctx.elapsed.as_secs_f64()));
    out.push_str("</li>\n<li>request id: ");
    escape::html_into(&mut out, ctx.request_id.to_str().unwrap_or("-"));
    out.push_str("</li>\n</ul>\n<hr><address>quadrige-proxy</address>\n</body></html>\n");
    out
}

/// Whether the client would rather read JSON: it says so in `Accept`, or it calls an
/// API path without asking for HTML.
pub fn prefers_json(headers: &http::HeaderMap, path: &str) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("json") {
        return true;
    }
    if accept.contains("text/html") {
        return false;
    }
    path.contains("/api/") || path.ends_with("/api") || path.contains("graphql")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(json: bool) -> (HeaderValue, bool) {
        (HeaderValue::from_static("rid"), json)
    }

    #[test]
    fn statuses_follow_the_reference_proxies() {
        let timeout = ProxyError::Timeout {
            timer: TimerKind::ResponseHeader,
            limit: Duration::from_secs(1),
        };
        assert_eq!(timeout.status(), 504);
        assert_eq!(
            ProxyError::Connect(ConnectError::Timeout(Duration::from_secs(1))).status(),
            504
        );
        let refused = ConnectError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(ProxyError::Connect(refused).status(), 502);
        assert_eq!(ProxyError::UpstreamClosed.status(), 502);
        assert_eq!(
            ProxyError::ClientBodyTimeout {
                limit: Duration::from_secs(1)
            }
            .status(),
            408
        );
        assert_eq!(ProxyError::BodyTooLarge { limit: 1 }.status(), 413);
    }

    #[test]
    fn json_body_names_route_timer_and_request_id() {
        let (rid, json) = ctx(true);
        let error = ProxyError::Timeout {
            timer: TimerKind::Total,
            limit: Duration::from_secs(90),
        };
        let c = ErrorContext {
            route: "r\"1",
            upstream: "gn",
            elapsed: Duration::from_millis(90_004),
            request_id: &rid,
            json,
        };
        let body = json_body(&error, &c);
        assert!(
            body.starts_with("{\"status\":504,\"error\":\"upstream_timeout\""),
            "{body}"
        );
        assert!(body.contains("\"route\":\"r\\\"1\""), "{body}");
        assert!(
            body.contains("\"timer\":\"total\",\"limit\":\"1m 30s\",\"after_ms\":90004"),
            "{body}"
        );
        assert!(body.contains("\"request_id\":\"rid\""), "{body}");
    }

    #[test]
    fn browsers_get_html_and_api_clients_json() {
        let mut h = http::HeaderMap::new();
        assert!(prefers_json(&h, "/geonature/api/x"));
        assert!(!prefers_json(&h, "/geonature/index.html"));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html,*/*"));
        assert!(!prefers_json(&h, "/geonature/api/x"));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/plain, */*"),
        );
        assert!(prefers_json(&h, "/x"));
    }
}
