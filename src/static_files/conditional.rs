//! Validators (ETag, Last-Modified), conditional requests (RFC 9110 §13) and byte
//! ranges (RFC 9110 §14) for files.

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderValue};

/// What identifies one version of a file.
#[derive(Debug, Clone)]
pub struct Validators {
    /// Strong, from size and modification time to the nanosecond (like nginx's and
    /// Apache's `FileETag MTime Size`): a rebuilt file gets a new tag, and `If-Range`,
    /// which needs a strong tag, works.
    pub etag: String,
    /// Whole seconds, never later than now (RFC 9110 §8.8.2.1).
    pub last_modified: SystemTime,
}

impl Validators {
    pub fn new(len: u64, modified: SystemTime) -> Validators {
        let since_epoch = modified.duration_since(UNIX_EPOCH).unwrap_or_default();
        let etag = format!(
            "\"{:x}.{:x}-{len:x}\"",
            since_epoch.as_secs(),
            since_epoch.subsec_nanos()
        );
        let clamped = modified.min(SystemTime::now());
        let secs = clamped
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Validators {
            etag,
            last_modified: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    pub fn etag_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.etag).ok()
    }

    pub fn last_modified_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&httpdate::fmt_http_date(self.last_modified)).ok()
    }
}

/// What the preconditions say (evaluated in the order of RFC 9110 §13.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    Proceed,
    /// 304: the client's copy is current.
    NotModified,
    /// 412: `If-Match` or `If-Unmodified-Since` failed.
    Failed,
}

/// Evaluates the preconditions of a GET or HEAD.
pub fn evaluate(headers: &HeaderMap, v: &Validators) -> Precondition {
    match text(headers, &header::IF_MATCH) {
        Some(list) if !matches_list(list, &v.etag, strong_eq) => return Precondition::Failed,
        Some(_) => {}
        None => {
            let unmodified = date(headers, &header::IF_UNMODIFIED_SINCE);
            if unmodified.is_some_and(|since| v.last_modified > since) {
                return Precondition::Failed;
            }
        }
    }
    if let Some(list) = text(headers, &header::IF_NONE_MATCH) {
        return if matches_list(list, &v.etag, weak_eq) {
            Precondition::NotModified
        } else {
            Precondition::Proceed
        };
    }
    // Apache's rule: a date in the future is not a valid validator.
    match date(headers, &header::IF_MODIFIED_SINCE) {
        Some(since) if since <= SystemTime::now() && v.last_modified <= since => {
            Precondition::NotModified
        }
        _ => Precondition::Proceed,
    }
}

/// What a GET with a `Range` header gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole file: no range, an invalid or multi-part one, a failed
    /// `If-Range`, or an empty file.
    Full,
    /// 206 with these bytes.
    Partial(Range<u64>),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Decides the byte range of a GET for a file of `len` bytes.
///
/// Several ranges get the whole file: a multipart/byteranges answer buys nothing to
/// GeoNature's clients, and RFC 9110 §14.2 lets a server ignore `Range`.
pub fn range(headers: &HeaderMap, v: &Validators, len: u64) -> RangeAnswer {
    let Some(spec) = text(headers, &header::RANGE) else {
        return RangeAnswer::Full;
    };
    if len == 0 || !if_range_holds(headers, v) {
        return RangeAnswer::Full;
    }
    let Some(set) = spec.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    match (specs.next(), specs.next()) {
        (Some(one), None) => single_range(one, len),
        _ => RangeAnswer::Full,
    }
}

/// `first-last`, `first-` or `-suffix`; an unreadable spec makes the header ignored.
fn single_range(spec: &str, len: u64) -> RangeAnswer {
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        (true, _, Some(0)) => RangeAnswer::Unsatisfiable,
        (true, _, Some(suffix)) => RangeAnswer::Partial(len.saturating_sub(suffix)..len),
        (false, Some(start), _) if start >= len => RangeAnswer::Unsatisfiable,
        (false, Some(start), None) if last.trim().is_empty() => RangeAnswer::Partial(start..len),
        (false, Some(start), Some(end)) if end >= start => {
            RangeAnswer::Partial(start..end.saturating_add(1).min(len))
        }
        _ => RangeAnswer::Full,
    }
}

