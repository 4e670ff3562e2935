//! The per-request operations issue 5 bounds in allocations, with their inputs: route
//! matching on the shipped GeoNature table, request and response header rewriting on
//! realistic header sets, the GraphQL peek, the exchange's bookkeeping (its log
//! record and its status-page entry), and the upstream connection's own work (the
//! request head written, the response head parsed, chunked framing cut). Shared by the `alloc` bench (time and
//! allocation counts) and `tests/alloc_budget.rs` (the budget), so both measure the
//! same thing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Uri};
use quadrige_proxy::access_log::{AccessLog, Exchange};
use quadrige_proxy::config::Cidr;
use quadrige_proxy::graphql;
use quadrige_proxy::metrics::{Live, LiveGuard};
use quadrige_proxy::proxy::headers::{self, Forwarded, PeerAddr, RequestIds};
use quadrige_proxy::route::{Route, RouteTable, Selection};
use quadrige_proxy::upstream::codec::{self, Chunk, ExtraFields, Framing, Step};
use quadrige_proxy::upstream::Endpoint;
use quadrige_proxy::Config;

/// What the request path holds for its whole life, built from `config/geonature.toml`
/// as the proxy builds it.
pub struct Fixture {
    pub routes: RouteTable,
    pub request_ids: RequestIds,
    server_name: HeaderValue,
    upstream: Arc<Endpoint>,
    /// geonature.toml trusts no proxy; the `via_trusted_proxy` case needs one, and the
    /// direct client's address is outside it, so that case alone is affected.
    trusted_proxies: Vec<Cidr>,
    access_log: Arc<AccessLog>,
    live: Arc<Live>,
}

/// The public origin of the GeoNature host, as the client's `Host` gives it.
const PUBLIC_ORIGIN: &str = "https://geonature.example.org";
/// The same in the pieces `respond` hands over: the scheme and the client's `Host`.
const PUBLIC_ORIGIN_PIECES: [&[u8]; 3] = [b"https", b"://", b"geonature.example.org"];

