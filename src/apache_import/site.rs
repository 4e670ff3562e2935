//! What the directives mean: each `<VirtualHost>` (and the server level) becomes a
//! [`Site`] holding the rules that decide where a request goes, in Apache's order.
//!
//! Every directive ends up either in the site or in a [`Note`]: nothing is dropped
//! without a word.

use std::collections::HashMap;

use super::parse::{Directive, Loc, Node, Section};
use super::Note;

/// An address a `<VirtualHost>` listens on; `host` is `None` for `*` and `_default_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VAddr {
    pub host: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub engine: Option<bool>,
    pub certificate: Option<(String, Loc)>,
    pub key: Option<(String, Loc)>,
    pub chain: Option<(String, Loc)>,
}

/// `Alias` (segment matching) or a recognised `AliasMatch` (plain prefix).
#[derive(Debug, Clone)]
pub struct AliasRule {
    pub prefix: String,
    pub target: String,
    pub segment: bool,
    pub loc: Loc,
}

impl AliasRule {
    pub fn matches(&self, path: &str) -> bool {
        if !self.segment || self.prefix.ends_with('/') {
            path.starts_with(&self.prefix)
        } else {
            path == self.prefix
                || path
                    .strip_prefix(&self.prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
    }
}

/// Where `ProxyPass` sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    /// The upstream in the proxy's words (`host:port`, `unix:/path`), or why it has none.
    pub address: Result<String, String>,
    /// The URL's path: what replaces the local prefix.
    pub path: String,
    /// `timeout=` (seconds).
    pub timeout: Option<u64>,
    /// `connectiontimeout=` (seconds).
    pub connect_timeout: Option<u64>,
}

impl Target {
    /// Whether forwarding under `prefix` leaves the path as it is, which is all the
    /// proxy does.
    pub fn keeps_path(&self, prefix: &str) -> bool {
        self.path.trim_end_matches('/') == prefix.trim_end_matches('/')
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAction {
    Forward(Target),
    /// `ProxyPass !`
    Exclude,
}

/// A server- or vhost-level `ProxyPass PATH URL`.
#[derive(Debug, Clone)]
pub struct ProxyRule {
    pub prefix: String,
    pub action: ProxyAction,
    pub loc: Loc,
}

/// Apache's `Require`: who may come in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LocationBlock {
    pub prefix: String,
    pub loc: Loc,
    pub proxy: Option<(ProxyAction, Loc)>,
    pub deflate: Vec<String>,
    pub limit_body: Option<u64>,
    pub access: Option<(Access, Loc)>,
    pub preserve_host: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct DirectoryBlock {
    pub path: String,
    pub access: Option<(Access, Loc)>,
    pub index: Option<String>,
}

/// GeoNature's rewrite: a file under `dir` wins over what `prefix` is aliased to.
#[derive(Debug, Clone)]
pub struct Override {
    pub prefix: String,
    pub dir: String,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct CustomLog {
    pub path: String,
    pub loc: Loc,
}

/// The server level or one `<VirtualHost>`.
#[derive(Debug, Clone, Default)]
pub struct Site {
    pub loc: Option<Loc>,
    pub addrs: Vec<VAddr>,
    pub server_name: Option<(String, Loc)>,
    pub tls: TlsFiles,
    pub hsts: Option<(String, Loc)>,
    pub redirect_https: Option<Loc>,
    pub aliases: Vec<AliasRule>,
    pub proxy_rules: Vec<ProxyRule>,
    /// `ProxyPassReverse` URLs, checked against the `ProxyPass` targets.
    pub reverse: Vec<(String, Loc)>,
    pub locations: Vec<LocationBlock>,
    pub directories: Vec<DirectoryBlock>,
    pub overrides: Vec<Override>,
    rewrites: Vec<Directive>,
    pub deflate: Vec<String>,
    pub deflate_loc: Option<Loc>,
    pub timeout: Option<(u64, Loc)>,
    pub proxy_timeout: Option<(u64, Loc)>,
    pub limit_body: Option<(u64, Loc)>,
    pub preserve_host: Option<(bool, Loc)>,
    pub custom_log: Option<CustomLog>,
    pub document_root: Option<(String, Loc)>,
    pub directory_index: Option<String>,
    pub log_level: Option<(String, Loc)>,
    pub header_read_timeout: Option<(u64, Loc)>,
}

impl Site {
    pub fn is_tls(&self) -> bool {
        self.tls.engine == Some(true)
            || self.tls.certificate.is_some()
            || self.addrs.iter().any(|a| a.port == 443)
    }

    /// What decides where requests go, without locations: two vhosts with the same
    /// signature serve the same things (certbot's copy of the plain one).
    pub fn signature(&self) -> String {
        let mut out = String::new();
        for a in &self.aliases {
            out.push_str(&format!("A {} {} {}\n", a.prefix, a.target, a.segment));
        }
        for r in &self.proxy_rules {
            out.push_str(&format!("P {} {:?}\n", r.prefix, r.action));
        }
        for l in &self.locations {
            out.push_str(&format!(
                "L {} {:?} {:?} {:?} {:?}\n",
                l.prefix,
                l.proxy.as_ref().map(|p| &p.0),
                l.deflate,
                l.limit_body,
                l.access.as_ref().map(|a| &a.0)
            ));
        }
        for o in &self.overrides {
            out.push_str(&format!("O {} {}\n", o.prefix, o.dir));
        }
        out.push_str(&format!(
            "D {:?} {:?}\n",
            self.document_root.as_ref().map(|d| &d.0),
            self.deflate
        ));
        out
    }

    /// A vhost seen through the server level, the way Apache merges them.
    pub fn merged_with(&self, server: &Site) -> Site {
        let mut site = self.clone();
        site.aliases.extend(server.aliases.iter().cloned());
        let mut proxy_rules = server.proxy_rules.clone();
        proxy_rules.extend(site.proxy_rules);
        site.proxy_rules = proxy_rules;
        let mut locations = server.locations.clone();
        locations.extend(site.locations);
        site.locations = locations;
        site.directories.extend(server.directories.iter().cloned());
        site.reverse.extend(server.reverse.iter().cloned());
        if site.deflate.is_empty() {
            site.deflate = server.deflate.clone();
            site.deflate_loc = server.deflate_loc.clone();
        }
        macro_rules! inherit {
            ($($field:ident),*) => {$(
                if site.$field.is_none() {
                    site.$field = server.$field.clone();
                }
            )*};
        }
        inherit!(
            server_name,
            hsts,
            timeout,
            proxy_timeout,
            limit_body,
            preserve_host,
            custom_log,
            document_root,
            directory_index,
            log_level,
            header_read_timeout
        );
        site
    }
}

/// The interpreted configuration.
#[derive(Debug, Default)]
pub struct Interpreted {
    pub server: Site,
    pub vhosts: Vec<Site>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Server,
    VHost,
    Location(usize),
    Directory(usize),
    /// `<Proxy>`: only access rules, which the proxy does not need for its own upstreams.
    Proxy,
}

pub fn interpret(nodes: &[Node], notes: &mut Vec<Note>) -> Interpreted {
    let mut interpreter = Interpreter {
        notes,
        log_formats: HashMap::new(),
    };
    let mut result = Interpreted::default();
    let mut server = Site::default();
    for node in nodes {
        match node {
            Node::Section(s) if s.is("VirtualHost") => {
                let mut site = Site {
                    loc: Some(s.loc.clone()),
                    addrs: s.args.iter().filter_map(|a| vaddr(a)).collect(),
                    ..Site::default()
                };
                if site.addrs.is_empty() {
                    site.addrs.push(VAddr {
                        host: None,
                        port: 80,
                    });
                }
                interpreter.walk(&mut site, &s.children, Scope::VHost);
                interpreter.rewrites(&mut site);
                result.vhosts.push(site);
            }
            other => interpreter.walk(&mut server, std::slice::from_ref(other), Scope::Server),
        }
    }
    interpreter.rewrites(&mut server);
    result.server = server;
    result
}

fn vaddr(text: &str) -> Option<VAddr> {
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (text, 80),
    };
    let host = match host {
        "*" | "_default_" => None,
        h => Some(h.to_string()),
    };
    Some(VAddr { host, port })
}

const COMBINED: &str = r#"%h %l %u %t \"%r\" %>s %O \"%{Referer}i\" \"%{User-Agent}i\""#;
const COMBINED_B: &str = r#"%h %l %u %t \"%r\" %>s %b \"%{Referer}i\" \"%{User-Agent}i\""#;

struct Interpreter<'a> {
    notes: &'a mut Vec<Note>,
    log_formats: HashMap<String, String>,
}

impl Interpreter<'_> {
    fn untranslated(&mut self, d: &Directive, why: &str) {
        self.notes.push(Note::untranslated(
            Some(d.loc.clone()),
            format!("{}: {why}", d.text()),
        ));
    }

