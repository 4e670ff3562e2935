//! From the request path to file names under a root, refusing anything that could
//! name a file elsewhere.
//!
//! The path is taken as received (still percent-encoded), the route's `strip_prefix`
//! removed, then each segment is decoded on its own. So an encoded slash cannot create
//! a segment boundary after the checks, and no segment can be `.`, `..`, hold a
//! backslash or a NUL, however it was spelled. Browsers resolve dot segments before
//! sending (RFC 3986 §5.2.4), so a `..` only ever comes from a crafted request: it is
//! refused, not normalised.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

/// Linux's NAME_MAX and PATH_MAX: longer names cannot exist, so they are refused before
/// the file system is asked (and answers with an error that is not "not found").
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;

/// Why a path cannot name a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    /// Not a well-formed path: a broken `%` escape or a NUL byte (400, as nginx).
    #[error("malformed path: {0}")]
    Malformed(&'static str),
    /// Well-formed but not a name under the root (404, as Apache answers an encoded
    /// slash, and what a missing file gets: the client learns nothing).
    #[error("refused path: {0}")]
    Unsafe(&'static str),
}

/// The request path as file names under a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelativePath {
    pub segments: Vec<OsString>,
    /// The path ended with `/`: it must name a directory.
    pub trailing_slash: bool,
}

/// Maps `raw` (the request path as received) below `strip_prefix`.
pub fn map(raw: &str, strip_prefix: &str) -> Result<RelativePath, PathRefusal> {
    let rest = raw
        .strip_prefix(strip_prefix)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .ok_or(PathRefusal::Unsafe("outside the route's prefix"))?;
    let mut segments = Vec::new();
    let mut total = 0;
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        let name = decode_segment(segment)?;
        total += name.len() + 1;
        if total > PATH_MAX {
            return Err(PathRefusal::Unsafe("path too long"));
        }
        segments.push(name);
    }
    Ok(RelativePath {
        segments,
        trailing_slash: rest.ends_with('/'),
    })
}

/// Percent-decodes one segment and checks the name it gives.
fn decode_segment(segment: &str) -> Result<OsString, PathRefusal> {
    let name = percent_decode(segment.as_bytes())?;
    if name.contains(&0) {
        return Err(PathRefusal::Malformed("NUL byte"));
    }
    if name.contains(&b'/') {
        return Err(PathRefusal::Unsafe("encoded slash"));
    }
    if name.contains(&b'\\') {
        return Err(PathRefusal::Unsafe("backslash"));
    }
    if name == b"." || name == b".." {
        return Err(PathRefusal::Unsafe("dot segment"));
    }
    if name.len() > NAME_MAX {
        return Err(PathRefusal::Unsafe("name too long"));
    }
    // File names are bytes on Unix: a name that is not UTF-8 is still a name.
    Ok(OsString::from_vec(name))
}

fn percent_decode(input: &[u8]) -> Result<Vec<u8>, PathRefusal> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter();
    while let Some(&b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let high = bytes.next().and_then(|&h| hex(h));
        let low = bytes.next().and_then(|&l| hex(l));
        match (high, low) {
            (Some(h), Some(l)) => out.push(h << 4 | l),
            _ => return Err(PathRefusal::Malformed("broken percent escape")),
        }
    }
    Ok(out)
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(raw: &str) -> Result<Vec<String>, PathRefusal> {
        map(raw, "/gn").map(|p| {
            p.segments
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn decodes_segments_and_keeps_the_trailing_slash() {
        assert_eq!(names("/gn/a%20b/c.js").unwrap(), ["a b", "c.js"]);
        assert_eq!(names("/gn//x").unwrap(), ["x"]);
        assert!(map("/gn/dir/", "/gn").unwrap().trailing_slash);
        let root = map("/gn", "/gn").unwrap();
        assert!(root.segments.is_empty() && !root.trailing_slash);
        assert_eq!(names("/gn/%C3%A9t%C3%A9.txt").unwrap(), ["été.txt"]);
    }

    #[test]
    fn refuses_every_spelling_of_a_way_out() {
        use PathRefusal::*;
        for raw in [
            "/gn/../x",
            "/gn/%2e%2e/x",
            "/gn/.%2E/x",
            "/gn/./x",
            "/gn/a/..",
        ] {
            assert_eq!(map(raw, "/gn"), Err(Unsafe("dot segment")), "{raw}");
        }
        assert_eq!(map("/gn/..%2fetc", "/gn"), Err(Unsafe("encoded slash")));
        assert_eq!(map("/gn/%2Fetc", "/gn"), Err(Unsafe("encoded slash")));
        assert_eq!(map("/gn/..\\x", "/gn"), Err(Unsafe("backslash")));
        assert_eq!(map("/gn/a%5cb", "/gn"), Err(Unsafe("backslash")));
        assert_eq!(map("/gn/a%00.js", "/gn"), Err(Malformed("NUL byte")));
        assert_eq!(
            map("/gn/a%zz", "/gn"),
            Err(Malformed("broken percent escape"))
        );
        assert_eq!(
            map("/gn/a%4", "/gn"),
            Err(Malformed("broken percent escape"))
        );
        assert_eq!(
            map("/gnx/a", "/gn"),
            Err(Unsafe("outside the route's prefix"))
        );
        let long = format!("/gn/{}", "a".repeat(256));
        assert_eq!(map(&long, "/gn"), Err(Unsafe("name too long")));
        let deep = format!("/gn{}", "/abcdefgh".repeat(500));
        assert_eq!(map(&deep, "/gn"), Err(Unsafe("path too long")));
    }
}
