//! Header rewriting in both directions: hop-by-hop removal (RFC 9110 §7.6.1), the
//! `X-Forwarded-*` family and `Host` as Apache's mod_proxy sets them, request ids, and
//! `Location` rewriting like `ProxyPassReverse`.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Cidr;
use crate::upstream::ExtraFields;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_SERVER: HeaderName = HeaderName::from_static("x-forwarded-server");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1);
/// `Connection` first, for [`strip_hop_by_hop`].
const HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
];

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them, or only `Connection`: removing all nine would
    // hash and look up each one.
    let present = present(headers, &HOP_BY_HOP);
    if present[0] {
        remove_connection_options(headers);
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(*name);
        }
    }
}

/// Which of `names` `headers` holds, in one walk over its names: looking each up would
/// hash it, byte by byte for a name `http` does not know.
fn present<const N: usize>(headers: &HeaderMap, names: &[&HeaderName; N]) -> [bool; N] {
    let mut present = [false; N];
    for name in headers.keys() {
        if let Some(i) = names.iter().position(|n| *n == name) {
            present[i] = true;
        }
    }
    present
}

/// Removes the headers the `Connection` lines name, those lines left in place.
fn remove_connection_options(headers: &mut HeaderMap) {
    // Each line is cloned (a reference count: its bytes are shared) so that the map
    // can be changed while the line is read. Names are looked up as text, which parses
    // them on the stack; a `HeaderName` for a non-standard name would be an allocation.
    // Tokens naming a hop-by-hop header are left to the caller, so the `Connection`
    // lines stay in place while they are walked.
    let mut line = 0;
    while let Some(value) = headers
        .get_all(header::CONNECTION)
        .iter()
        .nth(line)
        .cloned()
    {
        line += 1;
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            if !HOP_BY_HOP
                .iter()
                .any(|name| token.eq_ignore_ascii_case(name.as_str()))
            {
                headers.remove(token);
            }
        }
    }
}

/// Whether the message asks for its connection to be closed after it.
pub fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// A client connection's peer address, with the text every request on the connection
/// writes into `X-Forwarded-For`: formatted once per connection, not per request.
#[derive(Debug, Clone)]
pub struct PeerAddr {
    ip: IpAddr,
    text: HeaderValue,
}

impl PeerAddr {
    pub fn new(ip: IpAddr) -> PeerAddr {
        let mut text = StackText::<IP_TEXT_MAX>::new();
        // Never fails: an address fits in IP_TEXT_MAX.
        let _ = write!(text, "{ip}");
        // Owned as it is, so that every request's clone only counts a reference (a
        // copied `Vec` would allocate again at its first clone).
        let text = HeaderValue::from_maybe_shared(Bytes::from_owner(text))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        PeerAddr { ip, text }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// What the forwarded headers say about the client side of the exchange.
pub struct Forwarded<'a> {
    /// The TCP peer: the client, or a proxy in front of us.
    pub peer: &'a PeerAddr,
    /// Whether the peer is one of `trusted_proxies`, whose `X-Forwarded-*` we keep.
    pub peer_trusted: bool,
    pub scheme: &'static str,
    pub server_name: &'a HeaderValue,
}

/// The client's fields that [`to_upstream`] replaces or keeps.
const FORWARDED: [&HeaderName; 5] = [
    &X_FORWARDED_HOST,
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_SERVER,
    &X_REQUEST_ID,
];

/// Rewrites a client request's headers for the upstream; returns the fields the proxy
/// adds, which are written after the client's (see [`ExtraFields`]).
pub fn to_upstream(
    headers: &mut HeaderMap,
    forwarded: &Forwarded<'_>,
    request_id: &HeaderValue,
) -> ExtraFields {
    strip_hop_by_hop(headers);
    // We answer `Expect: 100-continue` ourselves when we start reading the body.
    headers.remove(header::EXPECT);
    let [host_sent, for_sent, proto_sent, server_sent, id_sent] = present(headers, &FORWARDED);
    let trusted = forwarded.peer_trusted;
    let mut extra = ExtraFields::default();
    // The client's field goes, ours (if any) is added.
    let mut replace = |headers: &mut HeaderMap, name: &'static HeaderName, sent, ours| {
        if sent {
            headers.remove(name);
        }
        if let Some(value) = ours {
            extra.push(name, value);
        }
    };
    if !(trusted && host_sent) {
        let host = headers.get(header::HOST).cloned();
        replace(headers, &X_FORWARDED_HOST, host_sent, host);
    }
    // An untrusted client's claims about where it comes from are dropped, not extended.
    let list = (trusted && for_sent)
        .then(|| forwarded_for_list(headers, &forwarded.peer.text))
        .flatten();
    let list = list.unwrap_or_else(|| forwarded.peer.text.clone());
    replace(headers, &X_FORWARDED_FOR, for_sent, Some(list));
    if !(trusted && proto_sent) {
        let scheme = HeaderValue::from_static(forwarded.scheme);
        replace(headers, &X_FORWARDED_PROTO, proto_sent, Some(scheme));
    }
    let server = forwarded.server_name.clone();
    replace(headers, &X_FORWARDED_SERVER, server_sent, Some(server));
    replace(headers, &X_REQUEST_ID, id_sent, Some(request_id.clone()));
    extra
}