    fn ignored(&mut self, d: &Directive, why: &str) {
        self.notes.push(Note::ignored(
            Some(d.loc.clone()),
            format!("{}: {why}", d.text()),
        ));
    }

    fn changed(&mut self, d: &Directive, why: &str) {
        self.notes.push(Note::changed(
            Some(d.loc.clone()),
            format!("{}: {why}", d.text()),
        ));
    }

    fn section_untranslated(&mut self, s: &Section, why: &str) {
        self.notes.push(Note::untranslated(
            Some(s.loc.clone()),
            format!(
                "{} ({} directive(s) inside): {why}",
                s.header(),
                s.directive_count()
            ),
        ));
    }

    fn walk(&mut self, site: &mut Site, nodes: &[Node], scope: Scope) {
        for node in nodes {
            match node {
                Node::Directive(d) => self.directive(site, d, scope),
                Node::Section(s) => self.section(site, s, scope),
            }
        }
    }

    fn section(&mut self, site: &mut Site, s: &Section, scope: Scope) {
        let top = matches!(scope, Scope::Server | Scope::VHost);
        let arg = s.args.first().cloned().unwrap_or_default();
        match s.name.to_ascii_lowercase().as_str() {
            "location" if top && arg != "~" => {
                site.locations.push(LocationBlock {
                    prefix: arg,
                    loc: s.loc.clone(),
                    proxy: None,
                    deflate: Vec::new(),
                    limit_body: None,
                    access: None,
                    preserve_host: None,
                });
                let index = site.locations.len() - 1;
                self.walk(site, &s.children, Scope::Location(index));
            }
            "directory" if top && arg != "~" => {
                site.directories.push(DirectoryBlock {
                    path: arg,
                    access: None,
                    index: None,
                });
                let index = site.directories.len() - 1;
                self.walk(site, &s.children, Scope::Directory(index));
            }
            "proxy" if top => self.walk(site, &s.children, Scope::Proxy),
            "virtualhost" => {
                self.section_untranslated(s, "a <VirtualHost> inside another section is not read")
            }
            "locationmatch" | "location" | "directorymatch" | "directory" => self.section_untranslated(
                s,
                "regular-expression sections (and sections nested this way) are not translated: write a route with `path_regex` by hand",
            ),
            "files" | "filesmatch" => self.section_untranslated(
                s,
                "per-file-name rules are not translated (the proxy serves every file under a static route's folders)",
            ),
            "if" | "elseif" | "else" => {
                self.section_untranslated(s, "expressions are not evaluated: its content is left out")
            }
            "limit" | "limitexcept" => self.section_untranslated(
                s,
                "per-method rules are not translated (a route can match `methods`)",
            ),
            "requireall" | "requireany" | "requirenone" => self.section_untranslated(
                s,
                "combined access rules are not translated: write `allow`/`deny` on the route by hand",
            ),
            _ => self.section_untranslated(s, "no equivalent"),
        }
    }

