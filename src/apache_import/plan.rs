//! From the interpreted sites to the proxy's configuration: which vhost is served,
//! the listeners, and the route table in Apache's order.
//!
//! Routing is decided per path prefix. Every prefix a rule names (`Alias`,
//! `ProxyPass`, `<Location>`, a rewrite) opens a region; for each, the question "where
//! would Apache send a request here?" is answered with Apache's own precedence:
//! 1. `ProxyPass` inside the matching `<Location>` blocks — the last one wins;
//! 2. otherwise the vhost's `ProxyPass` directives, the first matching one;
//!    (`ProxyPass !` at either step stops proxying);
//! 3. otherwise the files: GeoNature's custom-file rewrite, then the first matching
//!    `Alias`/`AliasMatch`, then `DocumentRoot`.
//!
//! Regions are written most specific first, so a static exclusion comes before the
//! broader proxied prefix and the frontend's `AliasMatch ^/geonature(.*)$` comes last;
//! a region that would get the same answer as the broader one around it is left out.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use super::parse::{self, Loc, Parsed};
use super::site::{Access, Interpreted, ProxyAction, Site, Target, VAddr};
use super::{Note, NoteKind, Options};

/// A path Apache would have forwarded to GeoNature's API if GeoNature is there.
const GEONATURE_PROBE: &str = "/geonature/api/quadrige/program-extraction";
/// Debian's apache2.conf sets `Timeout 300`; Apache's compiled-in default is 60.
const DEBIAN_TIMEOUT: u64 = 300;
/// Apache 2.4.54 and later refuse bodies over 1 GiB unless told otherwise.
const APACHE_BODY_LIMIT: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Serve {
    Proxy {
        upstream: usize,
        keeps_path: bool,
        /// The rule that decided, for comments.
        rule: String,
        loc: Loc,
    },
    Static {
        roots: Vec<String>,
        strip: String,
        index: Option<String>,
        rule: String,
        loc: Loc,
    },
    /// Forwarded by Apache to an upstream the proxy cannot reach.
    Unsupported { url: String, why: String, loc: Loc },
    /// Neither proxied nor mapped to files (Apache's default DocumentRoot).
    Unserved,
}

impl Serve {
    /// Same answer for the client, whatever rule gave it.
    fn same_as(&self, other: &Serve) -> bool {
        match (self, other) {
            (
                Serve::Proxy {
                    upstream: a,
                    keeps_path: ka,
                    ..
                },
                Serve::Proxy {
                    upstream: b,
                    keeps_path: kb,
                    ..
                },
            ) => a == b && ka == kb,
            (
                Serve::Static {
                    roots: ra,
                    strip: sa,
                    index: ia,
                    ..
                },
                Serve::Static {
                    roots: rb,
                    strip: sb,
                    index: ib,
                    ..
                },
            ) => ra == rb && sa == sb && ia == ib,
            (Serve::Unsupported { url: a, .. }, Serve::Unsupported { url: b, .. }) => a == b,
            (Serve::Unserved, Serve::Unserved) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    serve: Serve,
    /// `timeout=` / `connectiontimeout=` of the `ProxyPass` that decided.
    timeout: Option<u64>,
    connect: Option<u64>,
    compress: Vec<String>,
    limit_body: Option<u64>,
    access: Option<Access>,
}

impl Outcome {
    fn same_as(&self, other: &Outcome) -> bool {
        self.serve.same_as(&other.serve)
            && self.timeout == other.timeout
            && self.connect == other.connect
            && self.compress == other.compress
            && self.limit_body == other.limit_body
            && self.access == other.access
    }
}

#[derive(Debug)]
struct Upstream {
    address: String,
    urls: Vec<(String, Loc)>,
    prefixes: Vec<String>,
    preserve_host: bool,
    name: String,
}

struct Planner<'a> {
    site: &'a Site,
    upstreams: Vec<Upstream>,
    notes: &'a mut Vec<Note>,
    reported: BTreeSet<String>,
}

impl Planner<'_> {
    fn note_once(&mut self, key: String, note: Note) {
        if self.reported.insert(key) {
            self.notes.push(note);
        }
    }

    fn upstream(&mut self, target: &Target, prefix: &str, loc: &Loc) -> Result<usize, String> {
        let address = target.address.clone()?;
        let index = match self.upstreams.iter().position(|u| u.address == address) {
            Some(i) => i,
            None => {
                self.upstreams.push(Upstream {
                    address,
                    urls: Vec::new(),
                    prefixes: Vec::new(),
                    preserve_host: false,
                    name: String::new(),
                });
                self.upstreams.len() - 1
            }
        };
        let u = &mut self.upstreams[index];
        if !u.urls.iter().any(|(url, _)| *url == target.url) {
            u.urls.push((target.url.clone(), loc.clone()));
        }
        if !u.prefixes.iter().any(|p| p == prefix) {
            u.prefixes.push(prefix.to_string());
        }
        Ok(index)
    }