impl Fixture {
    pub fn new() -> Fixture {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/geonature.toml");
        let config = Config::load(&path).expect("config/geonature.toml loads");
        let geonature = &config.upstreams[config.defaults.upstream];
        let upstream = Endpoint::new(&geonature.servers[0], geonature);
        let server_name = HeaderValue::from_str(&config.server.name)
            .unwrap_or_else(|_| HeaderValue::from_static("quadrige-proxy"));
        // A `Bytes` made from a `Vec` allocates its shared header on its first clone
        // only. The proxy's long-lived values were cloned by earlier requests; these are
        // cloned here so that a measurement sees that steady state, not a start-up cost.
        drop((server_name.clone(), upstream.host_header.clone()));
        let live = Arc::new(Live::default());
        // The registry of requests in flight grows its tables to the proxy's load once;
        // a few hundred requests in flight, then none, leave it as a running proxy's.
        let warm_target: Arc<str> = Arc::from("/warm");
        let client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let warm: Vec<_> = (0..256)
            .map(|_| live.track(client, &Method::GET, &warm_target))
            .collect();
        drop(warm);
        Fixture {
            routes: RouteTable::new(&config),
            request_ids: RequestIds::new(),
            server_name,
            upstream,
            trusted_proxies: vec![Cidr::parse("127.0.0.1/32").expect("a valid CIDR")],
            access_log: AccessLog::disabled(),
            live,
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// One request line to route.
pub struct PathCase {
    pub name: &'static str,
    pub method: Method,
    pub path: &'static str,
    /// The route the shipped table gives it, `(defaults)` when none matches.
    route: &'static str,
}

impl fmt::Display for PathCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// From the first route of the table to the last: the regex routes sit in the middle,
/// so everything from `gn_commons` on runs them.
pub const PATHS: [PathCase; 7] = [
    PathCase {
        name: "api_call",
        method: Method::GET,
        path: "/geonature/api/gn_commons/modules",
        route: "geonature-api",
    },
    PathCase {
        name: "quadrige_extraction",
        method: Method::POST,
        path: "/geonature/api/quadrige/data-extractions",
        route: "quadrige-data-extractions",
    },
    PathCase {
        name: "quadrige_download",
        method: Method::GET,
        path: "/geonature/api/quadrige/output_data/extraction_REBENT_2024.zip",
        route: "quadrige-downloads",
    },
    PathCase {
        name: "frontend_file",
        method: Method::GET,
        path: "/geonature/main.4f3c2a1b9e8d7c6f.js",
        route: "frontend",
    },
    PathCase {
        name: "media_file",
        method: Method::GET,
        path: "/geonature/api/media/taxhub/18437/thumbnail/300x400.jpg",
        route: "api-media",
    },
    PathCase {
        name: "unmatched",
        method: Method::GET,
        path: "/favicon.ico",
        route: "(defaults)",
    },
    PathCase {
        name: "percent_encoded",
        method: Method::GET,
        path: "/geonature/api/media/attachments/Relev%C3%A9%20terrain%202024.pdf",
        route: "api-media",
    },
];

impl PathCase {
    /// The route phase as the proxy runs it for a request that needs no GraphQL peek.
    pub fn run<'t>(&self, fixture: &'t Fixture) -> &'t Route {
        match fixture.routes.select(0, &self.method, self.path, None) {
            Selection::Route(index) => fixture.routes.get(index),
            Selection::NeedsOperation(_) => unreachable!("geonature.toml has no GraphQL route"),
        }
    }

    /// Panics unless the case takes the route it stands for: a measurement of another
    /// walk through the table would be a measurement of something else.
    pub fn check(&self, fixture: &Fixture) {
        let got = &self.run(fixture).name;
        assert_eq!(&**got, self.route, "{}: {}", self.name, self.path);
    }
}

/// Firefox asking the GeoNature frontend's API for the module list, as hyper parses it.
const BROWSER_REQUEST: &[(&str, &str)] = &[
    ("host", "geonature.example.org"),
    (
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ),
    ("accept", "application/json, text/plain, */*"),
    ("accept-language", "fr,fr-FR;q=0.8,en-US;q=0.5,en;q=0.3"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("referer", "https://geonature.example.org/geonature/"),
    (
        "authorization",
        "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpZF9yb2xlIjozLCJpZF9vcmdhbmlzbWUiOjEsImV4cCI6MTcyMDAwMDAwMH0.c2lnbmF0dXJl",
    ),
    ("connection", "keep-alive"),
    (
        "cookie",
        "token=eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpZF9yb2xlIjozfQ.c2ln; session=.eJwlzjEOwjAMQNG7eO5g",
    ),
    ("sec-fetch-dest", "empty"),
    ("sec-fetch-mode", "cors"),
    ("sec-fetch-site", "same-origin"),
];

/// The same request relayed by a front proxy declared in `trusted_proxies`, which
/// already gave it an id.
const PROXIED_REQUEST: &[(&str, &str)] = &[
    ("host", "geonature.example.org"),
    (
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ),
    ("accept", "application/json, text/plain, */*"),
    ("accept-language", "fr,fr-FR;q=0.8,en-US;q=0.5,en;q=0.3"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("referer", "https://geonature.example.org/geonature/"),
    (
        "cookie",
        "token=eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpZF9yb2xlIjozfQ.c2ln; session=.eJwlzjEOwjAMQNG7eO5g",
    ),
    ("sec-fetch-mode", "cors"),
    ("x-forwarded-for", "198.51.100.23"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "geonature.example.org"),
    ("x-request-id", "4b9e1c2a-7f3d-4e8a-9c1b-2d5e6f7a8b9c"),
];

/// A GeoNature JSON answer from Gunicorn's gthread worker (flask-cors adds the
/// `Access-Control-*` and `Vary`).
const API_RESPONSE: &[(&str, &str)] = &[
    ("server", "gunicorn"),
    ("date", "Thu, 04 Jul 2024 09:12:41 GMT"),
    ("connection", "keep-alive"),
    ("content-type", "application/json"),
    ("content-length", "18342"),
    ("access-control-allow-origin", "*"),
    ("vary", "Origin, Cookie"),
];

/// Flask's redirect to the slash-ended URL, built from the `Host` it was sent: the
/// upstream's, which the client must not see.
const REDIRECT_RESPONSE: &[(&str, &str)] = &[
    ("server", "gunicorn"),
    ("date", "Thu, 04 Jul 2024 09:12:41 GMT"),
    ("connection", "keep-alive"),
    ("content-type", "text/html; charset=utf-8"),
    ("content-length", "289"),
    (
        "location",
        "http://127.0.0.1:8000/geonature/api/synthese/taxons_tree/",
    ),
    ("vary", "Origin, Cookie"),
];

enum HeaderOp {
    /// The client's head made into the upstream request's: request id, real client,
    /// hop-by-hop and `X-Forwarded-*`, then `Host`.
    Request { peer: IpAddr },
    /// The upstream's head made into the client response's.
    Response,
}

/// A header set and which way it is rewritten.
pub struct HeaderCase {
    pub name: &'static str,
    headers: &'static [(&'static str, &'static str)],
    op: HeaderOp,
}

impl fmt::Display for HeaderCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

pub const HEADERS: [HeaderCase; 4] = [
    HeaderCase {
        name: "request_direct",
        headers: BROWSER_REQUEST,
        op: HeaderOp::Request {
            peer: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        },
    },
    HeaderCase {
        name: "request_via_trusted_proxy",
        headers: PROXIED_REQUEST,
        op: HeaderOp::Request {
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        },
    },
    HeaderCase {
        name: "response_json",
        headers: API_RESPONSE,
        op: HeaderOp::Response,
    },
    HeaderCase {
        name: "response_location_rewrite",
        headers: REDIRECT_RESPONSE,
        op: HeaderOp::Response,
    },
];

/// A head as hyper hands it over, and the request's id once it has one.
pub struct Head {
    pub headers: HeaderMap,
    pub request_id: Option<HeaderValue>,
    /// The client connection's address, made once per connection, not per request.
    pub peer: Option<PeerAddr>,
    /// What the proxy adds to a request, written after its map's fields.
    pub extra: ExtraFields,
}

/// A header map as hyper hands it over for a connection's first request: reserved for
/// the parsed count (later requests on the connection reuse the previous response's map,
/// whose room varies), values that are slices of the connection's read buffer (so
/// cloning one only counts a reference).
fn parsed_headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let buffer = Bytes::from(pairs.iter().map(|(_, v)| *v).collect::<String>());
    let mut headers = HeaderMap::new();
    headers.reserve(pairs.len());
    let mut at = 0;
    for (name, value) in pairs {
        let slice = buffer.slice(at..at + value.len());
        at += value.len();
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            HeaderValue::from_maybe_shared(slice).expect("a valid header value"),
        );
    }
    headers
}

impl HeaderCase {
    /// A fresh input, as hyper parses it.
    pub fn input(&self, fixture: &Fixture) -> Head {
        let headers = parsed_headers(self.headers);
        let request_id = match self.op {
            HeaderOp::Request { .. } => None,
            // By the response, the request path has cloned its id (into the upstream
            // request), so its buffer is already shared.
            HeaderOp::Response => {
                let id = fixture.request_ids.for_request(&HeaderMap::new());
                drop(id.clone());
                Some(id)
            }
        };
        let peer = match self.op {
            HeaderOp::Request { peer } => Some(PeerAddr::new(peer)),
            HeaderOp::Response => None,
        };
        Head {
            headers,
            request_id,
            peer,
            extra: ExtraFields::default(),
        }
    }