    fn directive(&mut self, site: &mut Site, d: &Directive, scope: Scope) {
        let name = d.name.to_ascii_lowercase();
        let arg = |i: usize| d.args.get(i).map(String::as_str).unwrap_or("");
        let top = matches!(scope, Scope::Server | Scope::VHost);
        match name.as_str() {
            "servername" if top => site.server_name = Some((arg(0).to_string(), d.loc.clone())),
            "serveralias" => self.ignored(d, "the proxy answers every host name on its listeners"),
            "serveradmin" | "servertokens" | "serversignature" | "traceenable"
            | "hostnamelookups" | "usecanonicalname" | "accessfilename" | "enablesendfile"
            | "enablemmap" | "fileetag" | "defaulttype" => {
                self.ignored(d, "nothing to carry over")
            }
            "loadmodule" | "loadfile" | "user" | "group" | "pidfile" | "mutex"
            | "defaultruntimedir" | "startservers" | "minspareservers" | "maxspareservers"
            | "maxrequestworkers" | "maxconnectionsperchild" | "threadsperchild"
            | "serverlimit" | "threadlimit" | "minsparethreads" | "maxsparethreads"
            | "maxclients" | "maxrequestsperchild" | "scoreboardfile" | "gracefulshutdowntimeout" => {
                self.ignored(d, "an Apache process setting")
            }
            "listen" | "namevirtualhost" => {
                self.ignored(d, "listen addresses come from the <VirtualHost> addresses")
            }
            "documentroot" if top => {
                site.document_root = Some((arg(0).to_string(), d.loc.clone()))
            }
            "directoryindex" => {
                let index = arg(0).to_string();
                match scope {
                    Scope::Directory(i) => site.directories[i].index = Some(index),
                    _ if top => site.directory_index = Some(index),
                    _ => self.untranslated(d, "an index per location is not translated"),
                }
                if d.args.len() > 1 {
                    self.changed(d, "only the first name is used as the static routes' `index`");
                }
            }
            "alias" if top && d.args.len() == 2 => site.aliases.push(AliasRule {
                prefix: arg(0).to_string(),
                target: arg(1).to_string(),
                segment: true,
                loc: d.loc.clone(),
            }),
            "aliasmatch" if top && d.args.len() == 2 => match alias_match(arg(0), arg(1)) {
                Some((prefix, target)) => site.aliases.push(AliasRule {
                    prefix,
                    target,
                    segment: false,
                    loc: d.loc.clone(),
                }),
                None => self.untranslated(
                    d,
                    "only `AliasMatch ^/prefix(.*)$ /folder$1` is translated (a static route serves a folder under a fixed prefix)",
                ),
            },
            "scriptalias" | "scriptaliasmatch" => {
                self.untranslated(d, "CGI scripts cannot be run by the proxy")
            }
            "redirect" | "redirectpermanent" | "redirectmatch" | "redirecttemp" => {
                let (status, from, to) = match d.args.len() {
                    2 => ("302", arg(0), arg(1)),
                    _ => (arg(0), arg(1), arg(2)),
                };
                let everything = matches!(from, "/" | "^/(.*)$" | "^/(.*)" | "(.*)" | "^(.*)$");
                if scope == Scope::VHost && everything && to.starts_with("https://") {
                    site.redirect_https = Some(d.loc.clone());
                    if !matches!(status, "permanent" | "301") && name != "redirectpermanent" {
                        self.changed(d, "the proxy redirects with 301 (308 for other methods than GET and HEAD)");
                    }
                } else {
                    self.untranslated(d, "only a redirect of everything to https:// is translated (`redirect_http`)");
                }
            }
            "proxypass" => self.proxy_pass(site, d, scope),
            "proxypassreverse" => match scope {
                Scope::Location(_) => site.reverse.push((arg(0).to_string(), d.loc.clone())),
                _ if top => site.reverse.push((arg(1).to_string(), d.loc.clone())),
                _ => self.untranslated(d, "not valid here"),
            },
            "proxypassmatch" => self.untranslated(
                d,
                "regular-expression proxying is not translated: write a route with `path_regex` by hand (the path is forwarded unchanged)",
            ),
            "proxypassreversecookiepath" | "proxypassreversecookiedomain" => {
                self.untranslated(d, "cookies are passed as they are")
            }
            "proxyrequests" if arg(0).eq_ignore_ascii_case("off") => {
                self.ignored(d, "the proxy is never a forward proxy")
            }
            "proxyvia" if arg(0).eq_ignore_ascii_case("off") => {
                self.ignored(d, "the proxy sends no Via header")
            }
            "proxyaddheaders" if arg(0).eq_ignore_ascii_case("on") => {
                self.ignored(d, "X-Forwarded-For/-Host/-Server are always sent")
            }
            "proxypreservehost" => {
                let on = arg(0).eq_ignore_ascii_case("on");
                match scope {
                    Scope::Location(i) => site.locations[i].preserve_host = Some(on),
                    _ if top => site.preserve_host = Some((on, d.loc.clone())),
                    _ => self.untranslated(d, "not valid here"),
                }
            }
            "proxytimeout" | "timeout" if top => match arg(0).parse::<u64>() {
                Ok(secs) if name == "timeout" => site.timeout = Some((secs, d.loc.clone())),
                Ok(secs) => site.proxy_timeout = Some((secs, d.loc.clone())),
                Err(_) => self.untranslated(d, "not a number of seconds"),
            },
            "limitrequestbody" => match arg(0).parse::<u64>() {
                Ok(bytes) => match scope {
                    Scope::Location(i) => site.locations[i].limit_body = Some(bytes),
                    Scope::Directory(_) => self.ignored(
                        d,
                        "a folder served as static files receives no request bodies",
                    ),
                    _ => site.limit_body = Some((bytes, d.loc.clone())),
                },
                Err(_) => self.untranslated(d, "not a number of bytes"),
            },
            "addoutputfilterbytype" => {
                let filters = arg(0).to_ascii_uppercase();
                if filters.split(';').all(|f| f == "DEFLATE") {
                    let types: Vec<String> = d.args[1..]
                        .iter()
                        .flat_map(|t| t.split(','))
                        .map(|t| t.trim().to_ascii_lowercase())
                        .filter(|t| !t.is_empty())
                        .collect();
                    match scope {
                        Scope::Location(i) => site.locations[i].deflate.extend(types),
                        _ if top => {
                            site.deflate.extend(types);
                            site.deflate_loc.get_or_insert(d.loc.clone());
                        }
                        _ => self.untranslated(d, "compression per folder is not translated (it is set per route)"),
                    }
                } else {
                    self.untranslated(d, "only the DEFLATE filter has an equivalent (`compress`)");
                }
            }
            "setoutputfilter" | "addoutputfilter" => self.untranslated(
                d,
                "compression is chosen by media type (`compress = { types = [...] }`)",
            ),
            n if n.starts_with("deflate") => {
                self.ignored(d, "the proxy chooses its own compression settings")
            }
            "header" => self.header(site, d, scope),
            "requestheader" => {
                let forwarded_proto = d
                    .args
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case("X-Forwarded-Proto"));
                if forwarded_proto && arg(0).eq_ignore_ascii_case("set") {
                    self.ignored(d, "the proxy sets X-Forwarded-Proto from the listener (http or https)");
                } else {
                    self.untranslated(d, "request headers are forwarded as they are");
                }
            }
            "customlog" | "transferlog" if top => self.custom_log(site, d),
            "logformat" => {
                if d.args.len() >= 2 {
                    self.log_formats.insert(arg(1).to_string(), arg(0).to_string());
                }
            }
            "errorlog" => self.ignored(
                d,
                "the proxy's own messages go to the journal (journalctl -u quadrige-proxy)",
            ),
            "loglevel" if top => site.log_level = Some((arg(0).to_string(), d.loc.clone())),
            "sslengine" if top => site.tls.engine = Some(arg(0).eq_ignore_ascii_case("on")),
            "sslcertificatefile" if top => {
                site.tls.certificate = Some((arg(0).to_string(), d.loc.clone()))
            }
            "sslcertificatekeyfile" if top => {
                site.tls.key = Some((arg(0).to_string(), d.loc.clone()))
            }
            "sslcertificatechainfile" if top => {
                site.tls.chain = Some((arg(0).to_string(), d.loc.clone()))
            }
            "sslprotocol" | "sslciphersuite" | "sslhonorcipherorder" | "sslcompression"
            | "sslsessiontickets" | "ssloptions" | "sslusestapling" | "sslstaplingcache"
            | "sslsessioncache" | "sslsessioncachetimeout" | "sslopensslconfcmd"
            | "sslstrictsnivhostcheck" | "sslrandomseed" | "sslpassphrasedialog" => self.ignored(
                d,
                "TLS parameters are rustls's own: TLS 1.2 and 1.3 with modern cipher suites",
            ),
            "rewriteengine" | "rewritecond" | "rewriterule" | "rewriteoptions" if top => {
                site.rewrites.push(d.clone())
            }
            n if n.starts_with("rewrite") => self.untranslated(
                d,
                "rewrites inside <Location>/<Directory> (or this rewrite directive) are not translated",
            ),
            "require" => self.require(site, d, scope),
            "order" | "allow" | "deny" | "satisfy" => {
                let granted = (name == "allow" && arg(1).eq_ignore_ascii_case("all"))
                    || (name == "order" && arg(0).eq_ignore_ascii_case("allow,deny"));
                if granted {
                    self.ignored(d, "everyone is let in, as here")
                } else {
                    self.untranslated(
                        d,
                        "Apache 2.2 access rules are not translated: write `allow`/`deny` on the route by hand",
                    )
                }
            }
            "options" => {
                let mut rest = Vec::new();
                for option in &d.args {
                    let o = option.to_ascii_lowercase();
                    let bare = o.trim_start_matches(['+', '-']);
                    match bare {
                        "indexes" if o.starts_with('-') => {}
                        "none" | "symlinksifownermatch" => {}
                        "followsymlinks" if !o.starts_with('-') => self.changed(
                            d,
                            "symbolic links are followed inside a static route's folder; set `allow_symlinks_outside = true` on the route if one leads outside",
                        ),
                        "followsymlinks" | "multiviews" if o.starts_with('-') => {}
                        _ => rest.push(option.clone()),
                    }
                }
                if !rest.is_empty() {
                    self.untranslated(
                        d,
                        &format!(
                            "{} not translated (the proxy never lists folders, negotiates or runs scripts)",
                            rest.join(" ")
                        ),
                    );
                }
            }
            "allowoverride" | "allowoverridelist" => {
                if !arg(0).eq_ignore_ascii_case("none") {
                    self.untranslated(
                        d,
                        ".htaccess files are not read by the proxy: check there are none with rules in this folder",
                    );
                }
            }
            "keepalive" | "keepalivetimeout" | "maxkeepaliverequests" => self.ignored(
                d,
                "idle client connections are kept for `header_read_timeout`",
            ),
            "requestreadtimeout" if top => {
                let header = d.args.iter().find_map(|a| {
                    let value = a.to_ascii_lowercase();
                    let rest = value.strip_prefix("header=")?;
                    let first = rest.split([',', '-']).next()?;
                    first.parse::<u64>().ok()
                });
                match header {
                    Some(secs) if secs > 0 => {
                        site.header_read_timeout = Some((secs, d.loc.clone()));
                        if d.args.len() > 1 || d.args.iter().any(|a| a.contains(['-', ','])) {
                            self.changed(d, "only the first header= value is kept (`header_read_timeout`); body reads are timed by each route's `idle`");
                        }
                    }
                    _ => self.ignored(d, "body reads are timed by each route's `idle`"),
                }
            }
            "protocols" | "protocolshonororder" => self.ignored(
                d,
                "HTTP/2 is offered on the TLS listeners by ALPN (h2c, HTTP/2 without TLS, is not)",
            ),
            n if n.starts_with("wsgi") => self.untranslated(
                d,
                "mod_wsgi cannot be carried over: run the application under Gunicorn and proxy to it",
            ),
            n if n.starts_with("ssl") => {
                self.untranslated(d, "no equivalent (client certificates, TLS to the upstream)")
            }
            "expiresactive" if arg(0).eq_ignore_ascii_case("off") => {
                self.ignored(d, "nothing to carry over")
            }
            "expiresactive" | "expiresbytype" | "expiresdefault" => self.untranslated(
                d,
                "expiry per type is not translated: a static route can send one `cache_control` value",
            ),
            _ => self.untranslated(d, "no equivalent"),
        }
    }