    /// Where Apache sends a request for `path`.
    fn outcome(&mut self, path: &str) -> Outcome {
        let site = self.site;
        let matching: Vec<_> = site
            .locations
            .iter()
            .filter(|l| path.starts_with(&l.prefix))
            .collect();
        let mut compress = site.deflate.clone();
        let mut limit_body = None;
        let mut access = None;
        let mut location_proxy = None;
        let mut preserve = None;
        for l in &matching {
            for t in &l.deflate {
                if !compress.contains(t) {
                    compress.push(t.clone());
                }
            }
            if l.limit_body.is_some() {
                limit_body = l.limit_body;
            }
            if let Some((a, _)) = &l.access {
                access = Some(a.clone());
            }
            if let Some((action, loc)) = &l.proxy {
                location_proxy = Some((action.clone(), loc.clone(), l.prefix.clone()));
            }
            if l.preserve_host.is_some() {
                preserve = l.preserve_host;
            }
        }
        let decided = location_proxy.or_else(|| {
            site.proxy_rules
                .iter()
                .find(|r| path.starts_with(&r.prefix))
                .map(|r| (r.action.clone(), r.loc.clone(), r.prefix.clone()))
        });
        let mut timeout = None;
        let mut connect = None;
        let serve = match decided {
            Some((ProxyAction::Forward(target), loc, prefix)) => {
                timeout = target.timeout;
                connect = target.connect_timeout;
                match self.upstream(&target, &prefix, &loc) {
                    Ok(upstream) => {
                        if preserve == Some(true) {
                            self.upstreams[upstream].preserve_host = true;
                        }
                        if let Some(over) =
                            site.overrides.iter().find(|o| path.starts_with(&o.prefix))
                        {
                            self.note_once(
                                format!("override-proxied {}", over.loc),
                                Note::untranslated(
                                    Some(over.loc.clone()),
                                    format!(
                                        "the custom-file rewrite for {} applies to a proxied prefix: files from {} are not served there",
                                        over.prefix, over.dir
                                    ),
                                ),
                            );
                        }
                        Serve::Proxy {
                            upstream,
                            keeps_path: target.keeps_path(&prefix),
                            rule: rule_text(
                                &prefix,
                                &target.url,
                                site.locations.iter().any(|l| {
                                    l.loc == loc || l.proxy.as_ref().is_some_and(|p| p.1 == loc)
                                }),
                            ),
                            loc,
                        }
                    }
                    Err(why) => Serve::Unsupported {
                        url: target.url.clone(),
                        why,
                        loc,
                    },
                }
            }
            _ => self.files(path),
        };
        if let Serve::Static { roots, .. } = &serve {
            if access.is_none() {
                // The most specific <Directory> holding the served folder.
                access = roots.last().and_then(|root| {
                    site.directories
                        .iter()
                        .filter(|d| {
                            let dir = d.path.trim_end_matches('/');
                            root.trim_end_matches('/') == dir
                                || root.starts_with(&format!("{dir}/"))
                        })
                        .filter_map(|d| d.access.as_ref().map(|a| (d.path.len(), a.0.clone())))
                        .max_by_key(|(len, _)| *len)
                        .map(|(_, a)| a)
                });
            }
        }
        Outcome {
            serve,
            timeout,
            connect,
            compress,
            limit_body,
            access,
        }
    }

    /// Not proxied: the custom-file rewrite, then aliases, then DocumentRoot.
    fn files(&mut self, path: &str) -> Serve {
        let site = self.site;
        let over = site.overrides.iter().find(|o| path.starts_with(&o.prefix));
        let index = |root: &str| {
            site.directories
                .iter()
                .filter(|d| root.starts_with(d.path.trim_end_matches('/')))
                .filter_map(|d| d.index.clone())
                .next_back()
                .or_else(|| site.directory_index.clone())
        };
        if let Some(alias) = site.aliases.iter().find(|a| a.matches(path)) {
            let strip = alias.prefix.trim_end_matches('/').to_string();
            let target = alias.target.trim_end_matches('/').to_string();
            let mut roots = vec![target.clone()];
            let mut rule = format!(
                "{} {} {}",
                if alias.segment { "Alias" } else { "AliasMatch" },
                if alias.segment {
                    alias.prefix.clone()
                } else {
                    format!("^{}(.*)$", alias.prefix)
                },
                if alias.segment {
                    alias.target.clone()
                } else {
                    format!("{}$1", alias.target)
                },
            );
            let mut loc = alias.loc.clone();
            if let Some(o) = over {
                if o.prefix.trim_end_matches('/') == strip {
                    roots.insert(0, o.dir.trim_end_matches('/').to_string());
                    rule.push_str(&format!(
                        ", a file under {} winning (RewriteRule at {})",
                        o.dir, o.loc
                    ));
                } else {
                    self.note_once(
                        format!("override-mismatch {}", o.loc),
                        Note::untranslated(
                            Some(o.loc.clone()),
                            format!(
                                "the custom-file rewrite for {} does not line up with `Alias {}`: not translated",
                                o.prefix, alias.prefix
                            ),
                        ),
                    );
                }
                loc = alias.loc.clone();
            }
            return Serve::Static {
                index: index(&target),
                roots,
                strip,
                rule,
                loc,
            };
        }
        if let Some(o) = over {
            let dir = o.dir.trim_end_matches('/').to_string();
            return Serve::Static {
                index: index(&dir),
                roots: vec![dir],
                strip: o.prefix.trim_end_matches('/').to_string(),
                rule: format!("RewriteRule to files under {}", o.dir),
                loc: o.loc.clone(),
            };
        }
        if let Some((root, loc)) = &site.document_root {
            let root = root.trim_end_matches('/').to_string();
            return Serve::Static {
                index: index(&root),
                roots: vec![root.clone()],
                strip: String::new(),
                rule: format!("DocumentRoot {root}"),
                loc: loc.clone(),
            };
        }
        Serve::Unserved
    }
}

fn rule_text(prefix: &str, url: &str, in_location: bool) -> String {
    if in_location {
        format!("<Location {prefix}> ProxyPass {url}")
    } else {
        format!("ProxyPass {prefix} {url}")
    }
}

/// One route of the output.
struct RouteOut {
    name: String,
    prefix: String,
    outcome: Outcome,
}

