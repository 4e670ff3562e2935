//! Apache configuration syntax: logical lines, arguments, sections, `Include`,
//! `Define` and `${VAR}`.
//!
//! The result is a tree of directives and sections with every include spliced in where
//! it was named, each node carrying the server path and line it came from. The
//! conditional sections (`<IfModule>`, `<IfDefine>`, ...) are decided here, so the
//! interpreter only ever sees what Apache would have run.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Note, Options};

/// Where a directive was written: the server's path (not where a copy was read from)
/// and the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<str>,
    pub line: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub loc: Loc,
}

impl Directive {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The directive as it could be written back, for messages.
    pub fn text(&self) -> String {
        let mut out = self.name.clone();
        for arg in &self.args {
            out.push(' ');
            out.push_str(&quote_if_needed(arg));
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub args: Vec<String>,
    pub children: Vec<Node>,
    pub loc: Loc,
}

impl Section {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    pub fn header(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|a| quote_if_needed(a)).collect();
        if args.is_empty() {
            format!("<{}>", self.name)
        } else {
            format!("<{} {}>", self.name, args.join(" "))
        }
    }

    /// How many directives the section holds, nested ones included.
    pub fn directive_count(&self) -> usize {
        self.children
            .iter()
            .map(|n| match n {
                Node::Directive(_) => 1,
                Node::Section(s) => s.directive_count(),
            })
            .sum()
    }
}

#[derive(Debug, Clone)]
pub enum Node {
    Directive(Directive),
    Section(Section),
}

fn quote_if_needed(arg: &str) -> String {
    if arg.is_empty() || arg.contains(char::is_whitespace) {
        format!("\"{}\"", arg.replace('"', "\\\""))
    } else {
        arg.to_string()
    }
}

/// A file that was read, and which `Include` brought it in.
#[derive(Debug, Clone)]
pub struct Source {
    pub display: String,
    pub included_from: Option<Loc>,
}

/// Everything the reader produced.
#[derive(Debug, Default)]
pub struct Parsed {
    pub nodes: Vec<Node>,
    pub sources: Vec<Source>,
    pub notes: Vec<Note>,
    /// `<IfModule>` sections were read as if the module were loaded.
    pub assumed_modules: bool,
}

/// The variables Debian's `/etc/apache2/envvars` exports, which its configs use.
const DEBIAN_ENVVARS: &[(&str, &str)] = &[
    ("APACHE_LOG_DIR", "/var/log/apache2"),
    ("APACHE_RUN_USER", "www-data"),
    ("APACHE_RUN_GROUP", "www-data"),
    ("APACHE_RUN_DIR", "/var/run/apache2"),
    ("APACHE_LOCK_DIR", "/var/lock/apache2"),
    ("APACHE_PID_FILE", "/var/run/apache2/apache2.pid"),
];

const MAX_DEPTH: usize = 32;

/// Reads the files named on the command line, in order, as one configuration.
pub fn read(files: &[PathBuf], options: &Options) -> Parsed {
    let mut reader = Reader {
        options,
        defines: options.defines.iter().cloned().collect(),
        server_root: options.server_root.clone(),
        parsed: Parsed::default(),
        open: Vec::new(),
        undefined: HashSet::new(),
    };
    let mut nodes = Vec::new();
    for file in files {
        let display = file.display().to_string();
        reader.file(file, display, None, &mut nodes);
    }
    reader.parsed.nodes = nodes;
    reader.parsed
}

struct Reader<'a> {
    options: &'a Options,
    defines: HashMap<String, String>,
    /// `ServerRoot` as the server sees it; relative includes start there.
    server_root: String,
    parsed: Parsed,
    /// Files being read, to refuse include cycles.
    open: Vec<PathBuf>,
    undefined: HashSet<String>,
}

/// A section being read, with whether its content counts.
struct Open {
    section: Section,
    active: bool,
    conditional: bool,
}

