//! Escaping untrusted text for the places we write it: JSON strings, HTML, and Apache's
//! log fields. Request values are attacker-controlled, so none is written raw.

use std::fmt::Write;

/// Appends `text` as the inside of a JSON string.
pub fn json_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Appends `text` escaped for HTML element content and attribute values.
pub fn html_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// Appends raw header bytes the way Apache's mod_log_config does: `"` and `\` are
/// backslash-escaped, control and non-ASCII bytes become `\xhh`, so a log line can
/// never be split or forged by a request.
pub fn apache_log_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_quotes_and_controls() {
        let mut s = String::new();
        json_into(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, "a\\\"b\\\\c\\n\\u0001é");
    }

    #[test]
    fn apache_escaping_cannot_break_a_line() {
        let mut s = String::new();
        apache_log_into(&mut s, b"evil\"\r\n127.0.0.1 \xff");
        assert_eq!(s, "evil\\\"\\x0d\\x0a127.0.0.1 \\xff");
    }

    #[test]
    fn html_escapes_markup() {
        let mut s = String::new();
        html_into(&mut s, "<a href='x'>&</a>");
        assert_eq!(s, "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;");
    }
}