/// `If-Range` holds when it names the current version: a strong ETag match, or the
/// exact Last-Modified date. A weak tag never holds.
fn if_range_holds(headers: &HeaderMap, v: &Validators) -> bool {
    let Some(value) = text(headers, &header::IF_RANGE).map(str::trim) else {
        return true;
    };
    if value.starts_with('"') || value.starts_with("W/") {
        return strong_eq(value, &v.etag);
    }
    httpdate::parse_http_date(value).is_ok_and(|d| d == v.last_modified)
}

/// Whether a comma-separated list of entity tags (or `*`) names `etag`.
fn matches_list(list: &str, etag: &str, eq: fn(&str, &str) -> bool) -> bool {
    let list = list.trim();
    list == "*" || list.split(',').any(|candidate| eq(candidate.trim(), etag))
}

fn strong_eq(a: &str, b: &str) -> bool {
    !a.starts_with("W/") && !b.starts_with("W/") && a == b
}

fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

fn text<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header's HTTP-date; an invalid one is ignored (RFC 9110 §13.1.3).
fn date(headers: &HeaderMap, name: &header::HeaderName) -> Option<SystemTime> {
    text(headers, name).and_then(|t| httpdate::parse_http_date(t.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validators {
        Validators::new(100, UNIX_EPOCH + Duration::new(1_700_000_000, 5))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn if_none_match_wins_over_if_modified_since() {
        let v = v();
        let lm = httpdate::fmt_http_date(v.last_modified);
        let etag = v.etag.clone();
        let weak = format!("W/{etag}");
        let cases = [
            (
                vec![("if-none-match", etag.as_str())],
                Precondition::NotModified,
            ),
            (
                vec![("if-none-match", weak.as_str())],
                Precondition::NotModified,
            ),
            (
                vec![("if-none-match", "\"other\", *")],
                Precondition::Proceed,
            ),
            (vec![("if-none-match", "*")], Precondition::NotModified),
            (
                vec![("if-modified-since", lm.as_str())],
                Precondition::NotModified,
            ),
            (
                vec![
                    ("if-none-match", "\"other\""),
                    ("if-modified-since", lm.as_str()),
                ],
                Precondition::Proceed,
            ),
            (vec![("if-match", "\"other\"")], Precondition::Failed),
            (vec![("if-match", weak.as_str())], Precondition::Failed),
            (vec![("if-match", etag.as_str())], Precondition::Proceed),
            (
                vec![("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
                Precondition::Failed,
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(evaluate(&headers(&pairs), &v), expected, "{pairs:?}");
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let v = v();
        let r = |spec: &str| range(&headers(&[("range", spec)]), &v, 100);
        assert_eq!(r("bytes=0-9"), RangeAnswer::Partial(0..10));
        assert_eq!(r("bytes=90-200"), RangeAnswer::Partial(90..100));
        assert_eq!(r("bytes=5-"), RangeAnswer::Partial(5..100));
        assert_eq!(r("bytes=-10"), RangeAnswer::Partial(90..100));
        assert_eq!(r("bytes=-1000"), RangeAnswer::Partial(0..100));
        assert_eq!(r("bytes=100-"), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=-0"), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), RangeAnswer::Full);
        assert_eq!(r("bytes=9-3"), RangeAnswer::Full);
        assert_eq!(r("items=0-3"), RangeAnswer::Full);
        assert_eq!(r("bytes=a-3"), RangeAnswer::Full);
        assert_eq!(r("bytes=0-99999999999999999999999"), RangeAnswer::Full);
        assert_eq!(
            range(&headers(&[("range", "bytes=0-1")]), &v, 0),
            RangeAnswer::Full
        );
    }

    #[test]
    fn if_range_needs_the_current_strong_validator() {
        let v = v();
        let lm = httpdate::fmt_http_date(v.last_modified);
        let weak = format!("W/{}", v.etag);
        let r = |if_range: &str| {
            range(
                &headers(&[("range", "bytes=0-0"), ("if-range", if_range)]),
                &v,
                100,
            )
        };
        assert_eq!(r(&v.etag), RangeAnswer::Partial(0..1));
        assert_eq!(r(&lm), RangeAnswer::Partial(0..1));
        assert_eq!(r(&weak), RangeAnswer::Full);
        assert_eq!(r("\"old\""), RangeAnswer::Full);
        assert_eq!(r("Sun, 06 Nov 1994 08:49:37 GMT"), RangeAnswer::Full);
    }
}