/// The client's `X-Forwarded-For` list with `client` appended, as Apache does (a single
/// field, comma list); `None` when there is no usable list.
fn forwarded_for_list(headers: &HeaderMap, client: &HeaderValue) -> Option<HeaderValue> {
    let previous = || {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
    };
    previous().next()?;
    // Measured first so that the value is one exact-size buffer, which `Bytes` then
    // takes over without copying or allocating its own header.
    let len = previous().map(|text| text.len() + 2).sum::<usize>() + client.len();
    let mut value = Vec::with_capacity(len);
    for text in previous() {
        value.extend_from_slice(text.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(client.as_bytes());
    HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
}

/// Room for the text of any IP address: C's `INET6_ADDRSTRLEN` less its NUL.
const IP_TEXT_MAX: usize = 45;

/// Formatted text in a fixed buffer on the stack; a write that does not fit fails.
struct StackText<const N: usize> {
    buffer: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    fn new() -> Self {
        StackText {
            buffer: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

impl<const N: usize> AsRef<[u8]> for StackText<N> {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> fmt::Write for StackText<N> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len + text.len();
        self.buffer
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The address the request really comes from: the peer, unless the peer is a trusted
/// proxy, in which case the right-most untrusted address of `X-Forwarded-For`.
///
/// The list is walked from the right, where our trusted proxies appended what they saw;
/// an entry that is not an address ends the walk (the last address believed wins, as
/// nginx's `real_ip_recursive` does): whatever lies left of it was written by the
/// client and cannot be vouched for.
pub fn real_client(headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else {
            return client;
        };
        for entry in line.rsplit(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) if is_trusted(ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

/// Rewrites the upstream's response headers for the client.
pub fn to_client(
    headers: &mut HeaderMap,
    upstream_origin: &str,
    public_origin: Option<&str>,
    request_id: &HeaderValue,
) {
    let public = public_origin.map(str::as_bytes);
    to_client_in_pieces(
        headers,
        upstream_origin,
        public.as_ref().map(std::slice::from_ref),
        request_id,
    );
}

/// [`to_client`], with the public origin in pieces that are written one after the
/// other (`scheme`, `://`, the client's `Host`): the origin is then never built on its
/// own, only as part of a header that points at the upstream.
pub fn to_client_in_pieces(
    headers: &mut HeaderMap,
    upstream_origin: &str,
    public_origin: Option<&[&[u8]]>,
    request_id: &HeaderValue,
) {
    strip_hop_by_hop(headers);
    if let Some(public) = public_origin {
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            rewrite_self_reference(headers, &name, upstream_origin, public);
        }
    }
    // One lookup (a non-standard name is hashed byte by byte), not a test then an insert.
    headers
        .entry(X_REQUEST_ID.clone())
        .or_insert_with(|| request_id.clone());
}

/// `ProxyPassReverse`: a `Location` pointing at the upstream itself points at us instead.
fn rewrite_self_reference(
    headers: &mut HeaderMap,
    name: &HeaderName,
    upstream: &str,
    public: &[&[u8]],
) {
    // Bytes, not text: a value with non-ASCII bytes in its path is still ours to fix.
    let Some(rest) = headers
        .get(name)
        .and_then(|v| v.as_bytes().strip_prefix(upstream.as_bytes()))
        .filter(|rest| rest.is_empty() || rest.starts_with(b"/") || rest.starts_with(b"?"))
    else {
        return;
    };
    // One exact-size buffer, taken over by `Bytes` as it is.
    let len = public.iter().map(|piece| piece.len()).sum::<usize>() + rest.len();
    let mut value = Vec::with_capacity(len);
    for piece in public {
        value.extend_from_slice(piece);
    }
    value.extend_from_slice(rest);
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
        headers.insert(name.clone(), v);
    }
}

/// Makes request ids: the client's when it is sane, else a new unique one.
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> RequestIds {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS: ids differ between runs and hosts.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        RequestIds {
            prefix: hasher.finish(),
            counter: AtomicU64::new(0),
        }
    }

    /// Keeps an incoming `X-Request-ID` of visible ASCII up to 200 bytes.
    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(id) = headers.get(&X_REQUEST_ID) {
            let bytes = id.as_bytes();
            if !bytes.is_empty() && bytes.len() <= 200 && bytes.iter().all(|b| b.is_ascii_graphic())
            {
                return id.clone();
            }
        }
        self.generate()
    }

    fn generate(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut text = [0u8; 32];
        let digits = self.prefix.to_be_bytes().into_iter().chain(n.to_be_bytes());
        for (pair, byte) in text.chunks_exact_mut(2).zip(digits) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
        // The array itself is the shared owner: one allocation, and the clones the id
        // gets (upstream request, response, log) only count references, where a `Bytes`
        // made from a `Vec` would allocate again at its first clone.
        HeaderValue::from_maybe_shared(Bytes::from_owner(text))
            .unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    /// Every value of `name` the upstream gets: the map's, then the added ones.
    fn sent(map: &HeaderMap, extra: &ExtraFields, name: &str) -> Vec<String> {
        let from_map = map.get_all(name).iter();
        let added = extra.iter().filter(|(n, _)| *n == name).map(|(_, v)| v);
        from_map
            .chain(added)
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn forwarded_headers_follow_apache() {
        let mut h = headers(&[("host", "geonature.fr"), ("x-forwarded-for", "10.0.0.1")]);
        let server = HeaderValue::from_static("proxy-host");
        let f = Forwarded {
            peer: &PeerAddr::new("192.0.2.1".parse().unwrap()),
            peer_trusted: true,
            scheme: "https",
            server_name: &server,
        };
        let extra = to_upstream(&mut h, &f, &HeaderValue::from_static("id1"));
        assert_eq!(
            h["host"], "geonature.fr",
            "Host is set per server by the forward phase"
        );
        let field = |name| sent(&h, &extra, name);
        assert_eq!(field("x-forwarded-host"), ["geonature.fr"]);
        assert_eq!(field("x-forwarded-for"), ["10.0.0.1, 192.0.2.1"]);
        assert_eq!(field("x-forwarded-proto"), ["https"]);
        assert_eq!(field("x-forwarded-server"), ["proxy-host"]);
        assert_eq!(field("x-request-id"), ["id1"]);
    }

    #[test]
    fn forwarded_claims_of_untrusted_clients_are_replaced() {
        let mut h = headers(&[
            ("host", "gn.fr"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let server = HeaderValue::from_static("proxy-host");
        let f = Forwarded {
            peer: &PeerAddr::new("203.0.113.5".parse().unwrap()),
            peer_trusted: false,
            scheme: "http",
            server_name: &server,
        };
        let extra = to_upstream(&mut h, &f, &HeaderValue::from_static("id1"));
        let field = |name| sent(&h, &extra, name);
        assert_eq!(field("x-forwarded-for"), ["203.0.113.5"]);
        assert_eq!(field("x-forwarded-host"), ["gn.fr"]);
        assert_eq!(field("x-forwarded-proto"), ["http"]);
    }

    #[test]
    fn the_real_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted = [
            Cidr::parse("127.0.0.0/8").unwrap(),
            Cidr::parse("10.0.0.0/8").unwrap(),
        ];
        let h = headers(&[("x-forwarded-for", "198.51.100.9, 6.6.6.6, 10.1.1.1")]);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            real_client(&h, local, &trusted),
            "6.6.6.6".parse::<IpAddr>().unwrap()
        );
        let outsider: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(real_client(&h, outsider, &trusted), outsider);
        assert_eq!(real_client(&HeaderMap::new(), local, &trusted), local);
    }

    #[test]
    fn a_forged_address_behind_garbage_is_not_believed() {
        // The client wrote `6.6.6.6, garbage`, our proxy 10.1.1.1 appended the peer it
        // saw: walking from the right, the garbage ends the walk at 10.1.1.1.
        let trusted = [
            Cidr::parse("127.0.0.0/8").unwrap(),
            Cidr::parse("10.0.0.0/8").unwrap(),
        ];
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let ten: IpAddr = "10.1.1.1".parse().unwrap();
        for chain in [
            "10.9.9.9, garbage, 10.1.1.1",
            "10.9.9.9, , 10.1.1.1",
            "10.9.9.9,unknown,10.1.1.1",
        ] {
            let h = headers(&[("x-forwarded-for", chain)]);
            assert_eq!(real_client(&h, local, &trusted), ten, "{chain}");
        }
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "garbage"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(real_client(&h, local, &trusted), outside);
        let h = headers(&[("x-forwarded-for", "10.9.9.9, garbage")]);
        assert_eq!(real_client(&h, local, &trusted), local);
    }

    #[test]
    fn location_pointing_at_the_upstream_is_rewritten() {
        let mut h = headers(&[("location", "http://127.0.0.1:8080/geonature/api/x?y=1")]);
        to_client(
            &mut h,
            "http://127.0.0.1:8080",
            Some("https://gn.fr"),
            &HeaderValue::from_static("i"),
        );
        assert_eq!(h["location"], "https://gn.fr/geonature/api/x?y=1");
        let mut h = headers(&[("location", "http://127.0.0.1:80800/x")]);
        to_client(
            &mut h,
            "http://127.0.0.1:8080",
            Some("https://gn.fr"),
            &HeaderValue::from_static("i"),
        );
        assert_eq!(h["location"], "http://127.0.0.1:80800/x");
    }

    #[test]
    fn location_with_non_ascii_bytes_is_rewritten_too() {
        // Found by the `headers` fuzz target: a value that is not visible ASCII kept
        // the upstream's address.
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            HeaderValue::from_bytes(b"http://127.0.0.1:8080/geona\x8c\x94re/").unwrap(),
        );
        to_client(
            &mut h,
            "http://127.0.0.1:8080",
            Some("https://gn.fr"),
            &HeaderValue::from_static("i"),
        );
        assert_eq!(h["location"].as_bytes(), b"https://gn.fr/geona\x8c\x94re/");
    }

    #[test]
    fn request_ids_keep_sane_client_ids_and_replace_others() {
        let ids = RequestIds::new();
        let kept = ids.for_request(&headers(&[("x-request-id", "abc-123")]));
        assert_eq!(kept, "abc-123");
        let replaced = ids.for_request(&headers(&[("x-request-id", "a b")]));
        assert_eq!(replaced.len(), 32);
        assert_ne!(
            ids.for_request(&HeaderMap::new()),
            ids.for_request(&HeaderMap::new())
        );
    }
}