    /// What `Proxy::handle`, `upstream_request` and the forward phase (request), or
    /// `respond` (response), do to the head through `proxy::headers`.
    pub fn run(&self, fixture: &Fixture, head: &mut Head) {
        let headers = &mut head.headers;
        match self.op {
            HeaderOp::Request { .. } => {
                let peer = head.peer.as_ref().expect("made by input()");
                let request_id = fixture.request_ids.for_request(headers);
                let client = headers::real_client(headers, peer.ip(), &fixture.trusted_proxies);
                let forwarded = Forwarded {
                    peer,
                    peer_trusted: fixture
                        .trusted_proxies
                        .iter()
                        .any(|c| c.contains(peer.ip())),
                    scheme: "https",
                    server_name: &fixture.server_name,
                };
                head.extra = headers::to_upstream(headers, &forwarded, &request_id);
                headers.insert(header::HOST, fixture.upstream.host_header.clone());
                std::hint::black_box(client);
                head.request_id = Some(request_id);
            }
            HeaderOp::Response => {
                let request_id = head.request_id.as_ref().expect("made by input()");
                headers::to_client_in_pieces(
                    headers,
                    &fixture.upstream.self_origin,
                    Some(&PUBLIC_ORIGIN_PIECES),
                    request_id,
                );
            }
        }
    }