    fn proxy_pass(&mut self, site: &mut Site, d: &Directive, scope: Scope) {
        let (prefix, url, params) = match scope {
            Scope::Location(i) => (
                site.locations[i].prefix.clone(),
                d.args.first().cloned().unwrap_or_default(),
                d.args.get(1..).unwrap_or(&[]),
            ),
            Scope::Server | Scope::VHost if d.args.len() >= 2 => {
                (d.args[0].clone(), d.args[1].clone(), &d.args[2..])
            }
            _ => {
                self.untranslated(d, "not valid here");
                return;
            }
        };
        let action = if url == "!" {
            ProxyAction::Exclude
        } else {
            let mut target = target(&url);
            let mut ignored = Vec::new();
            for param in params {
                let (key, value) = param.split_once('=').unwrap_or((param, ""));
                let secs = parse_seconds(value);
                match key.to_ascii_lowercase().as_str() {
                    "timeout" if secs.is_some() => target.timeout = secs,
                    "connectiontimeout" if secs.is_some() => target.connect_timeout = secs,
                    "retry" | "keepalive" | "ttl" | "max" | "smax" | "acquire" | "flushpackets"
                    | "flushwait" | "ping" | "disablereuse" | "enablereuse" | "nocanon"
                    | "interpolate" => ignored.push(param.clone()),
                    _ => ignored.push(param.clone()),
                }
            }
            if !ignored.is_empty() {
                self.changed(
                    d,
                    &format!(
                        "{} dropped: the proxy's pool keeps connections for the upstream's `keepalive_timeout` and retries nothing by itself",
                        ignored.join(" ")
                    ),
                );
            }
            ProxyAction::Forward(target)
        };
        match scope {
            Scope::Location(i) => site.locations[i].proxy = Some((action, d.loc.clone())),
            _ => site.proxy_rules.push(ProxyRule {
                prefix,
                action,
                loc: d.loc.clone(),
            }),
        }
    }

