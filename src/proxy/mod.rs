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

pub mod admit;
pub mod conformance;
mod early;
pub mod error;
mod forward;
pub mod headers;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log::{AccessLog, Exchange};
use crate::body::{RequestBody, ResponseBody, UploadProgress, UpstreamStream};
use crate::compress;
use crate::config::{Cidr, Config, Serve, Timeouts};
use crate::graphql;
use crate::metrics::{self, Live, Stage, Tracked};
use crate::route::{decoded_path, Route, RouteTable, Selection};
use crate::server::io::{ExchangeUnderWay, WriteStallLimit};
use crate::static_files;
use crate::upstream::{ExtraFields, Framing, PooledConnection, Upstream};

use error::ErrorContext;
pub use error::{ProxyError, TimerKind};

/// What the proxy knows about the client connection a request came on.
pub struct Client {
    pub addr: SocketAddr,
    /// The address again, with its text ready for `X-Forwarded-For`.
    pub peer: headers::PeerAddr,
    /// `http` or `https`, for `X-Forwarded-Proto` and rewritten `Location`s.
    pub scheme: &'static str,
    /// The client connection's write stall guard, set to the route's idle timer.
    pub write_stall: WriteStallLimit,
}

/// A request as the route phase receives it.
struct ClientRequest<'a> {
    parts: Parts,
    body: Incoming,
    client: &'a Client,
    /// The real client: the peer, or what a trusted proxy in front says it is.
    client_ip: IpAddr,
    tracked: &'a Tracked,
}