/// Writes the whole configuration; notes about what changed or could not be carried
/// over are added to `notes` and listed at the top.
pub fn write(
    interpreted: &Interpreted,
    parsed: &Parsed,
    options: &Options,
    notes: &mut Vec<Note>,
) -> String {
    let mut body = String::new();
    let server = &interpreted.server;

    // --- Which vhosts -------------------------------------------------------------
    let geonature_like = |s: &Site| {
        s.aliases.iter().any(|a| a.prefix.starts_with("/geonature"))
            || s.locations
                .iter()
                .any(|l| l.prefix.starts_with("/geonature"))
            || s.proxy_rules
                .iter()
                .any(|r| r.prefix.starts_with("/geonature"))
    };
    let pick = |sites: Vec<&Site>, notes: &mut Vec<Note>| -> Option<Site> {
        let chosen = sites
            .iter()
            .position(|s| geonature_like(&s.merged_with(server)))
            .unwrap_or(0);
        for (i, s) in sites.iter().enumerate() {
            if i != chosen {
                notes.push(Note::untranslated(
                    s.loc.clone(),
                    format!(
                        "<VirtualHost> {}: another host on the same kind of listener; the proxy has one route table for every host name, so only the one at {} is translated",
                        s.server_name.as_ref().map(|n| n.0.as_str()).unwrap_or("(no ServerName)"),
                        sites[chosen].loc.as_ref().map(|l| l.to_string()).unwrap_or_default()
                    ),
                ));
            }
        }
        sites.get(chosen).map(|s| (*s).clone())
    };
    let (plain, tls_site) = if interpreted.vhosts.is_empty() {
        notes.push(Note::changed(
            None,
            "no <VirtualHost> in these files: their directives are served on port 80 (0.0.0.0:80 and [::]:80)".into(),
        ));
        let mut s = server.clone();
        s.addrs = vec![VAddr {
            host: None,
            port: 80,
        }];
        (Some(s), None)
    } else {
        let tls: Vec<&Site> = interpreted.vhosts.iter().filter(|s| s.is_tls()).collect();
        let plain: Vec<&Site> = interpreted.vhosts.iter().filter(|s| !s.is_tls()).collect();
        (
            pick(plain, notes).map(|p| p.merged_with(server)),
            pick(tls, notes).map(|t| t.merged_with(server)),
        )
    };
    let content: Site = match (&tls_site, &plain) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => server.clone(),
    };
    let mut redirect_http = false;
    if let (Some(t), Some(p)) = (&tls_site, &plain) {
        if p.redirect_https.is_some() {
            redirect_http = true;
        } else if p.signature() != t.signature() {
            notes.push(Note::untranslated(
                p.loc.clone(),
                "the plain-HTTP <VirtualHost> serves other paths than the HTTPS one: the proxy serves the HTTPS one's routes on both listeners".into(),
            ));
        }
    }
    if tls_site.is_none() {
        if let Some(loc) = plain.as_ref().and_then(|p| p.redirect_https.clone()) {
            notes.push(Note::untranslated(
                Some(loc),
                "a redirect to HTTPS, but no HTTPS <VirtualHost> in these files: pass the certbot one too (…-le-ssl.conf), or add [server.tls] by hand".into(),
            ));
        }
    }

    // --- [server] -----------------------------------------------------------------
    let plain_listen: Vec<String> = match &plain {
        Some(p) => listen_addresses(&p.addrs, notes, p.loc.as_ref()),
        None => {
            notes.push(Note::changed(
                None,
                "no plain-HTTP <VirtualHost> in these files: port 80 is listened on anyway, to redirect to HTTPS and answer ACME challenges".into(),
            ));
            redirect_http = true;
            vec!["0.0.0.0:80".into(), "[::]:80".into()]
        }
    };
    let _ = writeln!(body, "[server]");
    if let Some(loc) = plain.as_ref().and_then(|p| p.loc.as_ref()) {
        let _ = writeln!(body, "# <VirtualHost> at {loc}");
    }
    let _ = writeln!(body, "listen = {}", toml_list(&plain_listen));
    let header_timeout = content
        .header_read_timeout
        .as_ref()
        .map(|h| h.0)
        .unwrap_or(20);
    match &content.header_read_timeout {
        Some((_, loc)) => {
            let _ = writeln!(
                body,
                "header_read_timeout = \"{}\"   # RequestReadTimeout at {loc}",
                duration(header_timeout)
            );
        }
        None => {
            let _ = writeln!(
                body,
                "header_read_timeout = \"20s\"   # like mod_reqtimeout's header=20-40"
            );
        }
    }
    let _ = writeln!(
        body,
        "shutdown_grace = \"30s\"       # keep TimeoutStopSec in the systemd unit above this"
    );
    if let Some((name, loc)) = &content.server_name {
        let _ = writeln!(
            body,
            "# ServerName at {loc}: Apache sent it upstream as X-Forwarded-Server"
        );
        let _ = writeln!(body, "name = {}", toml_str(name));
    }
    let mut tls_block = String::new();
    if let Some(t) = &tls_site {
        match (&t.tls.certificate, &t.tls.key) {
            (Some((cert, cert_loc)), Some((key, _))) => {
                let mut certificate = cert.clone();
                if let Some((chain, chain_loc)) = &t.tls.chain {
                    let folder = |p: &str| Path::new(p).parent().map(Path::to_path_buf);
                    if cert.ends_with("/cert.pem") && chain.ends_with("/chain.pem") && folder(cert) == folder(chain) {
                        certificate = format!("{}fullchain.pem", cert.trim_end_matches("cert.pem"));
                        notes.push(Note::changed(
                            Some(chain_loc.clone()),
                            format!("SSLCertificateChainFile {chain}: the certificate and its chain are read together from {certificate}"),
                        ));
                    } else {
                        notes.push(Note::untranslated(
                            Some(chain_loc.clone()),
                            format!("SSLCertificateChainFile {chain}: the proxy reads one PEM file with the certificate followed by its chain: concatenate them and point `certificate` at the result"),
                        ));
                    }
                }
                let tls_listen = listen_addresses(&t.addrs, notes, t.loc.as_ref());
                let _ = writeln!(tls_block, "\n[server.tls]");
                if let Some(loc) = &t.loc {
                    let _ = writeln!(tls_block, "# <VirtualHost> at {loc}");
                }
                let _ = writeln!(tls_block, "listen = {}", toml_list(&tls_listen));
                let _ = writeln!(tls_block, "certificate = {}   # SSLCertificateFile at {cert_loc}", toml_str(&certificate));
                let _ = writeln!(tls_block, "key = {}", toml_str(key));
                match &t.hsts {
                    Some((value, loc)) => {
                        let _ = writeln!(tls_block, "hsts = {}   # Header ... Strict-Transport-Security at {loc}", toml_str(value));
                    }
                    None => {
                        let _ = writeln!(tls_block, "# no HSTS: Apache sent no Strict-Transport-Security header");
                    }
                }
                if redirect_http {
                    match plain.as_ref().and_then(|p| p.redirect_https.as_ref()) {
                        Some(loc) => {
                            let _ = writeln!(tls_block, "redirect_http = true   # the redirect to HTTPS at {loc}");
                        }
                        None => {
                            let _ = writeln!(tls_block, "redirect_http = true");
                        }
                    }
                } else {
                    let _ = writeln!(tls_block, "redirect_http = false  # Apache served the same paths over plain HTTP");
                }
                if cert.starts_with("/etc/letsencrypt/") {
                    let _ = writeln!(body, "# certbot renews through the webroot plugin once Apache is off: challenges are");
                    let _ = writeln!(body, "# served from here on every listener (deploy/README.md, step 3).");
                    let _ = writeln!(body, "acme_challenge_root = \"/var/www/html\"");
                }
            }
            _ => notes.push(Note::untranslated(
                t.loc.clone(),
                "an HTTPS <VirtualHost> without both SSLCertificateFile and SSLCertificateKeyFile: no [server.tls] written".into(),
            )),
        }
    }
    if let (None, Some((_, loc))) = (&tls_site, &content.hsts) {
        notes.push(Note::ignored(
            Some(loc.clone()),
            "HSTS on a plain-HTTP host: browsers ignore it there".into(),
        ));
    }
    body.push_str(&tls_block);

    // --- [log] ----------------------------------------------------------------------
    let _ = writeln!(body, "\n[log]");
    match &content.custom_log {
        Some(log) => {
            let file = Path::new(&log.path)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| "access.log".into());
            let _ = writeln!(
                body,
                "# CustomLog {} at {}: same format, in the proxy's log folder",
                log.path, log.loc
            );
            let _ = writeln!(
                body,
                "access = {}",
                toml_str(&format!("/var/log/quadrige-proxy/{file}"))
            );
        }
        None => {
            let _ = writeln!(
                body,
                "# no CustomLog for this host (Apache wrote other_vhosts_access.log)"
            );
            let _ = writeln!(body, "access = \"/var/log/quadrige-proxy/access.log\"");
        }
    }
    let _ = writeln!(body, "format = \"combined\"");
    let level = match &content.log_level {
        Some((level, loc)) => {
            let word = level
                .rsplit(':')
                .next()
                .unwrap_or(level)
                .to_ascii_lowercase();
            let mapped = match word.as_str() {
                "emerg" | "alert" | "crit" | "error" => "error",
                "warn" => "warn",
                "notice" | "info" => "info",
                "debug" => "debug",
                w if w.starts_with("trace") => "trace",
                _ => "info",
            };
            format!("{}   # LogLevel {level} at {loc}", toml_str(mapped))
        }
        None => "\"info\"".into(),
    };
    let _ = writeln!(body, "level = {level}");

    // --- Routes ---------------------------------------------------------------------
    let mut planner = Planner {
        site: &content,
        upstreams: Vec::new(),
        notes,
        reported: BTreeSet::new(),
    };
    let mut prefixes: BTreeSet<String> = BTreeSet::new();
    prefixes.insert("/".into());
    for a in &content.aliases {
        prefixes.insert(a.prefix.clone());
    }
    for r in &content.proxy_rules {
        prefixes.insert(r.prefix.clone());
    }
    for l in &content.locations {
        prefixes.insert(l.prefix.clone());
    }
    let aliases: Vec<String> = content
        .aliases
        .iter()
        .map(|a| a.prefix.trim_end_matches('/').to_string())
        .collect();
    for o in &content.overrides {
        // `^/x/static/(.*)$` over `Alias /x/static`: one region, not two.
        let trimmed = o.prefix.trim_end_matches('/').to_string();
        prefixes.insert(if aliases.contains(&trimmed) {
            trimmed
        } else {
            o.prefix.clone()
        });
    }
    prefixes.retain(|p| p.starts_with('/'));
    let mut regions: Vec<(String, Outcome)> = prefixes
        .iter()
        .map(|p| {
            let probe = if aliases.contains(p)
                && !p.ends_with('/')
                && content
                    .overrides
                    .iter()
                    .any(|o| o.prefix.trim_end_matches('/') == p)
            {
                format!("{p}/")
            } else {
                p.clone()
            };
            (p.clone(), planner.outcome(&probe))
        })
        .collect();
    // Shortest first: each region is compared with the nearest kept one around it.
    regions.sort_by_key(|(p, _)| p.len());
    let mut kept: Vec<(String, Outcome)> = Vec::new();
    for (prefix, outcome) in regions {
        let parent = kept
            .iter()
            .filter(|(p, _)| prefix.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len());
        if let Some((_, around)) = parent {
            if around.same_as(&outcome) {
                continue;
            }
        }
        kept.push((prefix, outcome));
    }
    kept.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    let root = kept
        .iter()
        .position(|(p, _)| p == "/")
        .map(|i| kept.remove(i))
        .expect("the root region is always kept")
        .1;

    // GeoNature: is its API forwarded?
    let geonature_outcome = planner.outcome(GEONATURE_PROBE);
    let geonature = match &geonature_outcome.serve {
        Serve::Proxy { upstream, .. } => Some(*upstream),
        _ => None,
    };
    let explicit_geonature = content
        .locations
        .iter()
        .map(|l| (&l.prefix, l.proxy.is_some()))
        .chain(content.proxy_rules.iter().map(|r| (&r.prefix, true)))
        .any(|(p, proxied)| proxied && p.trim_end_matches('/') == "/geonature/api");

    // Upstream names.
    for i in 0..planner.upstreams.len() {
        let base = if Some(i) == geonature {
            "geonature".to_string()
        } else {
            let prefix = planner.upstreams[i]
                .prefixes
                .first()
                .cloned()
                .unwrap_or_default();
            let first = prefix
                .trim_matches('/')
                .split('/')
                .next()
                .unwrap_or("")
                .to_string();
            let slug = slug(&first);
            if slug.is_empty() {
                "backend".into()
            } else {
                slug
            }
        };
        let mut name = base.clone();
        let mut n = 2;
        while planner.upstreams[..i].iter().any(|u| u.name == name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        planner.upstreams[i].name = name;
    }
    if let Some((on, _)) = &content.preserve_host {
        for u in &mut planner.upstreams {
            u.preserve_host = *on;
        }
    }

    // The defaults: where unmatched requests go.
    let default_upstream = match &root.serve {
        Serve::Proxy { upstream, .. } => Some(*upstream),
        _ => geonature.or(if planner.upstreams.is_empty() {
            None
        } else {
            Some(0)
        }),
    };
    match &root.serve {
        Serve::Unserved if default_upstream.is_some() => planner.notes.push(Note::changed(
            None,
            format!(
                "paths no rule covers were answered by Apache from its default DocumentRoot (usually 404); here they go to the `{}` upstream",
                planner.upstreams[default_upstream.unwrap_or(0)].name
            ),
        )),
        Serve::Unsupported { url, why, loc } => planner.notes.push(Note::untranslated(
            Some(loc.clone()),
            format!("ProxyPass to {url}: {why}; every other path goes to the defaults instead"),
        )),
        _ => {}
    }

    let mut routes: Vec<RouteOut> = Vec::new();
    for (prefix, outcome) in kept {
        let name = match &outcome.serve {
            Serve::Proxy { upstream, .. }
                if Some(*upstream) == geonature
                    && prefix.trim_end_matches('/') == "/geonature/api" =>
            {
                "geonature-api".to_string()
            }
            Serve::Static { .. }
                if geonature.is_some() && prefix.trim_end_matches('/') == "/geonature" =>
            {
                "frontend".to_string()
            }
            _ => {
                let mut s = slug(prefix.trim_matches('/'));
                if geonature.is_some() {
                    s = s
                        .strip_prefix("geonature-")
                        .map(str::to_string)
                        .unwrap_or(s);
                }
                if s.is_empty() {
                    "root".into()
                } else {
                    s
                }
            }
        };
        routes.push(RouteOut {
            name,
            prefix,
            outcome,
        });
    }
    let root_static = matches!(root.serve, Serve::Static { .. });
    if root_static {
        routes.push(RouteOut {
            name: "document-root".into(),
            prefix: "/".into(),
            outcome: root.clone(),
        });
    }

    // Timers.
    let (timeout, timeout_source) = match (&content.proxy_timeout, &content.timeout) {
        (Some((t, loc)), _) => (*t, format!("ProxyTimeout {t} at {loc}")),
        (None, Some((t, loc))) => (*t, format!("Timeout {t} at {loc}")),
        (None, None) => match main_conf_timeout(parsed, options) {
            Some((t, file)) => (t, format!("Timeout {t} in {file}")),
            None => (
                DEBIAN_TIMEOUT,
                format!("Timeout {DEBIAN_TIMEOUT}, Debian's apache2.conf (not set in these files)"),
            ),
        },
    };
    let (body_limit, body_source) = match &content.limit_body {
        Some((0, loc)) => (None, format!("LimitRequestBody 0 at {loc}: no limit")),
        Some((n, loc)) => (Some(*n), format!("LimitRequestBody {n} at {loc}")),
        None => (
            Some(APACHE_BODY_LIMIT),
            "Apache's default LimitRequestBody (1 GiB since 2.4.54)".into(),
        ),
    };

    // --- Upstreams ----------------------------------------------------------------------
    let Planner {
        upstreams, notes, ..
    } = planner;
    if geonature.is_some() {
        let _ = writeln!(
            body,
            "\n# GeoNature's Gunicorn. It kills a worker after GUNICORN_TIMEOUT (30 s by default):"
        );
        let _ = writeln!(
            body,
            "# raise it in BASE_DIR/environ to at least the longest response_header below, or the"
        );
        let _ = writeln!(
            body,
            "# worker dies first. `quadrige-proxy check --config FILE --gunicorn-unit"
        );
        let _ = writeln!(
            body,
            "# /etc/systemd/system/geonature.service` shows every route's chain of timers."
        );
    }
    for u in &upstreams {
        let _ = writeln!(body);
        for (url, loc) in &u.urls {
            let _ = writeln!(body, "# {url} (ProxyPass at {loc})");
        }
        let _ = writeln!(body, "[upstreams.{}]", u.name);
        let _ = writeln!(body, "address = {}", toml_str(&u.address));
        if u.preserve_host {
            let _ = writeln!(body, "preserve_host = true   # ProxyPreserveHost On");
        }
    }
    if upstreams.is_empty() {
        notes.push(Note::changed(
            None,
            "nothing was proxied: the proxy still needs an upstream for requests no route serves; 127.0.0.1:8080 is written, change or keep it".into(),
        ));
        let _ = writeln!(
            body,
            "\n# Apache proxied nothing here; requests no route serves go to this address."
        );
        let _ = writeln!(body, "[upstreams.backend]\naddress = \"127.0.0.1:8080\"");
    }
    let default_name = default_upstream
        .map(|i| upstreams[i].name.clone())
        .unwrap_or_else(|| "backend".into());

    // --- [defaults] -------------------------------------------------------------------------
    let _ = writeln!(
        body,
        "\n# What every route inherits, and what requests no route matches get."
    );
    let _ = writeln!(body, "[defaults]");
    let _ = writeln!(body, "upstream = {}", toml_str(&default_name));
    let _ = writeln!(
        body,
        "# {timeout_source} bounded every proxied request: the wait for the answer and"
    );
    let _ = writeln!(
        body,
        "# each silence in a transfer. Connecting to a local Gunicorn takes no time: 5 s."
    );
    let (root_connect, root_timeout) = (root.connect, root.timeout);
    let _ = writeln!(
        body,
        "timeouts = {{ connect = \"{}\", response_header = \"{}\", idle = \"{}\", total = \"none\" }}",
        duration(root_connect.unwrap_or(5)),
        duration(root_timeout.unwrap_or(timeout)),
        duration(root_timeout.unwrap_or(timeout))
    );
    let _ = writeln!(
        body,
        "max_request_body = {}   # {body_source}",
        size(body_limit)
    );
    let default_compress = root.compress.clone();
    if !default_compress.is_empty() {
        let _ = writeln!(
            body,
            "# AddOutputFilterByType DEFLATE{}; brotli is offered too",
            content
                .deflate_loc
                .as_ref()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            body,
            "compress = {{ types = {} }}",
            toml_list(&default_compress)
        );
    }

    // --- Maintenance ------------------------------------------------------------------------
    if geonature.is_some() {
        let _ = writeln!(
            body,
            "\n# GeoNature's maintenance vhost: `touch` the flag file to answer everything under"
        );
        let _ = writeln!(
            body,
            "# /geonature with a maintenance page and 503; `rm` it to end."
        );
        let _ = writeln!(body, "[maintenance]");
        let _ = writeln!(body, "flag_file = \"/etc/quadrige-proxy/maintenance\"");
        let _ = writeln!(body, "path_prefix = \"/geonature\"");
    }

    // --- [[routes]] -------------------------------------------------------------------------
    let mut names: Vec<String> = Vec::new();
    let geonature_routes = geonature.filter(|_| options.geonature_routes);
    let insert_at = routes
        .iter()
        .position(|r| GEONATURE_PROBE.starts_with(&r.prefix))
        .unwrap_or(routes.len());
    let _ = writeln!(
        body,
        "\n# Routes, in Apache's order: the first match wins, the most specific prefix first."
    );
    if routes
        .iter()
        .any(|r| matches!(r.outcome.serve, Serve::Static { .. }))
    {
        let _ = writeln!(
            body,
            "# Static routes answer like Apache's Alias with `Options -Indexes`: files, never a"
        );
        let _ = writeln!(
            body,
            "# folder listing; a symbolic link leading outside the folder is refused unless"
        );
        let _ = writeln!(body, "# the route says `allow_symlinks_outside = true`.");
    }
    if routes
        .iter()
        .any(|r| r.outcome.compress != default_compress)
    {
        let _ = writeln!(body, "# A route's `compress` comes from AddOutputFilterByType DEFLATE in a <Location> around it.");
    }
    let ctx = RouteCtx {
        upstreams: &upstreams,
        default_upstream,
        default_compress: &default_compress,
    };
    for (i, route) in routes.iter().enumerate() {
        if i == insert_at {
            if let Some(g) = geonature_routes {
                write_geonature_routes(
                    &mut body,
                    &ctx,
                    g,
                    &geonature_outcome,
                    explicit_geonature,
                    &mut names,
                    notes,
                );
            }
        }
        write_route(&mut body, &ctx, route, &mut names, notes);
    }
    if insert_at == routes.len() {
        if let Some(g) = geonature_routes {
            write_geonature_routes(
                &mut body,
                &ctx,
                g,
                &geonature_outcome,
                explicit_geonature,
                &mut names,
                notes,
            );
        }
    }
    if !root_static {
        let _ = writeln!(
            body,
            "\n# Anything else goes to [defaults] (`{default_name}`)."
        );
    }

    // Leftover ProxyPassReverse that matches no ProxyPass.
    for (url, loc) in &content.reverse {
        let known = upstreams.iter().any(|u| {
            u.urls
                .iter()
                .any(|(u, _)| u.trim_end_matches('/') == url.trim_end_matches('/'))
        });
        if !known {
            notes.push(Note::untranslated(
                Some(loc.clone()),
                format!("ProxyPassReverse {url}: matches no ProxyPass; the proxy only rewrites Location headers that point at its own upstreams"),
            ));
        }
    }

    header(parsed, notes) + &body
}

