//! Our own header handling on arbitrary header maps: hop-by-hop removal, the forwarded
//! headers, the real client behind trusted proxies, request id sanitising, `Location`
//! rewriting, and the request conformance checks. Input: a request line
//! (`METHOD target`) then `name:value` lines.
#![no_main]

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use quadrige_proxy::config::Cidr;
use quadrige_proxy::proxy::conformance;
use quadrige_proxy::proxy::headers::{self, Forwarded, PeerAddr, RequestIds};

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fn assert_no_hop_by_hop(map: &HeaderMap, named: &[HeaderName]) {
    for name in HOP_BY_HOP {
        assert!(!map.contains_key(name), "`{name}` survived");
    }
    for name in named {
        assert!(
            !map.contains_key(name),
            "`{name}`, named by Connection, survived"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    let mut map = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    let named: Vec<HeaderName> = map
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();

    let mut stripped = map.clone();
    headers::strip_hop_by_hop(&mut stripped);
    assert_no_hop_by_hop(&stripped, &named);
    let _ = headers::wants_close(&map);

    let ids = RequestIds::new();
    let id = ids.for_request(&map);
    assert!(!id.is_empty() && id.len() <= 200);
    assert!(id.as_bytes().iter().all(|b| b.is_ascii_graphic()), "{id:?}");

    let server = HeaderValue::from_static("edge");
    for (peer, peer_trusted) in [("192.0.2.7", false), ("10.0.0.1", true)] {
        let mut upstream = map.clone();
        let forwarded = Forwarded {
            peer: &PeerAddr::new(peer.parse().unwrap()),
            peer_trusted,
            scheme: "https",
            server_name: &server,
        };
        let extra = headers::to_upstream(&mut upstream, &forwarded, &id);
        assert_no_hop_by_hop(&upstream, &named);
        // What the upstream gets: the map's fields, then the added ones.
        let sent = |name: &str| -> Vec<HeaderValue> {
            let added = extra.iter().filter(|(n, _)| *n == name).map(|(_, v)| v);
            upstream.get_all(name).iter().chain(added).cloned().collect()
        };
        let xff = sent("x-forwarded-for");
        assert_eq!(xff.len(), 1);
        assert!(xff[0].as_bytes().ends_with(peer.as_bytes()));
        if !peer_trusted {
            assert_eq!(xff[0], peer);
            assert_eq!(sent("x-forwarded-proto"), [HeaderValue::from_static("https")]);
        }
        assert_eq!(sent("x-request-id"), [id.clone()]);
    }

    // Behind trusted proxies: the answer is the peer or an address of the list, and
    // never one left of an entry that is not an address.
    let trusted = [
        Cidr::parse("10.0.0.0/8").unwrap(),
        Cidr::parse("::1/128").unwrap(),
    ];
    let outsider: IpAddr = "198.51.100.1".parse().unwrap();
    assert_eq!(headers::real_client(&map, outsider, &trusted), outsider);
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let client = headers::real_client(&map, peer, &trusted);
    let lines: Vec<Option<&str>> = map
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().ok())
        .collect();
    let mut believable = vec![peer];
    'walk: for line in lines.iter().rev() {
        let Some(line) = line else { break };
        for entry in line.rsplit(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    believable.push(ip);
                    if !trusted.iter().any(|c| c.contains(ip)) {
                        break 'walk;
                    }
                }
                Err(_) => break 'walk,
            }
        }
    }
    assert!(believable.contains(&client), "{client} from {lines:?}");

    let mut client = map.clone();
    headers::to_client(
        &mut client,
        "http://127.0.0.1:8080",
        Some("https://gn.example"),
        &id,
    );
    assert_no_hop_by_hop(&client, &named);
    if let Some(location) = client.get("location") {
        assert!(!location.as_bytes().starts_with(b"http://127.0.0.1:8080/"));
    }

    // The conformance checks on the same headers, under the request line.
    let mut words = request_line.splitn(2, |b| *b == b' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return;
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(target)) else {
        return;
    };
    for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
        let mut request = Request::new(());
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.version_mut() = version;
        *request.headers_mut() = map.clone();
        let (parts, ()) = request.into_parts();
        if conformance::check(&parts).is_ok() {
            assert!(parts.headers.get_all("host").iter().count() <= 1);
            assert!(parts.method != Method::CONNECT);
            assert!(
                parts.uri.path_and_query().map_or(0, |p| p.as_str().len())
                    <= conformance::MAX_TARGET
            );
        }
    }
});
