//! Requests refused before routing: what hyper's parser lets through but an origin
//! server must reject (RFC 9112 §3.2, §6.1, RFC 9110 §4.2.4), so the upstream never has
//! to guess. hyper already answers malformed syntax (400), too many or too large
//! headers (431) and a request target over 64 KiB (414), and it resolves
//! `Content-Length` + `Transfer-Encoding` as the RFC says (chunked wins, the length is
//! dropped, the connection closes). What is left is checked here:
//!
//! - `CONNECT`: we are not a forward proxy (405);
//! - the request target: origin-form, absolute-form `http(s)://host[:port]/...` without
//!   userinfo, or `*` for `OPTIONS`; at most [`MAX_TARGET`] bytes (Apache's
//!   `LimitRequestLine` is 8190), else 414;
//! - `Host`: exactly one on HTTP/1.1, at most one otherwise, and a valid `host[:port]`;
//! - `Transfer-Encoding`: hyper accepts any list ending in `chunked`, but we re-frame
//!   the body and forward it as plain `chunked`, so a request coding below it
//!   (`gzip, chunked`) would reach the upstream silently decoded as something else: 501;
//!   `chunked` applied twice is invalid: 400.

use std::fmt;

use http::request::Parts;
use http::{header, Method, StatusCode, Version};

/// The longest request target (path and query) we forward.
pub const MAX_TARGET: usize = 8 * 1024;

/// Why a request was refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Connect,
    TargetForm,
    UserInfo,
    TargetTooLong,
    MissingHost,
    SeveralHosts,
    InvalidHost,
    UnknownTransferCoding,
    RepeatedChunked,
}

impl Malformed {
    pub fn status(self) -> StatusCode {
        match self {
            Malformed::Connect => StatusCode::METHOD_NOT_ALLOWED,
            Malformed::TargetTooLong => StatusCode::URI_TOO_LONG,
            Malformed::UnknownTransferCoding => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Malformed::Connect => "method_not_allowed",
            Malformed::TargetTooLong => "uri_too_long",
            Malformed::UnknownTransferCoding => "transfer_coding_not_implemented",
            _ => "bad_request",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::Connect => "CONNECT is not supported: this is a reverse proxy",
            Malformed::TargetForm => "the request target must be a path (or an http URL)",
            Malformed::UserInfo => "the request target must not carry user information",
            Malformed::TargetTooLong => "the request target is longer than 8 KiB",
            Malformed::MissingHost => "an HTTP/1.1 request needs a Host header",
            Malformed::SeveralHosts => "the request has more than one Host header",
            Malformed::InvalidHost => "the Host header is not a valid host[:port]",
            Malformed::UnknownTransferCoding => {
                "only the chunked transfer coding is supported in requests"
            }
            Malformed::RepeatedChunked => "the chunked transfer coding is applied more than once",
        })
    }
}

/// Checks a request head; `Err` says why it must be refused.
pub fn check(parts: &Parts) -> Result<(), Malformed> {
    if parts.method == Method::CONNECT {
        return Err(Malformed::Connect);
    }
    check_target(parts)?;
    check_host(parts)?;
    check_transfer_encoding(parts)
}

fn check_target(parts: &Parts) -> Result<(), Malformed> {
    let uri = &parts.uri;
    if let Some(authority) = uri.authority() {
        // Absolute-form (authority-form is only for CONNECT).
        let scheme = uri.scheme_str().unwrap_or("");
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(Malformed::TargetForm);
        }
        if authority.as_str().contains('@') {
            return Err(Malformed::UserInfo);
        }
    } else if uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err(Malformed::TargetForm);
    }
    let target_len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > MAX_TARGET {
        return Err(Malformed::TargetTooLong);
    }
    Ok(())
}

fn check_host(parts: &Parts) -> Result<(), Malformed> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(Malformed::SeveralHosts),
        (None, _) if parts.version == Version::HTTP_11 => Err(Malformed::MissingHost),
        (None, _) => Ok(()),
        (Some(host), None) => {
            let bytes = host.as_bytes();
            // Empty is allowed for a target without authority (RFC 9112 §3.2).
            if bytes.is_empty() {
                return Ok(());
            }
            let valid = !bytes.contains(&b'@')
                && http::uri::Authority::try_from(bytes).is_ok_and(|a| valid_port(a.as_str()));
            if valid {
                Ok(())
            } else {
                Err(Malformed::InvalidHost)
            }
        }
    }
}