struct RouteCtx<'a> {
    upstreams: &'a [Upstream],
    default_upstream: Option<usize>,
    default_compress: &'a [String],
}

fn unique(names: &mut Vec<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut n = 2;
    while names.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    names.push(name.clone());
    name
}

/// The lines a route shares with its region: upstream, compression, limits, access.
fn common_lines(out: &mut String, ctx: &RouteCtx, outcome: &Outcome, proxied: bool) {
    if let Serve::Proxy { upstream, .. } = &outcome.serve {
        if Some(*upstream) != ctx.default_upstream {
            let _ = writeln!(
                out,
                "upstream = {}",
                toml_str(&ctx.upstreams[*upstream].name)
            );
        }
    }
    if outcome.compress != ctx.default_compress {
        let _ = writeln!(
            out,
            "compress = {{ types = {} }}",
            toml_list(&outcome.compress)
        );
    }
    if proxied {
        if let Some(limit) = outcome.limit_body {
            let limit = if limit == 0 { None } else { Some(limit) };
            let _ = writeln!(
                out,
                "max_request_body = {}   # LimitRequestBody in a <Location> around it",
                size(limit)
            );
        }
    }
    if let Some(access) = &outcome.access {
        let _ = writeln!(
            out,
            "# Require ... in a <Location> or <Directory> around it"
        );
        if !access.allow.is_empty() {
            let _ = writeln!(out, "allow = {}", toml_list(&access.allow));
        }
        if !access.deny.is_empty() {
            let _ = writeln!(out, "deny = {}", toml_list(&access.deny));
        }
    }
}