/// What a request holds until its response body is done: its place under the route's
/// cap and its count in the per-client limits.
struct Held {
    _client: Option<admit::ClientGuard>,
    _route: Option<tokio::sync::OwnedSemaphorePermit>,
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
    trusted_proxies: Vec<Cidr>,
    /// Requests in flight, for the status page.
    pub live: Arc<Live>,
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
            trusted_proxies: config.server.trusted_proxies.clone(),
            live: Arc::new(Live::default()),
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
        under_way: ExchangeUnderWay,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = request.into_parts();
        let http2 = parts.version == Version::HTTP_2;
        let malformed = conformance::check(&parts).err();
        authority_as_host(&mut parts);
        let request_id = self.request_ids.for_request(&parts.headers);
        let client_ip =
            headers::real_client(&parts.headers, client.addr.ip(), &self.trusted_proxies);
        let mut exchange = Exchange::begin(self.access_log.clone(), &parts, client_ip, request_id);
        exchange.keep_under_way(under_way);
        let live = self.live.track(client_ip, &parts.method, &exchange.target);
        let wants_json = error::prefers_json(&parts.headers, parts.uri.path());
        let early = match malformed {
            Some(m) => {
                let refused = self.explain(&ProxyError::Malformed(m), &exchange, wants_json);
                Some(("(refused)", refused))
            }
            None => self.early.answer(&parts, client.scheme).await,
        };
        let mut response = match early {
            Some((name, response)) => {
                exchange.route = metrics::fixed_name(name);
                response
            }
            None => {
                let request = ClientRequest {
                    parts,
                    body,
                    client,
                    client_ip,
                    tracked: &live.tracked,
                };
                match self.proxy(request, &mut exchange).await {
                    Ok(response) => response,
                    Err(failure) => self.explain(&failure, &exchange, wants_json),
                }
            }
        };
        self.early.decorate(client.scheme, response.headers_mut());
        exchange.status = response.status().as_u16();
        live.tracked.set_stage(Stage::Streaming);
        exchange.keep_listed(live);
        let response = response.map(|body| body.logged(exchange));
        if http2 {
            return response.map(ResponseBody::guarded_against_stalls);
        }
        response
    }

    async fn proxy(
        &self,
        request: ClientRequest<'_>,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let ClientRequest {
            parts,
            mut body,
            client,
            client_ip,
            tracked,
        } = request;
        let (route, prefix) = self.route(&parts, &mut body).await?;
        exchange.enter_route(route);
        tracked.set_route(&route.name);
        // A client that stops reading is cut off after the route's idle time, whether
        // it reads from the upstream or from a file.
        client.write_stall.set(route.settings.timeouts.idle.0);
        let compression = route.settings.compress.as_deref();
        let accepts = compress::ClientAccepts::of(&parts);
        if let Some(access) = &route.settings.access {
            if !access.permits(client_ip) {
                route.metrics.forbidden.inc();
                let refusal = admit::Refusal::Forbidden;
                return Err(ProxyError::Refused {
                    refusal,
                    retry_after: Duration::ZERO,
                });
            }
        }
        if let Serve::Static(site) = &route.serve {
            let mut response = static_files::serve_for_route(site, compression, &parts).await;
            let id = exchange.request_id.clone();
            response
                .headers_mut()
                .insert(headers::X_REQUEST_ID.clone(), id);
            return Ok(compress::apply(compression, &accepts, response));
        }
        let upstream = &self.upstreams[route.settings.upstream];
        exchange.upstream = Some(upstream.name.clone());
        let request_body = admit_body(route, &parts, prefix, body)?;
        let held = admit_route(route, upstream, client_ip, tracked).await?;
        let public_host = parts.headers.get(header::HOST).cloned();
        let (request, extra) =
            self.upstream_request(parts, request_body, client, &exchange.request_id);
        let forward = forward::Forward {
            upstream,
            timeouts: route.settings.timeouts,
            exchange,
            tracked,
        };
        let (response, connection, slot) = forward.run(request, &extra).await?;
        exchange.response_header_after = Some(exchange.started.elapsed());
        let response = respond(
            response,
            connection,
            route.settings.timeouts,
            exchange,
            public_host.as_ref().map(|host| (client.scheme, host)),
        );
        let response = response.map(|body| body.hold(Box::new((held, slot))));
        Ok(compress::apply(compression, &accepts, response))
    }

    /// Phase 1: the route, and the body bytes the GraphQL peek consumed, if any.
    async fn route(
        &self,
        parts: &Parts,
        body: &mut Incoming,
    ) -> Result<(&Route, Option<Bytes>), ProxyError> {
        let path = decoded_path(parts.uri.path());
        let mut start = 0;
        let mut operations = None;
        let mut prefix = None;
        loop {
            match self
                .routes
                .select_decoded(start, &parts.method, &path, operations.as_deref())
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

    fn upstream_request(
        &self,
        parts: Parts,
        body: RequestBody,
        client: &Client,
        request_id: &HeaderValue,
    ) -> (Request<RequestBody>, ExtraFields) {
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = origin_form(&parts.uri);
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = parts.headers;
        let peer = &client.peer;
        let forwarded = headers::Forwarded {
            peer,
            peer_trusted: self.trusted_proxies.iter().any(|c| c.contains(peer.ip())),
            scheme: client.scheme,
            server_name: &self.server_name,
        };
        let extra = headers::to_upstream(request.headers_mut(), &forwarded, request_id);
        (request, extra)
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
        if let Some(m) = exchange.metrics() {
            if let Some((timer, _)) = failure.timer() {
                m.timeouts[timer as usize].inc();
            }
            if matches!(failure, ProxyError::Unavailable(..)) {
                m.refused.inc();
            }
        }
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

/// HTTP/2 carries the host in `:authority`, not `Host`, and an absolute-form target's
/// authority overrides `Host` (RFC 9112 §3.2.2); everything downstream (Host rules,
/// X-Forwarded-Host, redirects, Location rewriting) reads `Host`.
fn authority_as_host(parts: &mut Parts) {
    if let Some(host) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
}

/// Phase 2, limits: the per-client counters, then the route's cap (queued or refused).
async fn admit_route(
    route: &Route,
    upstream: &Upstream,
    client_ip: IpAddr,
    tracked: &Tracked,
) -> Result<Held, ProxyError> {
    let client = route
        .gate
        .admit_client(client_ip)
        .map_err(|(refusal, retry_after)| {
            route.metrics.rate_limited.inc();
            ProxyError::Refused {
                refusal,
                retry_after,
            }
        })?;
    tracked.set_stage(Stage::Queued);
    route.metrics.queued.inc();
    let permit = route.gate.admit_route(upstream.queue_timeout).await;
    route.metrics.queued.dec();
    let permit = permit.map_err(|refusal| {
        route.metrics.refused.inc();
        ProxyError::Refused {
            refusal,
            retry_after: upstream.queue_timeout,
        }
    })?;
    Ok(Held {
        _client: client,
        _route: permit,
    })
}

/// Phase 2, body: refuse a declared body over the limit before reading any of it, and
/// wrap the body so the limit also holds mid-stream.
fn admit_body(
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
    let body = RequestBody::streaming(prefix, body, limit, UploadProgress::new());
    Ok(body.counted_in(route.metrics.clone()))
}

/// Phase 4: the upstream's head, cleaned for the client, with a timed streaming body.
fn respond(
    response: Response<Framing>,
    connection: PooledConnection,
    timeouts: Timeouts,
    exchange: &Exchange,
    public: Option<(&str, &HeaderValue)>,
) -> Response<ResponseBody> {
    let (mut head, framing) = response.into_parts();
    let public_origin = public
        .filter(|(_, host)| host.to_str().is_ok())
        .map(|(scheme, host)| [scheme.as_bytes(), b"://", host.as_bytes()]);
    headers::to_client_in_pieces(
        &mut head.headers,
        &connection.endpoint().self_origin,
        public_origin.as_ref().map(|pieces| &pieces[..]),
        &exchange.request_id,
    );
    let total = timeouts.total.0.map(|limit| (limit, exchange.started));
    let stream = UpstreamStream::new(framing, connection, timeouts.idle.0, total);
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
