//! `quadrige-proxy import-apache`: reads an Apache setup (a vhost and the files it
//! includes, as GeoNature installs them) and writes the equivalent quadrige-proxy
//! configuration, commented, with whatever has no equivalent listed at the top.
//!
//! Three steps:
//! 1. [`parse`] reads the files: logical lines, arguments, sections, `Include` and
//!    `IncludeOptional` (globs, from the including file's folder or `ServerRoot`),
//!    `Define`/`${VAR}`, and decides `<IfModule>`/`<IfDefine>`.
//! 2. [`site`] interprets the directives per `<VirtualHost>`: aliases, `ProxyPass`
//!    rules and `<Location>` blocks in Apache's order, TLS files, timers, limits,
//!    compression, logs, the rewrites it recognises (HTTPS redirect, GeoNature's custom
//!    static override).
//! 3. [`plan`] asks, for every path prefix the rules name, where Apache would send a
//!    request (`<Location>` `ProxyPass` — the last matching one wins —, then the vhost's
//!    `ProxyPass` in order, then the rewrites, aliases and `DocumentRoot`), and writes
//!    one route per prefix, most specific first, dropping those that change nothing.
//!    When GeoNature's API is forwarded, the Quadrige and export routes with long
//!    timers are added in front of it.

mod parse;
mod plan;
mod site;

use std::path::PathBuf;

pub use parse::Loc;

/// How to read the files.
#[derive(Debug, Clone)]
pub struct Options {
    /// Read absolute paths (in `Include`, `ServerRoot`, `<IfFile>`) under this folder: for
    /// a copy of a server's `/etc/apache2` kept elsewhere. The generated configuration
    /// keeps the server's own paths.
    pub root: Option<PathBuf>,
    /// Apache's `ServerRoot`: relative includes start there (`/etc/apache2` on Debian).
    pub server_root: String,
    /// Like `apache2 -D NAME=VALUE`: variables for `${NAME}` and `<IfDefine>`.
    pub defines: Vec<(String, String)>,
    /// Add the Quadrige and export routes when GeoNature's API is forwarded.
    pub geonature_routes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            root: None,
            server_root: "/etc/apache2".into(),
            defines: Vec::new(),
            geonature_routes: true,
        }
    }
}

/// How a directive fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// No equivalent: behaviour is lost unless the operator acts.
    Untranslated,
    /// Translated, with a difference worth knowing.
    Changed,
    /// Nothing to carry over.
    Ignored,
}

#[derive(Debug, Clone)]
pub struct Note {
    pub kind: NoteKind,
    pub loc: Option<Loc>,
    pub text: String,
}

impl Note {
    pub fn untranslated(loc: Option<Loc>, text: String) -> Note {
        Note {
            kind: NoteKind::Untranslated,
            loc,
            text,
        }
    }

    pub fn changed(loc: Option<Loc>, text: String) -> Note {
        Note {
            kind: NoteKind::Changed,
            loc,
            text,
        }
    }

    pub fn ignored(loc: Option<Loc>, text: String) -> Note {
        Note {
            kind: NoteKind::Ignored,
            loc,
            text,
        }
    }
}

/// The generated configuration and what could not be carried over.
#[derive(Debug)]
pub struct Imported {
    /// The quadrige-proxy TOML, comments included.
    pub toml: String,
    pub notes: Vec<Note>,
}

impl Imported {
    pub fn untranslated(&self) -> usize {
        self.notes
            .iter()
            .filter(|n| n.kind == NoteKind::Untranslated)
            .count()
    }
}

/// Reads `files` (in order, as one configuration) and writes the equivalent
/// configuration. Unreadable files are reported in the result, not as an error, so a
/// partial setup still gives a reviewable draft.
pub fn import(files: &[PathBuf], options: &Options) -> Imported {
    let mut parsed = parse::read(files, options);
    let mut notes = std::mem::take(&mut parsed.notes);
    let interpreted = site::interpret(&parsed.nodes, &mut notes);
    let toml = plan::write(&interpreted, &parsed, options, &mut notes);
    Imported { toml, notes }
}
