//! The admin listener (`[admin] listen`, loopback only unless `allow` says otherwise):
//! `/metrics` for Prometheus, `/healthz`, `/status.json` with the routes and the live
//! state, and `/`, a status page for people — what Apache's `server-status` and
//! HAProxy's stats page give — that refreshes itself and needs no external asset.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::body::ResponseBody;
use crate::config::Serve;
use crate::escape;
use crate::metrics::{label, Exposition, Histogram, RouteMetrics, TIMER_NAMES};
use crate::proxy::Proxy;
use crate::route::Route;
use crate::upstream::Upstream;

/// Answers one admin request from the current configuration.
/// What the server, not the configuration, knows.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerGauges {
    /// Idle keep-alive client connections parked outside hyper.
    pub parked_connections: usize,
}

pub fn handle<B>(
    proxy: &Proxy,
    server: ServerGauges,
    request: &Request<B>,
) -> Response<ResponseBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics(proxy, server),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/status.json" => reply(StatusCode::OK, "application/json", status_json(proxy)),
        "/" => {
            let refresh = refresh_seconds(request.uri().query());
            reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                status_page(proxy, refresh),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn route_label(route: &Route) -> String {
    format!("route=\"{}\"", label(&route.name))
}

/// The Prometheus exposition of every route, upstream and server.
pub fn metrics(proxy: &Proxy, server: ServerGauges) -> String {
    let routes: Vec<&Route> = proxy.routes().iter().collect();
    let mut e = Exposition::new();
    let per_route = |f: &dyn Fn(&RouteMetrics) -> f64| -> Vec<(String, f64)> {
        routes
            .iter()
            .map(|r| (route_label(r), f(&r.metrics)))
            .collect()
    };
    let by_class: Vec<(String, f64)> = routes
        .iter()
        .flat_map(|r| {
            r.metrics.responses.iter().enumerate().map(move |(i, c)| {
                (
                    format!("{},class=\"{}xx\"", route_label(r), i + 1),
                    c.get() as f64,
                )
            })
        })
        .collect();
    e.family(
        "quadrige_requests_total",
        "counter",
        "Responses by route and status class.",
        by_class,
    );
    let header_h: Vec<(String, &Histogram)> = routes
        .iter()
        .map(|r| (route_label(r), &r.metrics.response_header_seconds))
        .collect();
    e.histograms(
        "quadrige_response_header_seconds",
        "Time to the upstream's response head.",
        header_h,
    );
    let total_h: Vec<(String, &Histogram)> = routes
        .iter()
        .map(|r| (route_label(r), &r.metrics.total_seconds))
        .collect();
    e.histograms(
        "quadrige_request_duration_seconds",
        "Whole exchange, head and body.",
        total_h,
    );
    e.family(
        "quadrige_in_flight",
        "gauge",
        "Requests in flight.",
        per_route(&|m| m.in_flight.get() as f64),
    );
    e.family(
        "quadrige_route_queued",
        "gauge",
        "Requests waiting under the route's max_concurrent.",
        per_route(&|m| m.queued.get() as f64),
    );
    e.family(
        "quadrige_admission_refused_total",
        "counter",
        "Requests refused with 503 by admission control.",
        per_route(&|m| m.refused.get() as f64),
    );
    e.family(
        "quadrige_forbidden_total",
        "counter",
        "Requests refused with 403 by allow/deny.",
        per_route(&|m| m.forbidden.get() as f64),
    );
    e.family(
        "quadrige_rate_limited_total",
        "counter",
        "Requests refused with 429 by per-client limits.",
        per_route(&|m| m.rate_limited.get() as f64),
    );
    let timeouts: Vec<(String, f64)> = routes
        .iter()
        .flat_map(|r| {
            TIMER_NAMES
                .iter()
                .zip(&r.metrics.timeouts)
                .map(move |(t, c)| (format!("{},timer=\"{t}\"", route_label(r)), c.get() as f64))
        })
        .collect();
    e.family(
        "quadrige_timeouts_total",
        "counter",
        "Timer expiries by route and timer.",
        timeouts,
    );
    e.family(
        "quadrige_response_bytes_total",
        "counter",
        "Body bytes sent to clients.",
        per_route(&|m| m.bytes_sent.get() as f64),
    );
    e.family(
        "quadrige_request_bytes_total",
        "counter",
        "Body bytes forwarded upstream.",
        per_route(&|m| m.bytes_received.get() as f64),
    );
    e.family(
        "quadrige_aborted_transfers_total",
        "counter",
        "Transfers cut after the response head.",
        per_route(&|m| m.aborted.get() as f64),
    );
    upstream_families(&mut e, proxy.upstreams());
    e.family(
        "quadrige_client_connections_parked",
        "gauge",
        "Idle keep-alive client connections waiting on their bare socket, buffers freed.",
        [(String::new(), server.parked_connections as f64)],
    );
    e.finish()
}

fn upstream_families(e: &mut Exposition, upstreams: &[std::sync::Arc<Upstream>]) {
    let ul = |u: &Upstream| format!("upstream=\"{}\"", label(&u.name));
    let errors: Vec<(String, f64)> = upstreams
        .iter()
        .flat_map(|u| {
            let m = &u.metrics;
            [
                ("connect_failed", m.connect_failed.get()),
                ("connect_timeout", m.connect_timeout.get()),
                ("closed_early", m.closed_early.get()),
                ("invalid_response", m.invalid_response.get()),
                ("io_error", m.io_error.get()),
            ]
            .map(|(kind, n)| (format!("{},kind=\"{kind}\"", ul(u)), n as f64))
        })
        .collect();
    e.family(
        "quadrige_upstream_errors_total",
        "counter",
        "Upstream failures by kind.",
        errors,
    );
    let each = |f: &dyn Fn(&Upstream) -> f64| -> Vec<(String, f64)> {
        upstreams.iter().map(|u| (ul(u), f(u))).collect()
    };
    e.family(
        "quadrige_gunicorn_worker_kills_total",
        "counter",
        "Gunicorn killing a worker: a failure at about worker_timeout, or Gunicorn's own 500 page.",
        each(&|u| u.metrics.worker_kills.get() as f64),
    );
    e.family(
        "quadrige_upstream_retries_total",
        "counter",
        "Requests sent again (safely) to a server.",
        each(&|u| u.metrics.retries.get() as f64),
    );
    e.family(
        "quadrige_upstream_queued",
        "gauge",
        "Requests waiting for a server slot.",
        each(&|u| u.queued() as f64),
    );
    e.family(
        "quadrige_upstream_queue_full_total",
        "counter",
        "503s because the queue was full.",
        each(&|u| u.metrics.queue_full.get() as f64),
    );
    e.family(
        "quadrige_upstream_queue_timeout_total",
        "counter",
        "503s because queue_timeout passed.",
        each(&|u| u.metrics.queue_timeout.get() as f64),
    );
    let servers = |f: &dyn Fn(&crate::upstream::Endpoint) -> f64| -> Vec<(String, f64)> {
        upstreams
            .iter()
            .flat_map(|u| {
                u.servers().iter().map(move |s| {
                    (
                        format!("{},server=\"{}\"", ul(u), label(&s.address.to_string())),
                        f(s),
                    )
                })
            })
            .collect()
    };
    e.family(
        "quadrige_server_up",
        "gauge",
        "1 when the server gets requests.",
        servers(&|s| f64::from(u8::from(s.health.is_up()))),
    );
    e.family(
        "quadrige_server_in_flight",
        "gauge",
        "Requests in flight on the server.",
        servers(&|s| s.in_flight.load(Ordering::Relaxed) as f64),
    );
    let by_class: Vec<(String, f64)> = upstreams
        .iter()
        .flat_map(|u| {
            u.servers().iter().flat_map(move |s| {
                s.responses.iter().enumerate().map(move |(i, c)| {
                    let server = label(&s.address.to_string());
                    (
                        format!("{},server=\"{server}\",class=\"{}xx\"", ul(u), i + 1),
                        c.get() as f64,
                    )
                })
            })
        })
        .collect();
    e.family(
        "quadrige_server_responses_total",
        "counter",
        "Response heads by server and status class.",
        by_class,
    );
}

fn json_string(out: &mut String, text: &str) {
    out.push('"');
    escape::json_into(out, text);
    out.push('"');
}

fn quantile_ms(h: &Histogram, q: f64) -> String {
    h.quantile(q)
        .filter(|v| v.is_finite())
        .map_or("null".into(), |v| format!("{}", (v * 1000.0).round()))
}

/// The routes, upstreams and requests in flight as JSON.
pub fn status_json(proxy: &Proxy) -> String {
    let mut out = String::from("{\"routes\":[");
    for (i, route) in proxy.routes().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let m = &route.metrics;
        let t = &route.settings.timeouts;
        out.push_str("{\"name\":");
        json_string(&mut out, &route.name);
        out.push_str(",\"match\":");
        json_string(&mut out, &route.describe_match());
        let serve = match &route.serve {
            Serve::Static(_) => "static".to_string(),
            Serve::Proxy => proxy
                .upstreams()
                .get(route.settings.upstream)
                .map_or("-".into(), |u| u.name.to_string()),
        };
        out.push_str(",\"serves\":");
        json_string(&mut out, &serve);
        let _ = write!(
            out,
            ",\"timeouts\":{{\"connect\":\"{}\",\"response_header\":\"{}\",\"idle\":\"{}\",\"total\":\"{}\"}}",
            t.connect, t.response_header, t.idle, t.total
        );
        let classes: Vec<String> = m.responses.iter().map(|c| c.get().to_string()).collect();
        let _ = write!(
            out,
            ",\"responses\":[{}],\"in_flight\":{},\"queued\":{},\"refused\":{},\"error_rate\":{:.4},\"total_p50_ms\":{},\"total_p99_ms\":{},\"header_p50_ms\":{},\"header_p99_ms\":{}}}",
            classes.join(","),
            m.in_flight.get(),
            m.queued.get(),
            m.refused.get(),
            m.error_rate(),
            quantile_ms(&m.total_seconds, 0.5),
            quantile_ms(&m.total_seconds, 0.99),
            quantile_ms(&m.response_header_seconds, 0.5),
            quantile_ms(&m.response_header_seconds, 0.99),
        );
    }
    out.push_str("],\"upstreams\":[");
    for (i, u) in proxy.upstreams().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json_string(&mut out, &u.name);
        let _ = write!(out, ",\"queued\":{},\"servers\":[", u.queued());
        for (j, s) in u.servers().iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str("{\"address\":");
            json_string(&mut out, &s.address.to_string());
            let _ = write!(
                out,
                ",\"up\":{},\"in_flight\":{}}}",
                s.health.is_up(),
                s.in_flight.load(Ordering::Relaxed)
            );
        }
        out.push_str("]}");
    }
    out.push_str("],\"in_flight\":[");
    for (i, t) in proxy.live.snapshot().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let route = t.route.lock().map(|r| r.to_string()).unwrap_or_default();
        let _ = write!(
            out,
            "{{\"age_ms\":{},\"client\":\"{}\",\"request\":",
            t.started.elapsed().as_millis(),
            t.client
        );
        json_string(&mut out, &t.request());
        out.push_str(",\"route\":");
        json_string(&mut out, &route);
        out.push_str(",\"stage\":");
        json_string(&mut out, t.stage().name());
        out.push('}');
    }
    out.push_str("]}\n");
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}\
h2{font-size:1.1em;margin-top:1.5em}table{border-collapse:collapse}th,td{padding:.25em .7em;\
border-bottom:1px solid #ddd;text-align:left}td.n{text-align:right}.down{color:#b00;font-weight:bold}\
.up{color:#070}";

/// `?refresh=N` sets the page's refresh period in seconds (2 by default, 0 for none).
fn refresh_seconds(query: Option<&str>) -> u32 {
    query
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("refresh=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// The status page: refreshes itself through a meta tag, no script, no asset.
pub fn status_page(proxy: &Proxy, refresh: u32) -> String {
    let mut out = String::with_capacity(8 * 1024);
    out.push_str("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">");
    if refresh > 0 {
        let _ = write!(out, "<meta http-equiv=\"refresh\" content=\"{refresh}\">");
    }
    let _ = write!(
        out,
        "<title>quadrige-proxy status</title><style>{STYLE}</style></head><body>\
         <h1>quadrige-proxy {}</h1>",
        env!("CARGO_PKG_VERSION")
    );
    in_flight_table(&mut out, proxy);
    upstream_table(&mut out, proxy);
    route_table(&mut out, proxy);
    out.push_str("</body></html>\n");
    out
}

fn cell(out: &mut String, text: &str) {
    out.push_str("<td>");
    escape::html_into(out, text);
    out.push_str("</td>");
}

fn number(out: &mut String, value: impl std::fmt::Display) {
    let _ = write!(out, "<td class=\"n\">{value}</td>");
}

fn in_flight_table(out: &mut String, proxy: &Proxy) {
    let live = proxy.live.snapshot();
    let _ = write!(out, "<h2>Requests in flight: {}</h2><table id=\"in-flight\"><tr><th>age</th><th>client</th><th>request</th><th>route</th><th>state</th></tr>", live.len());
    for t in live {
        out.push_str("<tr>");
        number(out, format!("{:.1} s", t.started.elapsed().as_secs_f64()));
        cell(out, &t.client.to_string());
        cell(out, &t.request());
        cell(
            out,
            &t.route.lock().map(|r| r.to_string()).unwrap_or_default(),
        );
        cell(out, t.stage().name());
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn upstream_table(out: &mut String, proxy: &Proxy) {
    out.push_str("<h2>Upstreams</h2><table id=\"upstreams\"><tr><th>upstream</th><th>server</th><th>health</th><th>in flight</th><th>queued</th><th>2xx</th><th>5xx</th><th>worker kills</th></tr>");
    for u in proxy.upstreams() {
        for s in u.servers() {
            out.push_str("<tr>");
            cell(out, &u.name);
            cell(out, &s.address.to_string());
            let up = s.health.is_up();
            let _ = write!(
                out,
                "<td class=\"{0}\">{0}</td>",
                if up { "up" } else { "down" }
            );
            number(out, s.in_flight.load(Ordering::Relaxed));
            number(out, u.queued());
            number(out, s.responses[1].get());
            number(out, s.responses[4].get());
            number(out, u.metrics.worker_kills.get());
            out.push_str("</tr>");
        }
    }
    out.push_str("</table>");
}

fn route_table(out: &mut String, proxy: &Proxy) {
    out.push_str("<h2>Routes</h2><table id=\"routes\"><tr><th>route</th><th>in flight</th><th>queued</th><th>requests</th><th>5xx rate</th><th>p50</th><th>p99</th><th>head p99</th><th>refused</th><th>timeouts</th></tr>");
    for route in proxy.routes().iter() {
        let m = &route.metrics;
        let total: u64 = m.responses.iter().map(|c| c.get()).sum();
        let timeouts: u64 = m.timeouts.iter().map(|c| c.get()).sum();
        let ms = |h: &Histogram, q| h.quantile(q).map_or("-".to_string(), |v| format!("≤{v} s"));
        out.push_str("<tr>");
        cell(out, &route.name);
        number(out, m.in_flight.get());
        number(out, m.queued.get());
        number(out, total);
        number(out, format!("{:.1}%", m.error_rate() * 100.0));
        cell(out, &ms(&m.total_seconds, 0.5));
        cell(out, &ms(&m.total_seconds, 0.99));
        cell(out, &ms(&m.response_header_seconds, 0.99));
        number(
            out,
            m.refused.get() + m.rate_limited.get() + m.forbidden.get(),
        );
        number(out, timeouts);
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}