fn write_route(
    out: &mut String,
    ctx: &RouteCtx,
    route: &RouteOut,
    names: &mut Vec<String>,
    notes: &mut Vec<Note>,
) {
    let o = &route.outcome;
    match &o.serve {
        Serve::Static {
            roots,
            strip,
            index,
            rule,
            loc,
        } => {
            let name = unique(names, &route.name);
            let _ = writeln!(out, "\n# {rule} ({loc})");
            let _ = writeln!(out, "[[routes]]\nname = {}", toml_str(&name));
            let _ = writeln!(
                out,
                "match = {{ path_prefix = {} }}",
                toml_str(&route.prefix)
            );
            let roots_text = if roots.len() == 1 {
                format!("root = {}", toml_str(&roots[0]))
            } else {
                format!("roots = {}", toml_list(roots))
            };
            let index_text = index
                .as_ref()
                .filter(|i| *i != "index.html" && !i.contains('/'))
                .map(|i| format!(", index = {}", toml_str(i)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "static = {{ {roots_text}, strip_prefix = {}{index_text} }}",
                toml_str(strip)
            );
            common_lines(out, ctx, o, false);
        }
        Serve::Proxy {
            upstream,
            keeps_path,
            rule,
            loc,
        } => {
            let name = unique(names, &route.name);
            let _ = writeln!(out, "\n# {rule} ({loc})");
            if !keeps_path {
                let how = if route.prefix.trim_end_matches('/') == "/geonature/api" {
                    "GeoNature 2.8 and later serve their API under /geonature/api: upgrade, or keep Apache"
                } else {
                    "mount the application under that prefix (its own setting), or keep Apache for this path"
                };
                let note = format!(
                    "{rule}: Apache replaced {} with the URL's path before forwarding; the proxy forwards the path unchanged, so `{}` must answer under {}: {how}",
                    route.prefix, ctx.upstreams[*upstream].name, route.prefix
                );
                let _ = writeln!(
                    out,
                    "# NOT EQUIVALENT: the path is forwarded unchanged (see the top of this file)"
                );
                notes.push(Note::untranslated(Some(loc.clone()), note));
            }
            let _ = writeln!(out, "[[routes]]\nname = {}", toml_str(&name));
            let _ = writeln!(
                out,
                "match = {{ path_prefix = {} }}",
                toml_str(&route.prefix)
            );
            common_lines(out, ctx, o, true);
            if o.timeout.is_some() || o.connect.is_some() {
                let mut parts = Vec::new();
                if let Some(c) = o.connect {
                    parts.push(format!("connect = \"{}\"", duration(c)));
                }
                if let Some(t) = o.timeout {
                    parts.push(format!("response_header = \"{}\"", duration(t)));
                    parts.push(format!("idle = \"{}\"", duration(t)));
                }
                let _ = writeln!(
                    out,
                    "timeouts = {{ {} }}   # ProxyPass timeout=/connectiontimeout=",
                    parts.join(", ")
                );
            }
        }
        Serve::Unsupported { url, why, loc } => {
            notes.push(Note::untranslated(
                Some(loc.clone()),
                format!("ProxyPass for {} to {url}: {why}; those requests now go to the next route or the defaults", route.prefix),
            ));
        }
        Serve::Unserved => {
            notes.push(Note::untranslated(
                None,
                format!("requests under {} were neither proxied nor mapped to files by Apache (its default DocumentRoot answered); they now go to the next route or the defaults", route.prefix),
            ));
        }
    }
}

/// config/geonature.toml's long-running GeoNature and Quadrige routes.
const GEONATURE_ROUTES: &[(&str, &str, &str, &str)] = &[
    (
        "quadrige-program-extraction",
        "Quadrige: one executeProgramExtraction, polled then downloaded (up to ~8 min).",
        r#"{ path = "/geonature/api/quadrige/program-extraction", methods = ["POST"] }"#,
        r#"{ response_header = "20m", idle = "5m" }"#,
    ),
    (
        "quadrige-data-extractions",
        "Quadrige: one executeResultExtraction per programme; polling alone can take\n# max(600 s, 15 s × programmes): 87 programmes ≈ 22 min, then one ZIP download each.",
        r#"{ path = "/geonature/api/quadrige/data-extractions", methods = ["POST"] }"#,
        r#"{ response_header = "60m", idle = "10m" }"#,
    ),
    (
        "quadrige-downloads",
        "Quadrige downloads: the extracted CSV and the per-programme ZIPs.",
        r#"{ path_regex = "^/geonature/api/quadrige/(programs|output_data)/[^/]+$", methods = ["GET", "HEAD"] }"#,
        r#"{ response_header = "5m", idle = "10m" }"#,
    ),
    (
        "synthese-exports",
        "Synthese exports and the big observation listing: minutes, big bodies.",
        r#"{ path_regex = "^/geonature/api/synthese/(export_observations|export_taxons|export_statuts|export_metadata|for_web)" }"#,
        r#"{ response_header = "15m", idle = "10m" }"#,
    ),
    (
        "exports",
        "Other module exports and PDF exports.",
        r#"{ path_regex = "^/geonature/api/(occtax/export|occhab/export_stations/|exports/|meta/.*/export_pdf/|meta/.*/pdf)" }"#,
        r#"{ response_header = "15m", idle = "10m" }"#,
    ),
    (
        "imports",
        "Imports: multipart uploads of up to 1000 MB (GeoNature's own limit), then checks.",
        r#"{ path_prefix = "/geonature/api/import/", methods = ["POST", "PUT"] }"#,
        r#"{ response_header = "15m", idle = "5m" }"#,
    ),
    (
        "media-upload",
        "Media uploads (photos, documents).",
        r#"{ path_prefix = "/geonature/api/gn_commons/media", methods = ["POST", "PUT"] }"#,
        r#"{ response_header = "5m", idle = "5m" }"#,
    ),
];

fn write_geonature_routes(
    out: &mut String,
    ctx: &RouteCtx,
    upstream: usize,
    outcome: &Outcome,
    explicit: bool,
    names: &mut Vec<String>,
    notes: &mut Vec<Note>,
) {
    let _ = writeln!(
        out,
        "\n# --- GeoNature and Quadrige: long-running requests get long timers (not in Apache,"
    );
    let _ = writeln!(
        out,
        "# where the Timeout above bounded them all). Same as config/geonature.toml."
    );
    if let Serve::Proxy {
        keeps_path: false, ..
    } = outcome.serve
    {
        let _ = writeln!(out, "# NOT EQUIVALENT: Apache removed the prefix before forwarding (see the top of this file).");
    }
    if !explicit {
        notes.push(Note::changed(
            None,
            format!(
                "the GeoNature and Quadrige routes were added because /geonature/api is forwarded to `{}`; delete them (or import with --no-geonature-routes) if this host does not run GeoNature",
                ctx.upstreams[upstream].name
            ),
        ));
    }
    for (name, comment, matcher, timeouts) in GEONATURE_ROUTES {
        let name = unique(names, name);
        let _ = writeln!(out, "\n# {comment}");
        let _ = writeln!(out, "[[routes]]\nname = {}", toml_str(&name));
        let _ = writeln!(out, "match = {matcher}");
        common_lines(out, ctx, outcome, true);
        let _ = writeln!(out, "timeouts = {timeouts}");
    }
    let _ = writeln!(out, "\n# --- The rest of Apache's routes.");
}

/// The configuration's header: what was read and every note, grouped.
fn header(parsed: &Parsed, notes: &[Note]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# quadrige-proxy configuration, imported from Apache by `quadrige-proxy import-apache`"
    );
    let _ = writeln!(out, "# (version {}).", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "#\n# Read, in this order:");
    for source in &parsed.sources {
        match &source.included_from {
            Some(loc) => {
                let _ = writeln!(out, "#   {}   (included at {loc})", source.display);
            }
            None => {
                let _ = writeln!(out, "#   {}", source.display);
            }
        }
    }
    let group = |kind: NoteKind| notes.iter().filter(move |n| n.kind == kind);
    let line = |n: &Note| match &n.loc {
        Some(loc) => format!("#   {loc}: {}", n.text),
        None => format!("#   {}", n.text),
    };
    let untranslated: Vec<_> = group(NoteKind::Untranslated).collect();
    if untranslated.is_empty() {
        let _ = writeln!(
            out,
            "#\n# NOT TRANSLATED: nothing. Every directive has its equivalent below or is listed"
        );
        let _ = writeln!(out, "# as ignored.");
    } else {
        let _ = writeln!(
            out,
            "#\n# NOT TRANSLATED ({}): review each one before switching.",
            untranslated.len()
        );
        for n in untranslated {
            let _ = writeln!(out, "{}", line(n));
        }
    }
    let changed: Vec<_> = group(NoteKind::Changed).collect();
    if !changed.is_empty() {
        let _ = writeln!(out, "#\n# Translated with a difference:");
        for n in changed {
            let _ = writeln!(out, "{}", line(n));
        }
    }
    let ignored: Vec<_> = group(NoteKind::Ignored).collect();
    if !ignored.is_empty() {
        let _ = writeln!(out, "#\n# Ignored, nothing to carry over:");
        for n in ignored {
            let _ = writeln!(out, "{}", line(n));
        }
    }
    if parsed.assumed_modules {
        let _ = writeln!(
            out,
            "#\n# <IfModule> sections were read as if their module were enabled (a2enmod)."
        );
    }
    let _ = writeln!(
        out,
        "#\n# Check it:  quadrige-proxy check --config /etc/quadrige-proxy/proxy.toml"
    );
    let _ = writeln!(out, "# Switch from Apache (and back): /usr/share/doc/quadrige-proxy/MIGRATION.md (deploy/README.md).");
    let _ = writeln!(out, "#\n# Durations: \"90s\", \"5m\", \"1h\" or \"none\"; sizes: \"64KiB\", \"1GiB\" or \"none\".\n");
    out
}