    /// Panics unless a rewrite did what the case is about.
    pub fn check(&self, fixture: &Fixture) {
        let mut head = self.input(fixture);
        self.run(fixture, &mut head);
        let headers = &head.headers;
        let sent = |name| headers.contains_key(name) || head.extra.get(name).is_some();
        assert!(sent("x-request-id"), "{}", self.name);
        assert!(!headers.contains_key(header::CONNECTION), "{}", self.name);
        match self.op {
            HeaderOp::Request { .. } => {
                assert_eq!(headers[header::HOST], fixture.upstream.host_header);
                assert!(sent("x-forwarded-for"), "{}", self.name);
            }
            HeaderOp::Response => {
                if let Some(location) = headers.get(header::LOCATION) {
                    assert!(location.as_bytes().starts_with(PUBLIC_ORIGIN.as_bytes()));
                }
            }
        }
    }
}

/// Apollo Client (Quadrige's frontend) asking for one extraction's state.
const SMALL_BODY: &str = r#"{"operationName":"getExtraction","variables":{"id":4211},"query":"query getExtraction($id: Int!) {\n  extraction(id: $id) {\n    id\n    status\n    fileUrl\n    __typename\n  }\n}"}"#;

/// Apollo's batch link sending three operations in one POST.
const BATCH_BODY: &str = r#"[{"operationName":"getPrograms","variables":{"first":20},"query":"query getPrograms($first: Int) {\n  programs(first: $first) {\n    id\n    label\n    __typename\n  }\n}"},{"operationName":"executeProgramExtraction","variables":{"programId":"REBENT","year":2024,"format":"CSV"},"query":"mutation executeProgramExtraction($programId: String!, $year: Int!, $format: String) {\n  executeProgramExtraction(programId: $programId, year: $year, format: $format) {\n    id\n    __typename\n  }\n}"},{"operationName":"getExtraction","variables":{"id":4211},"query":"query getExtraction($id: Int!) {\n  extraction(id: $id) {\n    id\n    status\n    __typename\n  }\n}"}]"#;

/// A persisted-query GET, where the name is in the query string.
const GET_QUERY: &str = "operationName=getExtraction&variables=%7B%22id%22%3A4211%7D&extensions=%7B%22persistedQuery%22%3A%7B%22version%22%3A1%7D%7D";

enum Peek {
    Body(&'static str),
    Query(&'static str),
}

/// Where the operation name is looked for.
pub struct GraphqlCase {
    pub name: &'static str,
    peek: Peek,
    /// The operations it names, in order.
    operations: &'static [&'static str],
}

impl fmt::Display for GraphqlCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

pub const GRAPHQL: [GraphqlCase; 3] = [
    GraphqlCase {
        name: "small_body",
        peek: Peek::Body(SMALL_BODY),
        operations: &["getExtraction"],
    },
    GraphqlCase {
        name: "batch_body",
        peek: Peek::Body(BATCH_BODY),
        operations: &["getPrograms", "executeProgramExtraction", "getExtraction"],
    },
    GraphqlCase {
        name: "get_query",
        peek: Peek::Query(GET_QUERY),
        operations: &["getExtraction"],
    },
];

impl GraphqlCase {
    /// The `graphql` functions the proxy's peek calls, on a body prefix already read.
    pub fn run(&self) -> Vec<String> {
        match self.peek {
            Peek::Body(body) => graphql::operations_in_json(body.as_bytes()),
            // `peek_operations` wraps the name in a `Vec` too.
            Peek::Query(query) => graphql::operation_in_query(query).into_iter().collect(),
        }
    }

