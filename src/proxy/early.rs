//! Answers given before routing: ACME HTTP-01 challenges (so `certbot --webroot`
//! renewals work on every listener), the redirect of plain HTTP to HTTPS, and the
//! maintenance page. Also the HSTS header that HTTPS responses carry.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::config::{Config, MaintenanceConfig, StaticConfig};
use crate::static_files;

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";
/// How often the maintenance flag file is looked at: a `stat` per request is waste.
const FLAG_CHECK_INTERVAL: Duration = Duration::from_secs(1);

const DEFAULT_MAINTENANCE_PAGE: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n<body><h1>Maintenance en cours</h1>\n<p>GeoNature est en cours de maintenance. Merci de réessayer dans quelques minutes.</p>\n<p>GeoNature is under maintenance. Please try again in a few minutes.</p>\n</body></html>\n";

/// The answers that do not depend on the route table.
pub struct EarlyAnswers {
    acme: Option<StaticConfig>,
    /// The HTTPS port plain-HTTP requests are redirected to.
    https_redirect_port: Option<u16>,
    hsts: Option<HeaderValue>,
    maintenance: Option<Maintenance>,
}

impl EarlyAnswers {
    pub fn new(config: &Config) -> EarlyAnswers {
        let tls = config.server.tls.as_ref();
        EarlyAnswers {
            acme: config
                .server
                .acme_challenge_root
                .as_ref()
                .map(|root| StaticConfig {
                    roots: vec![root.clone()],
                    strip_prefix: String::new(),
                    index: "index.html".into(),
                    precompressed: false,
                    allow_symlinks_outside: false,
                    cache_control: Some("no-cache".into()),
                }),
            https_redirect_port: tls
                .filter(|t| t.redirect_http)
                .and_then(|t| t.listen.first())
                .map(|addr| addr.port()),
            hsts: tls
                .and_then(|t| t.hsts.as_deref())
                .and_then(|v| HeaderValue::from_str(v).ok()),
            maintenance: config.maintenance.as_ref().map(Maintenance::new),
        }
    }

    /// The answer for this request, if it is not for the route table, with the name
    /// the logs give it in place of a route.
    pub async fn answer(
        &self,
        request: &Parts,
        scheme: &str,
    ) -> Option<(&'static str, Response<ResponseBody>)> {
        let path = request.uri.path();
        if let Some(site) = self.acme.as_ref().filter(|_| path.starts_with(ACME_PREFIX)) {
            return Some(("(acme-challenge)", static_files::serve(site, request).await));
        }
        if let (Some(port), "http") = (self.https_redirect_port, scheme) {
            return Some(("(https-redirect)", redirect_to_https(request, port)));
        }
        self.maintenance
            .as_ref()
            .filter(|m| path.starts_with(m.config.path_prefix.as_str()) && m.is_on())
            .map(|m| ("(maintenance)", m.response()))
    }

    /// Adds what every response on this scheme carries (HSTS on HTTPS).
    pub fn decorate(&self, scheme: &str, headers: &mut HeaderMap) {
        if let (Some(hsts), "https") = (&self.hsts, scheme) {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
    }
}

/// 301 for GET and HEAD like certbot's rewrite; 308 otherwise so a POST stays a POST.
fn redirect_to_https(request: &Parts, port: u16) -> Response<ResponseBody> {
    let host = request
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let Some(host) = host else {
        let mut response = Response::new(ResponseBody::full("a Host header is required\n"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let target = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = match port {
        443 => format!("https://{}{target}", host.host()),
        port => format!("https://{}:{port}{target}", host.host()),
    };
    let status = if matches!(request.method, Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut response = Response::new(ResponseBody::full(Bytes::new()));
    *response.status_mut() = status;
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

struct Maintenance {
    config: MaintenanceConfig,
    page: Bytes,
    origin: Instant,
    /// Milliseconds after `origin` of the last flag-file check, plus one (0: never).
    checked_ms: AtomicU64,
    flag_present: AtomicBool,
}

impl Maintenance {
    fn new(config: &MaintenanceConfig) -> Maintenance {
        let page = match &config.page {
            None => Bytes::from_static(DEFAULT_MAINTENANCE_PAGE.as_bytes()),
            Some(path) => std::fs::read(path).map(Bytes::from).unwrap_or_else(|e| {
                tracing::warn!(page = %path.display(), error = %e, "cannot read the maintenance page; using the built-in one");
                Bytes::from_static(DEFAULT_MAINTENANCE_PAGE.as_bytes())
            }),
        };
        Maintenance {
            config: config.clone(),
            page,
            origin: Instant::now(),
            checked_ms: AtomicU64::new(0),
            flag_present: AtomicBool::new(false),
        }
    }

    fn is_on(&self) -> bool {
        if self.config.enabled {
            return true;
        }
        let Some(flag) = &self.config.flag_file else {
            return false;
        };
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let checked = self.checked_ms.load(Ordering::Relaxed);
        if checked == 0 || now.saturating_sub(checked) >= FLAG_CHECK_INTERVAL.as_millis() as u64 {
            self.flag_present.store(flag.exists(), Ordering::Relaxed);
            self.checked_ms.store(now, Ordering::Relaxed);
        }
        self.flag_present.load(Ordering::Relaxed)
    }

    fn response(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(self.page.clone()));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-store, must-revalidate"),
        );
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(self.config.retry_after.as_secs()),
        );
        response
    }
}