    fn header(&mut self, site: &mut Site, d: &Directive, scope: Scope) {
        let mut args: Vec<&str> = d.args.iter().map(String::as_str).collect();
        if args.first().is_some_and(|a| {
            a.eq_ignore_ascii_case("always") || a.eq_ignore_ascii_case("onsuccess")
        }) {
            args.remove(0);
        }
        let is_hsts = args.len() >= 3
            && matches!(
                args[0].to_ascii_lowercase().as_str(),
                "set" | "add" | "append"
            )
            && args[1].eq_ignore_ascii_case("Strict-Transport-Security");
        if is_hsts && matches!(scope, Scope::Server | Scope::VHost) {
            site.hsts = Some((args[2].to_string(), d.loc.clone()));
            if args.len() > 3 {
                self.changed(
                    d,
                    "its condition is dropped: HSTS is sent on every HTTPS response",
                );
            }
        } else {
            self.untranslated(d, "response headers are passed as they are; only HSTS is set by the proxy (`tls.hsts`)");
        }
    }

    fn custom_log(&mut self, site: &mut Site, d: &Directive) {
        let path = d.args.first().cloned().unwrap_or_default();
        if path.starts_with('|') {
            self.untranslated(
                d,
                "piped logs are not supported: the access log is a file, stdout or off",
            );
            return;
        }
        let format = if d.is("TransferLog") {
            "common".to_string()
        } else {
            d.args.get(1).cloned().unwrap_or_default()
        };
        let resolved = self
            .log_formats
            .get(&format)
            .cloned()
            .unwrap_or(format.clone());
        let combined = format.eq_ignore_ascii_case("combined")
            || resolved == COMBINED
            || resolved == COMBINED_B;
        if !combined {
            self.changed(
                d,
                &format!(
                    "format `{format}` becomes `combined` (the proxy writes combined or json)"
                ),
            );
        }
        if d.args.len() > 2 {
            self.changed(d, "its condition is dropped: every request is logged");
        }
        if let Some(previous) = &site.custom_log {
            self.notes.push(Note::changed(
                Some(d.loc.clone()),
                format!(
                    "{}: a second access log; only the one at {} is kept",
                    d.text(),
                    previous.loc
                ),
            ));
            return;
        }
        site.custom_log = Some(CustomLog {
            path,
            loc: d.loc.clone(),
        });
    }