/// The port of `host[:port]`, when there is one, is a number (maybe empty, RFC 3986).
fn valid_port(authority: &str) -> bool {
    let after_host = authority
        .rfind(']')
        .map_or(authority, |i| &authority[i + 1..]);
    match after_host.split_once(':') {
        Some((_, port)) => port.is_empty() || port.parse::<u16>().is_ok(),
        None => true,
    }
}

fn check_transfer_encoding(parts: &Parts) -> Result<(), Malformed> {
    let mut chunked = 0;
    for value in parts.headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Err(Malformed::UnknownTransferCoding);
        };
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                return Err(Malformed::UnknownTransferCoding);
            }
        }
    }
    if chunked > 1 {
        return Err(Malformed::RepeatedChunked);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn h11(method: &str, target: &str, headers: &[(&str, &str)]) -> Result<(), Malformed> {
        check(&parts(method, target, Version::HTTP_11, headers))
    }

    const HOST: (&str, &str) = ("host", "gn.example");

    #[test]
    fn ordinary_requests_pass() {
        assert_eq!(h11("GET", "/geonature/api/x?a=1", &[HOST]), Ok(()));
        assert_eq!(h11("OPTIONS", "*", &[HOST]), Ok(()));
        assert_eq!(h11("GET", "http://gn.example:8080/x", &[HOST]), Ok(()));
        assert_eq!(h11("GET", "/x", &[("host", "[::1]:8088")]), Ok(()));
        assert_eq!(h11("GET", "/x", &[("host", "")]), Ok(()));
        assert_eq!(
            h11("POST", "/x", &[HOST, ("transfer-encoding", "Chunked")]),
            Ok(())
        );
        // HTTP/1.0 needs no Host; HTTP/2 carries it in :authority.
        assert_eq!(check(&parts("GET", "/x", Version::HTTP_10, &[])), Ok(()));
        assert_eq!(
            check(&parts("GET", "https://gn.example/x", Version::HTTP_2, &[])),
            Ok(())
        );
    }

    #[test]
    fn request_targets_other_than_paths_and_http_urls_are_refused() {
        assert_eq!(
            h11("CONNECT", "gn.example:443", &[HOST]),
            Err(Malformed::Connect)
        );
        assert_eq!(
            h11("GET", "gn.example:80", &[HOST]),
            Err(Malformed::TargetForm)
        );
        assert_eq!(h11("GET", "*", &[HOST]), Err(Malformed::TargetForm));
        assert_eq!(
            h11("GET", "ftp://gn.example/x", &[HOST]),
            Err(Malformed::TargetForm)
        );
        assert_eq!(
            h11("GET", "http://user:pw@gn.example/x", &[HOST]),
            Err(Malformed::UserInfo)
        );
        let long = format!("/{}", "a".repeat(MAX_TARGET));
        assert_eq!(h11("GET", &long, &[HOST]), Err(Malformed::TargetTooLong));
        assert_eq!(h11("GET", &long[..MAX_TARGET], &[HOST]), Ok(()));
    }

    #[test]
    fn host_must_be_single_and_valid() {
        assert_eq!(h11("GET", "/x", &[]), Err(Malformed::MissingHost));
        assert_eq!(
            h11("GET", "/x", &[HOST, ("host", "evil.example")]),
            Err(Malformed::SeveralHosts)
        );
        for bad in [
            "evil<x>",
            "a/b",
            "user@gn.example",
            "gn.example:port",
            "a b",
        ] {
            assert_eq!(
                h11("GET", "/x", &[("host", bad)]),
                Err(Malformed::InvalidHost),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let te = |value: &'static str| h11("POST", "/x", &[HOST, ("transfer-encoding", value)]);
        assert_eq!(te("gzip, chunked"), Err(Malformed::UnknownTransferCoding));
        assert_eq!(te("chunked, chunked"), Err(Malformed::RepeatedChunked));
        assert_eq!(
            h11(
                "POST",
                "/x",
                &[
                    HOST,
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err(Malformed::RepeatedChunked)
        );
        assert_eq!(te("identity"), Err(Malformed::UnknownTransferCoding));
    }
}