    /// Panics unless every operation is found.
    pub fn check(&self) {
        assert_eq!(self.run(), self.operations, "{}", self.name);
    }
}

/// A request as `Proxy::handle` starts the bookkeeping of its exchange.
pub struct ExchangeCase {
    pub name: &'static str,
    method: Method,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// The route it is counted under, `None` for an answer given before routing.
    route: Option<&'static str>,
}

impl fmt::Display for ExchangeCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

pub const EXCHANGES: [ExchangeCase; 2] = [
    ExchangeCase {
        name: "proxied",
        method: Method::GET,
        target: "/geonature/api/gn_commons/modules?module_code=SYNTHESE",
        headers: BROWSER_REQUEST,
        route: Some("geonature-api"),
    },
    ExchangeCase {
        name: "refused_before_routing",
        method: Method::GET,
        target: "/geonature/api/gn_commons/modules",
        headers: BROWSER_REQUEST,
        route: None,
    },
];

/// The request id an exchange carries: made (and measured) by the header rewrite.
static EXCHANGE_ID: HeaderValue = HeaderValue::from_static("0123456789abcdef0123456789abcdef");

/// The status-page entry, as `Proxy::handle` makes it: with the record's own copy of
/// the target.
fn track(live: &Arc<Live>, head: &Parts, exchange: &Exchange) -> LiveGuard {
    live.track(
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        &head.method,
        &exchange.target,
    )
}

impl ExchangeCase {
    /// The request head as hyper parses it: the target and the values are slices of the
    /// connection's read buffer.
    pub fn input(&self) -> Parts {
        let mut head = http::Request::new(()).into_parts().0;
        head.method = self.method.clone();
        let buffer = Bytes::from(self.target.to_owned());
        head.uri = Uri::from_maybe_shared(buffer.slice(..)).expect("a valid request target");
        head.headers = parsed_headers(self.headers);
        head
    }

    /// What `Proxy::handle` (and `proxy`, once routed) does to start the exchange's log
    /// record and status-page entry: the record, which keeps the entry, is what the
    /// response body holds until it is done.
    pub fn run(&self, fixture: &Fixture, head: &Parts) -> Box<Exchange> {
        let client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let mut exchange = Exchange::begin(
            fixture.access_log.clone(),
            head,
            client,
            EXCHANGE_ID.clone(),
        );
        let live = track(&fixture.live, head, &exchange);
        if let Some(route) = self.route(fixture) {
            exchange.enter_route(route);
            live.tracked.set_route(&route.name);
        }
        exchange.keep_listed(live);
        exchange
    }

    fn route<'t>(&self, fixture: &'t Fixture) -> Option<&'t Route> {
        let wanted = self.route?;
        fixture.routes.iter().find(|route| &*route.name == wanted)
    }

    /// Panics unless the exchange is listed while it runs and forgotten after.
    pub fn check(&self, fixture: &Fixture) {
        assert_eq!(
            self.route(fixture).map(|r| &*r.name),
            self.route,
            "{}",
            self.name
        );
        let head = self.input();
        let before = fixture.live.snapshot().len();
        let kept = self.run(fixture, &head);
        assert_eq!(fixture.live.snapshot().len(), before + 1, "{}", self.name);
        drop(kept);
        assert_eq!(fixture.live.snapshot().len(), before, "{}", self.name);
    }
}