impl Reader<'_> {
    fn file(&mut self, real: &Path, display: String, from: Option<Loc>, into: &mut Vec<Node>) {
        let canonical = real.canonicalize().unwrap_or_else(|_| real.to_path_buf());
        if self.open.contains(&canonical) || self.open.len() >= MAX_DEPTH {
            self.parsed.notes.push(Note::untranslated(
                from,
                format!("{display} includes itself (directly or not): read once only"),
            ));
            return;
        }
        let text = match std::fs::read(real) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                self.parsed.notes.push(Note::untranslated(
                    from,
                    format!(
                        "cannot read {display}: {e}; its directives are missing from this import"
                    ),
                ));
                return;
            }
        };
        self.parsed.sources.push(Source {
            display: display.clone(),
            included_from: from,
        });
        self.open.push(canonical);
        let file: Arc<str> = Arc::from(display.as_str());
        let dir = real.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut stack: Vec<Open> = Vec::new();
        for (line_no, line) in logical_lines(&text) {
            let loc = Loc {
                file: file.clone(),
                line: line_no,
            };
            let active = stack.last().is_none_or(|o| o.active);
            let line = self.expand(&line, &loc, active);
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("</") {
                let name = rest.trim_end_matches('>').trim();
                match stack.pop() {
                    Some(open) => {
                        if !open.section.name.eq_ignore_ascii_case(name) {
                            self.parsed.notes.push(Note::untranslated(
                                Some(loc),
                                format!(
                                    "</{name}> closes {}: read as if it closed it",
                                    open.section.header()
                                ),
                            ));
                        }
                        let target = match stack.last_mut() {
                            Some(parent) => &mut parent.section.children,
                            None => &mut *into,
                        };
                        self.close(open, target);
                    }
                    None => self.parsed.notes.push(Note::untranslated(
                        Some(loc),
                        format!("</{name}> without an opening section"),
                    )),
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix('<') {
                let inner = match rest.rfind('>') {
                    Some(end) => &rest[..end],
                    None => rest,
                };
                let mut words = split_args(inner);
                if words.is_empty() {
                    continue;
                }
                let name = words.remove(0);
                let (conditional, condition) = self.condition(&name, &words, &loc);
                stack.push(Open {
                    section: Section {
                        name,
                        args: words,
                        children: Vec::new(),
                        loc,
                    },
                    active: active && condition,
                    conditional,
                });
                continue;
            }
            let mut words = split_args(line);
            if words.is_empty() {
                continue;
            }
            let name = words.remove(0);
            let directive = Directive {
                name,
                args: words,
                loc,
            };
            let target = match stack.last_mut() {
                Some(parent) => &mut parent.section.children,
                None => &mut *into,
            };
            if !active {
                target.push(Node::Directive(directive));
                continue;
            }
            if directive.is("Define") {
                if let Some(name) = directive.args.first() {
                    let value = directive.args.get(1).cloned().unwrap_or_default();
                    self.defines.insert(name.clone(), value);
                }
            } else if directive.is("UnDefine") {
                if let Some(name) = directive.args.first() {
                    self.defines.remove(name);
                }
            } else if directive.is("ServerRoot") {
                if let Some(root) = directive.args.first() {
                    self.server_root = root.clone();
                }
            } else if directive.is("Include") || directive.is("IncludeOptional") {
                self.include(&directive, &dir, target);
            } else {
                target.push(Node::Directive(directive));
            }
        }
        while let Some(open) = stack.pop() {
            self.parsed.notes.push(Note::untranslated(
                Some(open.section.loc.clone()),
                format!(
                    "{} is never closed: read up to the end of the file",
                    open.section.header()
                ),
            ));
            let target = match stack.last_mut() {
                Some(parent) => &mut parent.section.children,
                None => &mut *into,
            };
            self.close(open, target);
        }
        self.open.pop();
    }

    /// Conditional sections dissolve into their parent when true and are dropped
    /// (with a note) when false; other sections stay sections.
    fn close(&mut self, open: Open, target: &mut Vec<Node>) {
        if !open.conditional {
            target.push(Node::Section(open.section));
        } else if open.active {
            target.extend(open.section.children);
        } else if open.section.directive_count() > 0 {
            self.parsed.notes.push(Note::ignored(
                Some(open.section.loc.clone()),
                format!(
                    "{}: false here, its {} directive(s) skipped as Apache would",
                    open.section.header(),
                    open.section.directive_count()
                ),
            ));
        }
    }

    /// Whether a section is a conditional one, and if so whether it holds.
    fn condition(&mut self, name: &str, args: &[String], loc: &Loc) -> (bool, bool) {
        let arg = args.first().map(String::as_str).unwrap_or("");
        let (negated, arg) = match arg.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, arg),
        };
        let holds = match name.to_ascii_lowercase().as_str() {
            "ifmodule" => {
                self.parsed.assumed_modules = true;
                true
            }
            "ifdefine" => self.defines.contains_key(arg),
            "iffile" => self.reroot(arg).exists(),
            "ifversion" | "ifdirective" | "ifsection" => {
                self.parsed.notes.push(Note::changed(
                    Some(loc.clone()),
                    format!("<{name} {}> read as true", args.join(" ")),
                ));
                true
            }
            _ => return (false, true),
        };
        (true, holds != negated)
    }

    /// `${NAME}` from `Define`, `--define` or Debian's envvars; an unknown one is left
    /// as it is, like Apache does (with a warning).
    fn expand(&mut self, line: &str, loc: &Loc, active: bool) -> String {
        let mut out = String::with_capacity(line.len());
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return out;
            };
            let name = &after[..end];
            let value = self.defines.get(name).cloned().or_else(|| {
                DEBIAN_ENVVARS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            });
            match value {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str(&rest[start..start + 3 + end]);
                    if active && self.undefined.insert(name.to_string()) {
                        self.parsed.notes.push(Note::untranslated(
                            Some(loc.clone()),
                            format!("${{{name}}} is not defined (Define it in the files, or pass --define {name}=VALUE): left as it is"),
                        ));
                    }
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// A server path, read under `--root` when one is given.
    fn reroot(&self, path: &str) -> PathBuf {
        match &self.options.root {
            Some(root) if path.starts_with('/') => root.join(path.trim_start_matches('/')),
            _ => PathBuf::from(path),
        }
    }

    /// The server path of a file that was read under `--root`.
    fn unroot(&self, real: &Path) -> String {
        if let Some(root) = &self.options.root {
            if let Ok(rest) = real.strip_prefix(root) {
                return format!("/{}", rest.display());
            }
        }
        real.display().to_string()
    }

    fn include(&mut self, directive: &Directive, dir: &Path, into: &mut Vec<Node>) {
        let optional = directive.is("IncludeOptional");
        let Some(pattern) = directive.args.first() else {
            return;
        };
        let mut candidates = Vec::new();
        if pattern.starts_with('/') {
            candidates.push(self.reroot(pattern));
        } else {
            // Apache takes a relative path from ServerRoot; a copy of the files may
            // also keep them side by side.
            candidates.push(self.reroot(&format!(
                "{}/{}",
                self.server_root.trim_end_matches('/'),
                pattern
            )));
            candidates.push(dir.join(pattern));
        }
        let wildcard = pattern.contains(['*', '?', '[']);
        let mut found: Vec<PathBuf> = Vec::new();
        for candidate in &candidates {
            found = expand_path(candidate, wildcard);
            if !found.is_empty() {
                break;
            }
        }
        if found.is_empty() {
            let message = format!("{}: nothing there to read", directive.text());
            self.parsed.notes.push(if optional || wildcard {
                Note::ignored(Some(directive.loc.clone()), message)
            } else {
                Note::untranslated(
                    Some(directive.loc.clone()),
                    format!("{message}; Apache would refuse to start, and whatever that file held is missing here"),
                )
            });
            return;
        }
        for real in found {
            let display = self.unroot(&real);
            self.file(&real, display, Some(directive.loc.clone()), into);
        }
    }
}