    fn require(&mut self, site: &mut Site, d: &Directive, scope: Scope) {
        let mut args: Vec<String> = d.args.iter().map(|a| a.to_ascii_lowercase()).collect();
        let negated = args.first().is_some_and(|a| a == "not");
        if negated {
            args.remove(0);
        }
        let access = match args.first().map(String::as_str) {
            Some("all") if args.get(1).is_some_and(|a| a == "granted") && !negated => {
                return;
            }
            Some("all") if args.get(1).is_some_and(|a| a == "denied") && !negated => Access {
                allow: Vec::new(),
                deny: vec!["0.0.0.0/0".into(), "::/0".into()],
            },
            Some("local") if !negated => Access {
                allow: vec!["127.0.0.0/8".into(), "::1".into()],
                deny: Vec::new(),
            },
            Some("ip") if d.args.len() > 1 + usize::from(negated) => {
                let list: Vec<String> = d.args[1 + usize::from(negated)..]
                    .iter()
                    .map(|a| ip_range(a))
                    .collect();
                if negated {
                    Access {
                        allow: Vec::new(),
                        deny: list,
                    }
                } else {
                    Access {
                        allow: list,
                        deny: Vec::new(),
                    }
                }
            }
            _ => {
                self.untranslated(
                    d,
                    "only `Require all granted|denied`, `Require local` and `Require ip` are translated (no authentication in the proxy)",
                );
                return;
            }
        };
        let entry = (access, d.loc.clone());
        match scope {
            Scope::Location(i) => merge_access(&mut site.locations[i].access, entry),
            Scope::Directory(i) => merge_access(&mut site.directories[i].access, entry),
            Scope::Proxy => self.ignored(d, "access to the upstream is the proxy's own"),
            _ => self.untranslated(d, "access rules for a whole host are not translated"),
        }
    }