/// A Gunicorn answer to an API call, as it comes off the socket.
const GUNICORN_JSON: &[u8] = b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Thu, 03 Dec 2026 14:00:00 GMT\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 32\r\nX-Request-ID: 5f0c6a2e9d8b4c1a\r\nVary: Cookie\r\n\r\n{\"id\":4211,\"status\":\"SUCCESS\"}\n";

/// A piece of a chunked CSV export: one 8 KiB chunk with its framing.
fn chunked_piece() -> Vec<u8> {
    let mut wire = b"2000\r\n".to_vec();
    wire.extend(std::iter::repeat_n(b'x', 0x2000));
    wire.extend_from_slice(b"\r\n");
    wire
}

/// What the upstream connection does per exchange: write the request head, parse the
/// response head, cut a chunked body's framing.
pub enum UpstreamCase {
    RequestHead,
    ResponseHead,
    ChunkedPiece,
}

pub const UPSTREAM: [UpstreamCase; 3] = [
    UpstreamCase::RequestHead,
    UpstreamCase::ResponseHead,
    UpstreamCase::ChunkedPiece,
];

impl fmt::Display for UpstreamCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamCase::RequestHead => "request_head",
            UpstreamCase::ResponseHead => "response_head",
            UpstreamCase::ChunkedPiece => "chunked_piece",
        })
    }
}

/// The bytes an upstream case reads, in the buffer the connection reads into.
pub struct UpstreamInput {
    request: http::Request<()>,
    extra: ExtraFields,
    wire: BytesMut,
}

impl UpstreamCase {
    /// Built outside the measurement: the request as `to_upstream` leaves it, the bytes
    /// as one read brings them.
    pub fn input(&self, fixture: &Fixture) -> UpstreamInput {
        let case = &HEADERS[0];
        let mut head = case.input(fixture);
        case.run(fixture, &mut head);
        let mut request = http::Request::new(());
        *request.uri_mut() = Uri::from_static("/geonature/api/synthese/for_web?limit=100");
        *request.headers_mut() = head.headers;
        let extra = head.extra;
        let wire = match self {
            UpstreamCase::ChunkedPiece => BytesMut::from(&chunked_piece()[..]),
            _ => BytesMut::from(GUNICORN_JSON),
        };
        UpstreamInput {
            request,
            extra,
            wire,
        }
    }

    /// The operation; returns something of its result so that it is not optimised away.
    pub fn run(&self, input: &mut UpstreamInput) -> usize {
        match self {
            UpstreamCase::RequestHead => {
                codec::encode_head(&input.request, &input.extra, false).len()
            }
            UpstreamCase::ResponseHead => codec::take_head(&mut input.wire, &Method::GET)
                .ok()
                .flatten()
                .map_or(0, |head| head.response.headers().len()),
            UpstreamCase::ChunkedPiece => {
                let mut framing = Framing::Chunked(Chunk::Size);
                let mut passed = 0;
                while let Ok(step) = codec::step_chunked(&mut input.wire, &mut framing) {
                    match step {
                        Step::Data(data) => passed += data.len(),
                        Step::Again if framing == Framing::Chunked(Chunk::Size) => break,
                        Step::Again => {}
                        Step::Short => break,
                    }
                }
                passed
            }
        }
    }

    /// Panics unless the operation does its job on its input.
    pub fn check(&self, fixture: &Fixture) {
        let expected = match self {
            UpstreamCase::RequestHead => 300,
            UpstreamCase::ResponseHead => 7,
            UpstreamCase::ChunkedPiece => 0x2000,
        };
        let got = self.run(&mut self.input(fixture));
        match self {
            UpstreamCase::RequestHead => assert!(got > expected, "{self}: {got} bytes"),
            _ => assert_eq!(got, expected, "{self}"),
        }
    }
}