/// The files a path names: itself, the files of a folder, or a glob's matches, sorted
/// like Apache sorts them.
fn expand_path(path: &Path, wildcard: bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = if wildcard {
        glob::glob(&path.to_string_lossy())
            .map(|paths| paths.filter_map(Result::ok).collect())
            .unwrap_or_default()
    } else if path.exists() {
        vec![path.to_path_buf()]
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    files.sort();
    for file in files {
        if file.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(&file)
                .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            inner.retain(|p| p.is_file());
            inner.sort();
            out.extend(inner);
        } else if file.is_file() {
            out.push(file);
        }
    }
    out
}

/// Joins backslash-continued lines and drops comments; yields each logical line with
/// the number of its first physical line.
pub fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let (number, mut joined) = match pending.take() {
            Some((n, mut acc)) => {
                acc.push(' ');
                acc.push_str(line.trim_start());
                (n, acc)
            }
            None => (index + 1, line.to_string()),
        };
        if joined.ends_with('\\') {
            joined.pop();
            pending = Some((number, joined));
            continue;
        }
        let trimmed = joined.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        out.push((number, joined));
    }
    if let Some((number, joined)) = pending {
        if !joined.trim().is_empty() && !joined.trim().starts_with('#') {
            out.push((number, joined));
        }
    }
    out
}

/// Splits a directive's arguments like Apache's `ap_getword_conf`: blanks separate,
/// double or single quotes group, a backslash escapes a quote inside quotes.
pub fn split_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '"' || first == '\'' {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.peek() {
                        Some(&next) if next == first || next == '\\' => {
                            word.push(next);
                            chars.next();
                        }
                        _ => word.push(c),
                    }
                } else if c == first {
                    break;
                } else {
                    word.push(c);
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        args.push(word);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_split_on_blanks_and_group_in_quotes() {
        assert_eq!(
            split_args(
                r#"Header always set Strict-Transport-Security "max-age=1; includeSubDomains""#
            ),
            vec![
                "Header",
                "always",
                "set",
                "Strict-Transport-Security",
                "max-age=1; includeSubDomains"
            ]
        );
        assert_eq!(
            split_args(r#"Alias '/a b' "/x \"y\"""#),
            vec!["Alias", "/a b", "/x \"y\""]
        );
        assert_eq!(split_args("  ProxyPass   !  "), vec!["ProxyPass", "!"]);
    }

    #[test]
    fn continuations_join_and_comments_drop() {
        let text = "# comment\nProxyPass /a \\\n    http://x:1/a\n\n  # another\nTimeout 5\n";
        let lines = logical_lines(text);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].0, 2);
        assert_eq!(
            split_args(&lines[0].1),
            vec!["ProxyPass", "/a", "http://x:1/a"]
        );
        assert_eq!(lines[1], (6, "Timeout 5".to_string()));
    }
}
