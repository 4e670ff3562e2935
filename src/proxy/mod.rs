//! The request path, as a sequence of named phases:
//!
//! 1. **route**: pick the route from method and path (peeking at a bounded prefix of
//!    the body when a route needs the GraphQL operation name);
//! 2. **admit**: refuse what the route forbids up front (a declared body too large);
//! 3. **forward**: connect (connect timer), send head and streaming body upstream, wait
//!    for the response head (upload idle timer, then response-header timer; total timer
//!    throughout);
//! 4. **respond**: rewrite the response head and hand back a body that keeps the idle and
//!    total timers running; or, on failure, a generated 4xx/5xx that explains itself;
//! 5. **log**: written when the response body is done or dropped (see `access_log`).

mod early;
pub mod error;
pub mod headers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Exchange};
use crate::body::{BodyError, RequestBody, ResponseBody, UploadProgress, UpstreamStream};
use crate::config::{Config, Serve, Timeouts};
use crate::graphql;
use crate::route::{Route, RouteTable, Selection};
use crate::server::io::WriteStallLimit;
use crate::static_files;
use crate::upstream::{ConnectError, PooledConnection, Upstream};

use error::ErrorContext;
pub use error::{ProxyError, TimerKind};

/// What the proxy knows about the client connection a request came on.
pub struct Client {
    pub addr: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto` and rewritten `Location`s.
    pub scheme: &'static str,
    /// The client connection's write stall guard, set to the route's idle timer.
    pub write_stall: WriteStallLimit,
}

/// Everything the request path needs, built once from a [`Config`].
pub struct Proxy {
    routes: RouteTable,
    upstreams: Vec<Arc<Upstream>>,
    server_name: HeaderValue,
    peek_limit: usize,
    /// How long the GraphQL peek waits for the client's body bytes.
    peek_idle: Option<Duration>,
    access_log: Arc<AccessLog>,
    request_ids: headers::RequestIds,
    early: early::EarlyAnswers,
}

impl Proxy {
    pub fn new(config: &Config, access_log: Arc<AccessLog>) -> Proxy {
        Proxy {
            routes: RouteTable::new(config),
            upstreams: config.upstreams.iter().map(Upstream::new).collect(),
            server_name: HeaderValue::from_str(&config.server.name)
                .unwrap_or_else(|_| HeaderValue::from_static("quadrige-proxy")),
            peek_limit: config.server.graphql_peek_limit,
            peek_idle: config.defaults.timeouts.idle.0,
            access_log,
            request_ids: headers::RequestIds::new(),
            early: early::EarlyAnswers::new(config),
        }
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Serves one request, whatever happens: failures become explained responses.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: &Client,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = request.into_parts();
        authority_as_host(&mut parts);
        let request_id = self.request_ids.for_request(&parts.headers);
        let mut exchange = Exchange::begin(
            self.access_log.clone(),
            &parts,
            client.addr.ip(),
            request_id,
        );
        let wants_json = error::prefers_json(&parts.headers, parts.uri.path());
        let mut response = match self.early.answer(&parts, client.scheme).await {
            Some((name, response)) => {
                exchange.route = Arc::from(name);
                response
            }
            None => match self.proxy(parts, body, client, &mut exchange).await {
                Ok(response) => response,
                Err(failure) => self.explain(&failure, &exchange, wants_json),
            },
        };
        self.early.decorate(client.scheme, response.headers_mut());
        exchange.status = response.status().as_u16();
        response.map(|body| body.logged(exchange))
    }

    async fn proxy(
        &self,
        parts: Parts,
        mut body: Incoming,
        client: &Client,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (route, prefix) = self.route(&parts, &mut body).await?;
        exchange.route = route.name.clone();
        if let Serve::Static(site) = &route.serve {
            return Ok(static_files::serve(site, &parts).await);
        }
        let upstream = &self.upstreams[route.settings.upstream];
        exchange.upstream = Some(upstream.name.clone());
        client.write_stall.set(route.settings.timeouts.idle.0);

        let request_body = admit(route, &parts, prefix, body)?;
        let public_host = parts.headers.get(header::HOST).cloned();
        let (response, connection) = self
            .forward(parts, request_body, route, upstream, client, exchange)
            .await?;
        exchange.response_header_after = Some(exchange.started.elapsed());
        Ok(respond(
            response,
            connection,
            route.settings.timeouts,
            exchange,
            upstream,
            public_host.as_ref().map(|host| (client.scheme, host)),
        ))
    }

    /// Phase 1: the route, and the body bytes the GraphQL peek consumed, if any.
    async fn route(
        &self,
        parts: &Parts,
        body: &mut Incoming,
    ) -> Result<(&Route, Option<Bytes>), ProxyError> {
        let path = parts.uri.path();
        let mut start = 0;
        let mut operations = None;
        let mut prefix = None;
        loop {
            match self
                .routes
                .select(start, &parts.method, path, operations.as_deref())
            {
                Selection::Route(index) => return Ok((self.routes.get(index), prefix)),
                Selection::NeedsOperation(index) => {
                    let (found, peeked) = self.peek_operations(parts, body).await?;
                    operations = Some(found);
                    prefix = peeked;
                    start = index;
                }
            }
        }
    }

    /// Reads the GraphQL operation name from the query, or from at most `peek_limit`
    /// body bytes, which are returned to be sent upstream first.
    async fn peek_operations(
        &self,
        parts: &Parts,
        body: &mut Incoming,
    ) -> Result<(Vec<String>, Option<Bytes>), ProxyError> {
        if let Some(name) = parts.uri.query().and_then(graphql::operation_in_query) {
            return Ok((vec![name], None));
        }
        let json_or_unspecified = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_none_or(|ct| ct.to_str().is_ok_and(|ct| ct.contains("json")));
        if body.is_end_stream() || !json_or_unspecified {
            return Ok((Vec::new(), None));
        }
        let mut peeked = BytesMut::new();
        while peeked.len() < self.peek_limit {
            let frame = match self.peek_idle {
                Some(limit) => tokio::time::timeout(limit, body.frame())
                    .await
                    .map_err(|_| ProxyError::ClientBodyTimeout { limit })?,
                None => body.frame().await,
            };
            match frame {
                None => break,
                Some(Err(_)) => return Err(ProxyError::ClientAborted),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        peeked.extend_from_slice(&data);
                    }
                }
            }
        }
        let scanned = &peeked[..peeked.len().min(self.peek_limit)];
        Ok((graphql::operations_in_json(scanned), Some(peeked.freeze())))
    }

    /// Phase 3: connect, send, and wait for the response head under the route's timers.
    async fn forward(
        &self,
        parts: Parts,
        body: RequestBody,
        route: &Route,
        upstream: &Arc<Upstream>,
        client: &Client,
        exchange: &Exchange,
    ) -> Result<(Response<Incoming>, PooledConnection), ProxyError> {
        let timeouts = route.settings.timeouts;
        let timers = HeadTimers {
            timeouts,
            total_deadline: timeouts.total.0.map(|t| exchange.started + t),
            progress: body.progress(),
        };
        let mut request =
            self.upstream_request(parts, body, upstream, client, &exchange.request_id);
        let mut connection = timers.connect(upstream, false).await?;
        loop {
            let sent_at = Instant::now();
            let sending = connection.sender().try_send_request(request);
            match timers.await_head(sending, sent_at).await {
                Ok(response) => return Ok((response, connection)),
                Err(HeadError::Failed(failure)) => return Err(failure),
                Err(HeadError::Send(mut failed)) => match failed.take_message() {
                    // The pooled connection was closed under us before a byte left:
                    // the request provably never reached the upstream, send it afresh.
                    Some(unsent) if connection.reused => {
                        request = unsent;
                        connection = timers.connect(upstream, true).await?;
                    }
                    _ => return Err(classify(failed.into_error())),
                },
            }
        }
    }

    fn upstream_request(
        &self,
        parts: Parts,
        body: RequestBody,
        upstream: &Upstream,
        client: &Client,
        request_id: &HeaderValue,
    ) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = origin_form(&parts.uri);
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = parts.headers;
        let forwarded = headers::Forwarded {
            client: client.addr.ip(),
            scheme: client.scheme,
            server_name: &self.server_name,
            upstream_host: (!upstream.preserve_host).then_some(&upstream.host_header),
        };
        headers::to_upstream(request.headers_mut(), &forwarded, request_id);
        request
    }

    /// The generated answer for a failure, logged at warn level with the same facts.
    fn explain(
        &self,
        failure: &ProxyError,
        exchange: &Exchange,
        json: bool,
    ) -> Response<ResponseBody> {
        let elapsed = exchange.started.elapsed();
        let upstream = exchange.upstream.as_deref().unwrap_or("-");
        tracing::warn!(
            route = %exchange.route,
            upstream,
            request_id = ?exchange.request_id,
            status = failure.status().as_u16(),
            timer = failure.timer().map(|(t, _)| t.key()),
            after = ?elapsed,
            "{failure}"
        );
        let context = ErrorContext {
            route: &exchange.route,
            upstream,
            elapsed,
            request_id: &exchange.request_id,
            json,
        };
        error::error_response(failure, &context)
    }
}

/// HTTP/2 carries the host in `:authority`, not `Host`; everything downstream (Host
/// rules, X-Forwarded-Host, redirects, Location rewriting) reads `Host`.
fn authority_as_host(parts: &mut Parts) {
    if parts.headers.contains_key(header::HOST) {
        return;
    }
    if let Some(host) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
}

/// Phase 2: refuse a declared body over the limit before reading any of it, and wrap
/// the body so the limit also holds mid-stream.
fn admit(
    route: &Route,
    parts: &Parts,
    prefix: Option<Bytes>,
    body: Incoming,
) -> Result<RequestBody, ProxyError> {
    let limit = route.settings.max_request_body.0;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(limit), Some(declared)) = (limit, declared) {
        if declared > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    if prefix.is_none() && body.is_end_stream() {
        return Ok(RequestBody::empty());
    }
    Ok(RequestBody::streaming(
        prefix,
        body,
        limit,
        UploadProgress::new(),
    ))
}

/// Phase 4: the upstream's head, cleaned for the client, with a timed streaming body.
fn respond(
    response: Response<Incoming>,
    mut connection: PooledConnection,
    timeouts: Timeouts,
    exchange: &Exchange,
    upstream: &Upstream,
    public: Option<(&str, &HeaderValue)>,
) -> Response<ResponseBody> {
    let (mut head, incoming) = response.into_parts();
    if headers::wants_close(&head.headers) {
        connection.forbid_reuse();
    }
    let rewrites_location = head.headers.contains_key(header::LOCATION)
        || head.headers.contains_key(header::CONTENT_LOCATION);
    let public_origin = public
        .filter(|_| rewrites_location)
        .and_then(|(scheme, host)| Some(format!("{scheme}://{}", host.to_str().ok()?)));
    headers::to_client(
        &mut head.headers,
        &upstream.self_origin,
        public_origin.as_deref(),
        &exchange.request_id,
    );
    let total = timeouts.total.0.map(|limit| (limit, exchange.started));
    let stream = UpstreamStream::new(incoming, connection, timeouts.idle.0, total);
    Response::from_parts(head, ResponseBody::upstream(stream))
}

/// The request target as sent upstream: path and query, byte for byte.
fn origin_form(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

enum HeadError {
    /// hyper could not complete the exchange; it may hand the request back.
    Send(Box<TrySendError<Request<RequestBody>>>),
    Failed(ProxyError),
}

/// The timers that run until the response head arrives.
struct HeadTimers {
    timeouts: Timeouts,
    total_deadline: Option<Instant>,
    /// Present when a request body is being uploaded.
    progress: Option<Arc<UploadProgress>>,
}

impl HeadTimers {
    /// A connection under the connect timer (or what is left of the total one).
    async fn connect(
        &self,
        upstream: &Arc<Upstream>,
        fresh: bool,
    ) -> Result<PooledConnection, ProxyError> {
        let mut limit = self.timeouts.connect.0;
        let mut total_is_shorter = false;
        if let Some(deadline) = self.total_deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if limit.is_none_or(|l| remaining < l) {
                limit = Some(remaining);
                total_is_shorter = true;
            }
        }
        let connecting = if fresh {
            upstream.connect(limit).await
        } else {
            upstream.checkout(limit).await
        };
        connecting.map_err(|e| match (e, self.timeouts.total.0) {
            (ConnectError::Timeout(_), Some(total)) if total_is_shorter => ProxyError::Timeout {
                timer: TimerKind::Total,
                limit: total,
            },
            (e, _) => ProxyError::Connect(e),
        })
    }

    /// Waits for the response head. While the body uploads, the idle timer watches the
    /// silent side; once it is sent, the response-header timer runs.
    async fn await_head<F>(
        &self,
        sending: F,
        sent_at: Instant,
    ) -> Result<Response<Incoming>, HeadError>
    where
        F: Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
    {
        tokio::pin!(sending);
        loop {
            let next = self.next_deadline(sent_at);
            let uploading = self.progress.as_ref().filter(|p| p.finished_at().is_none());
            let sleep_until = next.map_or_else(far_future, |(at, _)| at);
            tokio::select! {
                biased;
                result = &mut sending => return result.map_err(|e| HeadError::Send(Box::new(e))),
                _ = wait_upload_end(uploading), if uploading.is_some() => continue,
                _ = tokio::time::sleep_until(sleep_until) => {
                    if let Some((at, timer)) = self.next_deadline(sent_at) {
                        if at <= Instant::now() {
                            return Err(HeadError::Failed(self.expired(timer)));
                        }
                    }
                }
            }
        }
    }

    /// The earliest deadline now in force, and which timer it belongs to.
    fn next_deadline(&self, sent_at: Instant) -> Option<(Instant, TimerKind)> {
        let phase = match &self.progress {
            Some(p) => match p.finished_at() {
                None => self
                    .timeouts
                    .idle
                    .0
                    .map(|idle| (p.last_chunk_at() + idle, TimerKind::Idle)),
                Some(done) => self
                    .timeouts
                    .response_header
                    .0
                    .map(|t| (done + t, TimerKind::ResponseHeader)),
            },
            None => self
                .timeouts
                .response_header
                .0
                .map(|t| (sent_at + t, TimerKind::ResponseHeader)),
        };
        let total = self.total_deadline.map(|at| (at, TimerKind::Total));
        match (phase, total) {
            (Some(p), Some(t)) => Some(if t.0 <= p.0 { t } else { p }),
            (p, t) => p.or(t),
        }
    }

    fn expired(&self, timer: TimerKind) -> ProxyError {
        let limit = |t: crate::config::Timer| t.0.unwrap_or_default();
        match timer {
            TimerKind::Idle
                if self
                    .progress
                    .as_ref()
                    .is_some_and(|p| p.waiting_on_client()) =>
            {
                ProxyError::ClientBodyTimeout {
                    limit: limit(self.timeouts.idle),
                }
            }
            TimerKind::Idle => ProxyError::Timeout {
                timer,
                limit: limit(self.timeouts.idle),
            },
            TimerKind::ResponseHeader => ProxyError::Timeout {
                timer,
                limit: limit(self.timeouts.response_header),
            },
            TimerKind::Total | TimerKind::Connect => ProxyError::Timeout {
                timer: TimerKind::Total,
                limit: limit(self.timeouts.total),
            },
        }
    }
}

async fn wait_upload_end(progress: Option<&Arc<UploadProgress>>) {
    match progress {
        Some(p) => p.wait_finished().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// Maps hyper's failure to what the client is told.
fn classify(error: hyper::Error) -> ProxyError {
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if let Some(body) = cause.downcast_ref::<BodyError>() {
            return match body {
                BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
                _ => ProxyError::ClientAborted,
            };
        }
        source = cause.source();
    }
    if error.is_incomplete_message() || error.is_canceled() {
        ProxyError::UpstreamClosed
    } else if error.is_parse() || error.is_parse_status() {
        ProxyError::InvalidResponse(error.to_string())
    } else {
        let detail =
            std::error::Error::source(&error).map_or_else(String::new, |s| format!(": {s}"));
        ProxyError::UpstreamIo(format!("{error}{detail}"))
    }
}