/// `Timeout` from the main apache2.conf when the given files do not set it.
fn main_conf_timeout(parsed: &Parsed, options: &Options) -> Option<(u64, String)> {
    let display = format!("{}/apache2.conf", options.server_root.trim_end_matches('/'));
    if parsed.sources.iter().any(|s| s.display == display) {
        return None;
    }
    let real = match &options.root {
        Some(root) => root.join(display.trim_start_matches('/')),
        None => display.clone().into(),
    };
    let text = std::fs::read_to_string(real).ok()?;
    let mut depth = 0usize;
    for (_, line) in parse::logical_lines(&text) {
        let line = line.trim();
        if line.starts_with("</") {
            depth = depth.saturating_sub(1);
        } else if line.starts_with('<') {
            depth += 1;
        } else if depth == 0 {
            let words = parse::split_args(line);
            if words.len() == 2 && words[0].eq_ignore_ascii_case("Timeout") {
                return words[1].parse().ok().map(|t| (t, display.clone()));
            }
        }
    }
    None
}

fn listen_addresses(addrs: &[VAddr], notes: &mut Vec<Note>, loc: Option<&Loc>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addrs {
        let items = match &a.host {
            None => vec![format!("0.0.0.0:{}", a.port), format!("[::]:{}", a.port)],
            Some(h) if h.parse::<std::net::IpAddr>().is_ok() => vec![format!("{h}:{}", a.port)],
            Some(h) if h.starts_with('[') => vec![format!("{h}:{}", a.port)],
            Some(h) => {
                notes.push(Note::changed(
                    loc.cloned(),
                    format!("<VirtualHost {h}:{}>: a host name, not an address; listening on every address instead", a.port),
                ));
                vec![format!("0.0.0.0:{}", a.port), format!("[::]:{}", a.port)]
            }
        };
        for item in items {
            if !out.contains(&item) {
                out.push(item);
            }
        }
    }
    out
}

fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| toml_str(i)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Seconds in the proxy's words: "5m", "90s", "1h".
fn duration(secs: u64) -> String {
    if secs > 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs > 0 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

fn size(bytes: Option<u64>) -> String {
    match bytes {
        None => "\"none\"".into(),
        Some(b) if b > 0 && b % (1 << 30) == 0 => format!("\"{}GiB\"", b >> 30),
        Some(b) if b > 0 && b % (1 << 20) == 0 => format!("\"{}MiB\"", b >> 20),
        Some(b) if b > 0 && b % (1 << 10) == 0 => format!("\"{}KiB\"", b >> 10),
        Some(b) => format!("\"{b}B\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_are_written_the_short_way() {
        assert_eq!(duration(300), "5m");
        assert_eq!(duration(3600), "1h");
        assert_eq!(duration(90), "90s");
        assert_eq!(size(Some(1 << 30)), "\"1GiB\"");
        assert_eq!(size(Some(100_000_000)), "\"100000000B\"");
        assert_eq!(size(None), "\"none\"");
    }

    #[test]
    fn slugs_are_route_names() {
        assert_eq!(slug("geonature/api/static"), "geonature-api-static");
        assert_eq!(slug("/usershub/"), "usershub");
    }
}