    /// Recognises the rewrites that have an equivalent: the HTTPS redirect (certbot's
    /// and the hand-written ones) and GeoNature's custom static override.
    fn rewrites(&mut self, site: &mut Site) {
        let rewrites = std::mem::take(&mut site.rewrites);
        let mut conds: Vec<Directive> = Vec::new();
        let mut engine: Option<Directive> = None;
        let mut env_chain: Option<(String, String, Vec<Directive>)> = None;
        let mut recognised = 0;
        for d in rewrites {
            if d.is("RewriteEngine") {
                engine = Some(d);
                continue;
            }
            if d.is("RewriteOptions") {
                self.untranslated(&d, "no equivalent");
                continue;
            }
            if d.is("RewriteCond") {
                conds.push(d);
                continue;
            }
            let rule_conds = std::mem::take(&mut conds);
            let pattern = d.args.first().cloned().unwrap_or_default();
            let substitution = d.args.get(1).cloned().unwrap_or_default();
            let flags = d
                .args
                .get(2)
                .map(|f| {
                    f.trim_matches(['[', ']'])
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            // The env-setting first half of GeoNature's override.
            if substitution == "-" {
                let env = flags.iter().find_map(|f| {
                    let lower = f.to_ascii_lowercase();
                    let rest = lower
                        .strip_prefix("env=")
                        .or_else(|| lower.strip_prefix("e="))?;
                    let (name, value) = f[f.len() - rest.len()..].split_once(':')?;
                    (value == "$1").then(|| name.to_string())
                });
                let chained = flags
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case("chain") || f.eq_ignore_ascii_case("c"));
                if let (Some(name), true) = (env, chained) {
                    let mut held = rule_conds;
                    held.push(d);
                    env_chain = Some((name, pattern, held));
                    continue;
                }
            }
            if substitution.starts_with("https://")
                && is_redirect(&flags)
                && matches_everything(&pattern)
            {
                let unknown: Vec<&Directive> = rule_conds
                    .iter()
                    .filter(|c| !redirect_condition(c))
                    .collect();
                for c in unknown {
                    self.changed(
                        c,
                        "condition dropped: every plain-HTTP request is redirected (`redirect_http`), except ACME challenges",
                    );
                }
                site.redirect_https = Some(d.loc.clone());
                recognised += 1;
                continue;
            }
            if let Some(over) = override_rule(
                &pattern,
                &substitution,
                &flags,
                &rule_conds,
                env_chain.as_ref(),
            ) {
                site.overrides.push(Override {
                    prefix: over.0,
                    dir: over.1,
                    loc: d.loc.clone(),
                });
                env_chain = None;
                recognised += 1;
                continue;
            }
            if let Some((_, _, held)) = env_chain.take() {
                for h in held {
                    self.untranslated(&h, "rewrite not translated");
                }
            }
            for c in &rule_conds {
                self.untranslated(c, "rewrite condition not translated");
            }
            self.untranslated(&d, "rewrite not translated: only the HTTPS redirect and GeoNature's custom static override are");
        }
        if let Some((_, _, held)) = env_chain.take() {
            for h in held {
                self.untranslated(&h, "rewrite not translated");
            }
        }
        for c in &conds {
            self.untranslated(c, "a condition with no rule after it");
        }
        if let Some(e) = engine {
            if recognised == 0 && e.args.first().is_some_and(|a| a.eq_ignore_ascii_case("on")) {
                self.ignored(&e, "no rewrite rule here has an equivalent or needs one");
            }
        }
    }
}

fn merge_access(slot: &mut Option<(Access, Loc)>, (access, loc): (Access, Loc)) {
    match slot {
        Some((existing, _)) => {
            existing.allow.extend(access.allow);
            existing.deny.extend(access.deny);
        }
        None => *slot = Some((access, loc)),
    }
}

/// Apache writes partial addresses (`10.1`) for ranges: turn them into CIDR.
fn ip_range(text: &str) -> String {
    if text.contains('/') || text.contains(':') {
        return text.to_string();
    }
    let parts: Vec<&str> = text.split('.').filter(|p| !p.is_empty()).collect();
    if parts.len() >= 4 {
        return text.to_string();
    }
    let mut octets: Vec<&str> = parts.clone();
    while octets.len() < 4 {
        octets.push("0");
    }
    format!("{}/{}", octets.join("."), parts.len() * 8)
}

fn is_redirect(flags: &[String]) -> bool {
    flags.iter().any(|f| {
        let f = f.to_ascii_lowercase();
        f == "r" || f.starts_with("r=") || f == "redirect" || f.starts_with("redirect=")
    })
}

fn matches_everything(pattern: &str) -> bool {
    matches!(
        pattern,
        "^" | "^/"
            | "(.*)"
            | "^(.*)$"
            | "^(.*)"
            | "^/?(.*)"
            | "^/?(.*)$"
            | "^/(.*)$"
            | "^/(.*)"
            | ".*"
            | "^.*$"
            | "/"
    )
}

/// Conditions of an HTTPS redirect that the proxy's `redirect_http` already implies.
fn redirect_condition(cond: &Directive) -> bool {
    let test = cond.args.first().map(String::as_str).unwrap_or("");
    let pattern = cond
        .args
        .get(1)
        .map(String::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    match test {
        "%{SERVER_NAME}" | "%{HTTP_HOST}" => true,
        "%{HTTPS}" => matches!(
            pattern.as_str(),
            "!on" | "off" | "!=on" | "=off" | "^off$" | "!^on$"
        ),
        "%{SERVER_PORT}" => matches!(
            pattern.as_str(),
            "80" | "=80" | "^80$" | "!443" | "!^443$" | "!=443"
        ),
        "%{REQUEST_URI}" => pattern.contains("acme-challenge"),
        _ => false,
    }
}

/// `^/literal/(.*)$` → `/literal/`.
fn literal_prefix(pattern: &str) -> Option<String> {
    let body = pattern.strip_prefix('^')?;
    let body = body
        .strip_suffix("(.*)$")
        .or_else(|| body.strip_suffix("(.*)"))?;
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => {
                return None
            }
            _ => out.push(c),
        }
    }
    out.starts_with('/').then_some(out)
}

