//! Finding a GraphQL request's `operationName` without buffering the request.
//!
//! Routes may be told apart by operation (`executeProgramExtraction` needs long timers,
//! `getExtraction` short ones). For a POST the name sits in a JSON body; we only ever look
//! at a bounded prefix of it, which the proxy then re-sends upstream byte for byte. A
//! body that is truncated, not JSON, or has the name beyond the prefix simply yields no
//! name. A batch (a JSON array of operations) yields every name found, and a route
//! matches a batch when any of its operations is listed: the batch runs as long as its
//! slowest member, so it needs that member's timers.

use std::borrow::Cow;

/// The operation names found in a JSON body prefix (empty when none could be read).
pub fn operations_in_json(body: &[u8]) -> Vec<String> {
    let mut scan = Scanner {
        bytes: body,
        pos: 0,
    };
    scan.skip_whitespace();
    if scan.bytes.get(scan.pos..scan.pos + 3) == Some(b"\xEF\xBB\xBF") {
        scan.pos += 3;
        scan.skip_whitespace();
    }
    let mut found = Vec::new();
    match scan.peek() {
        Some(b'{') => {
            if let Some(name) = scan.object_operation() {
                found.push(name);
            }
        }
        Some(b'[') => scan.batch_operations(&mut found),
        _ => {}
    }
    found
}

/// The `operationName` of a GET request's query string, percent-decoded.
pub fn operation_in_query(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "operationName")
            .then(|| percent_decode(value))
            .flatten()
            .filter(|v| !v.is_empty())
            .map(Cow::into_owned)
    })
}

/// Borrows `text` when there is nothing to decode, the usual case for a GraphQL name.
fn percent_decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains(['%', '+']) {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// A forgiving cursor over JSON bytes: every method returns `None` when the input ends
/// or is not the JSON it expects, and never recurses, so hostile nesting costs nothing.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_whitespace();
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    fn batch_operations(&mut self, found: &mut Vec<String>) {
        if self.expect(b'[').is_none() {
            return;
        }
        loop {
            self.skip_whitespace();
            match self.peek() {
                Some(b'{') => found.extend(self.object_operation()),
                _ => return,
            }
            if self.expect(b',').is_none() {
                return;
            }
        }
    }

    /// Walks one object, returning its top-level `operationName` string, also when the
    /// input ends or breaks after it. On return the cursor is after the object (or
    /// wherever the input stopped making sense).
    fn object_operation(&mut self) -> Option<String> {
        let mut name = None;
        self.walk_object(&mut name);
        name
    }

    fn walk_object(&mut self, name: &mut Option<String>) -> Option<()> {
        self.expect(b'{')?;
        loop {
            self.skip_whitespace();
            if self.peek()? == b'}' {
                self.pos += 1;
                return Some(());
            }
            let key = self.string()?;
            self.expect(b':')?;
            self.skip_whitespace();
            if key == "operationName" && self.peek()? == b'"' {
                *name = Some(self.string()?.into_owned());
            } else {
                self.skip_value()?;
            }
            self.skip_whitespace();
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string's value, borrowed from the input unless it has escapes to decode: a
    /// key is compared in place, and a name is copied once, at its size.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.pos;
        let mut end = start;
        let mut escaped = false;
        while let Some(&byte) = self.bytes.get(end) {
            match byte {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    end += 2;
                }
                _ => end += 1,
            }
        }
        let end = end.min(self.bytes.len());
        if !escaped {
            self.pos = end;
            // No closing quote: the input ended inside the string.
            self.peek()?;
            self.pos += 1;
            return std::str::from_utf8(&self.bytes[start..end])
                .ok()
                .map(Cow::Borrowed);
        }
        // Decoding only shortens: `\uXXXX`, the longest expansion, is 6 bytes for at
        // most 3. The walk below may look past `end` only to fail.
        let mut out = Vec::with_capacity(end - start);
        loop {
            let byte = self.peek()?;
            self.pos += 1;
            match byte {
                b'"' => return String::from_utf8(out).ok().map(Cow::Owned),
                b'\\' => {
                    let escaped = self.peek()?;
                    self.pos += 1;
                    match escaped {
                        b'"' | b'\\' | b'/' => out.push(escaped),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = std::str::from_utf8(self.bytes.get(self.pos..self.pos + 4)?)
                                .ok()?;
                            let code = u32::from_str_radix(hex, 16).ok()?;
                            self.pos += 4;
                            // Lone surrogates cannot be part of a GraphQL name; any
                            // non-ASCII makes the name simply not match.
                            let ch = char::from_u32(code).unwrap_or('\u{FFFD}');
                            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                        }
                        _ => return None,
                    }
                }
                _ => out.push(byte),
            }
        }
    }

    /// Skips any JSON value with a depth counter instead of recursion.
    fn skip_value(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            self.skip_whitespace();
            match self.peek()? {
                b'"' => {
                    self.skip_string()?;
                }
                b'{' | b'[' => {
                    depth += 1;
                    self.pos += 1;
                }
                b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    self.pos += 1;
                }
                b',' | b':' if depth > 0 => self.pos += 1,
                b'}' | b']' | b',' => return (depth == 0).then_some(()),
                _ => {
                    while !matches!(
                        self.peek()?,
                        b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'
                    ) {
                        self.pos += 1;
                    }
                }
            }
            if depth == 0 {
                return Some(());
            }
        }
    }

    fn skip_string(&mut self) -> Option<()> {
        self.pos += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(());
                }
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(json: &str) -> Vec<String> {
        operations_in_json(json.as_bytes())
    }

    #[test]
    fn finds_the_name_anywhere_at_top_level() {
        assert_eq!(
            ops(r#"{"operationName":"getExtraction","query":"{x}"}"#),
            ["getExtraction"]
        );
        assert_eq!(
            ops(
                r#"{"query":"query getExtraction { a }","variables":{"operationName":"no","x":[1,{"y":"}"}]},"operationName":"executeProgramExtraction"}"#
            ),
            ["executeProgramExtraction"]
        );
        assert_eq!(
            ops("\u{feff}{ \"operationName\" : \"a\\u0062c\" }"),
            ["abc"]
        );
    }

    #[test]
    fn nested_operation_names_do_not_count() {
        assert!(ops(r#"{"variables":{"operationName":"executeProgramExtraction"}}"#).is_empty());
    }

    #[test]
    fn truncated_or_invalid_bodies_yield_nothing_or_what_was_read() {
        assert!(ops(r#"{"query":"{ a }", "operationNa"#).is_empty());
        assert!(ops("not json").is_empty());
        assert!(ops("").is_empty());
        assert!(ops(r#"{"operationName": null}"#).is_empty());
        assert_eq!(ops(r#"{"operationName":"a","query":"{ trunc"#), ["a"]);
        let deep = "[".repeat(100_000);
        assert!(ops(&format!("{{\"x\":{deep}")).is_empty());
    }

    #[test]
    fn batches_yield_every_operation() {
        assert_eq!(
            ops(r#"[{"operationName":"a"},{"query":"{}"},{"operationName":"b"}]"#),
            ["a", "b"]
        );
    }

    #[test]
    fn query_string_names_are_decoded() {
        assert_eq!(
            operation_in_query("operationName=getExtraction&x=1").as_deref(),
            Some("getExtraction")
        );
        assert_eq!(
            operation_in_query("a=1&operationName=get%45xtraction").as_deref(),
            Some("getExtraction")
        );
        assert_eq!(operation_in_query("operationName=&a=1"), None);
        assert_eq!(operation_in_query("operationName=%zz"), None);
    }
}