/// `AliasMatch ^/prefix(.*)$ /folder$1` → (`/prefix`, `/folder`).
fn alias_match(pattern: &str, target: &str) -> Option<(String, String)> {
    let prefix = literal_prefix(pattern)?;
    let folder = target.strip_suffix("$1")?;
    if folder.contains('$') {
        return None;
    }
    // `^/a/(.*)$ /dir/$1` and `^/a(.*)$ /dir$1` both serve /a/x from /dir/x.
    Some((prefix, folder.to_string()))
}

/// GeoNature's override: `RewriteCond DIR/<the captured path> -f` then
/// `RewriteRule ^PREFIX(.*)$ DIR/$1 [L]`, the capture possibly carried by an env var
/// set by a chained rule just before.
fn override_rule(
    pattern: &str,
    substitution: &str,
    flags: &[String],
    conds: &[Directive],
    env_chain: Option<&(String, String, Vec<Directive>)>,
) -> Option<(String, String)> {
    let prefix = literal_prefix(pattern)?;
    let dir = substitution.strip_suffix("/$1")?;
    if !dir.starts_with('/') || dir.contains(['$', '%']) {
        return None;
    }
    if !flags.iter().any(|f| {
        f.eq_ignore_ascii_case("l")
            || f.eq_ignore_ascii_case("last")
            || f.eq_ignore_ascii_case("end")
    }) {
        return None;
    }
    let [cond] = conds else { return None };
    let tested = cond.args.first()?;
    if cond.args.get(1).map(String::as_str) != Some("-f") {
        return None;
    }
    let by_env = env_chain.is_some_and(|(name, chain_pattern, _)| {
        chain_pattern == pattern && *tested == format!("{dir}/%{{ENV:{name}}}")
    });
    let direct = *tested == format!("{dir}/$1");
    (by_env || direct).then(|| (prefix, dir.to_string()))
}

/// Splits a `ProxyPass` URL into the upstream address and path.
fn target(url: &str) -> Target {
    let mut t = Target {
        url: url.to_string(),
        address: Err(String::new()),
        path: String::new(),
        timeout: None,
        connect_timeout: None,
    };
    // Apache 2.4.7+: unix:/path/to.sock|http://localhost/path
    if let Some(rest) = url.strip_prefix("unix:") {
        if let Some((socket, http)) = rest.split_once('|') {
            let inner = target(http);
            t.path = inner.path;
            t.address = if inner.address.is_ok() {
                Ok(format!("unix:{socket}"))
            } else {
                inner.address
            };
            return t;
        }
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        t.address = Err(format!("`{url}` is not a URL"));
        return t;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    t.path = path.to_string();
    t.address = match scheme.to_ascii_lowercase().as_str() {
        "http"
            if authority
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
        {
            Ok(authority.to_string())
        }
        "http" => Ok(format!("{authority}:80")),
        "https" | "wss" | "h2" => Err(
            "TLS to the upstream is not supported (Gunicorn listens in plain HTTP on loopback)"
                .into(),
        ),
        "ws" => Err("WebSocket upstreams are not supported".into()),
        other => Err(format!(
            "`{other}://` upstreams (FastCGI, AJP, balancers, ...) are not supported: only HTTP"
        )),
    };
    t
}

fn parse_seconds(value: &str) -> Option<u64> {
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse::<u64>().ok().map(|ms| ms.div_ceil(1000).max(1));
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_give_an_address_and_a_path() {
        let t = target("http://127.0.0.1:8000/geonature/api");
        assert_eq!(t.address.as_deref(), Ok("127.0.0.1:8000"));
        assert!(t.keeps_path("/geonature/api"));
        let t = target("http://127.0.0.1:8000");
        assert!(!t.keeps_path("/geonature/api"));
        assert!(t.keeps_path("/"));
        let t = target("unix:/run/gunicorn.sock|http://localhost/");
        assert_eq!(t.address.as_deref(), Ok("unix:/run/gunicorn.sock"));
        assert!(target("https://x:1/").address.is_err());
        assert!(target("fcgi://127.0.0.1:9000/").address.is_err());
    }

    #[test]
    fn alias_match_and_rewrite_prefixes_are_read_when_literal() {
        assert_eq!(
            alias_match("^/geonature(.*)$", "/srv/gn/frontend/dist$1"),
            Some(("/geonature".into(), "/srv/gn/frontend/dist".into()))
        );
        assert_eq!(alias_match("^/(a|b)/(.*)$", "/x/$2"), None);
        assert_eq!(
            literal_prefix("^/geonature/api/static/(.*)$").as_deref(),
            Some("/geonature/api/static/")
        );
        assert_eq!(literal_prefix("^/a\\.b/(.*)$").as_deref(), Some("/a.b/"));
    }

    #[test]
    fn segment_aliases_need_a_slash_after_the_prefix() {
        let a = AliasRule {
            prefix: "/geonature".into(),
            target: "/x".into(),
            segment: true,
            loc: Loc {
                file: "f".into(),
                line: 1,
            },
        };
        assert!(a.matches("/geonature") && a.matches("/geonature/") && a.matches("/geonature/a"));
        assert!(!a.matches("/geonaturex"));
    }

    #[test]
    fn partial_ip_addresses_become_ranges() {
        assert_eq!(ip_range("10.1"), "10.1.0.0/16");
        assert_eq!(ip_range("192.168.1.7"), "192.168.1.7");
        assert_eq!(ip_range("10.0.0.0/8"), "10.0.0.0/8");
    }
}
