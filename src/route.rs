//! The route table: compiled once from the configuration, then asked for every request
//! which route it belongs to.
//!
//! Routes are tried in file order and the first whose matchers all match wins; a
//! request no route matches gets the defaults. Matching looks at the percent-decoded
//! path, which is what GeoNature sees (Gunicorn decodes `PATH_INFO`) and what Apache's
//! `<Location>` matches: on the raw path, `/geonature/api/%61dmin/` would escape a route
//! (and its `allow`/`deny` and client limits) while GeoNature still served it as
//! `/geonature/api/admin/`. The request is forwarded as received. A route that names
//! `graphql_operations` needs the operation name, which may sit in the request body:
//! [`RouteTable::select`] then says so, the proxy peeks at the body once and asks again.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::config::{Config, MatchConfig, RouteSettings, Serve, UpstreamConfig};
use crate::metrics::RouteMetrics;
use crate::proxy::admit::RouteGate;

/// One route, as the request path uses it.
#[derive(Debug)]
pub struct Route {
    /// The route's name from the config, `(defaults)` for the fallback.
    pub name: Arc<str>,
    pub settings: RouteSettings,
    /// Forwarded, or served from disk.
    pub serve: Serve,
    /// The route's concurrency cap and per-client limits, live.
    pub gate: RouteGate,
    pub metrics: Arc<RouteMetrics>,
    matcher: MatchConfig,
}

impl Route {
    fn build(name: &str, settings: &RouteSettings, serve: Serve, matcher: MatchConfig) -> Route {
        Route {
            name: Arc::from(name),
            gate: RouteGate::new(settings),
            metrics: Arc::new(RouteMetrics::default()),
            settings: settings.clone(),
            serve,
            matcher,
        }
    }
}

impl Route {
    fn matches_request_line(&self, method: &Method, path: &str) -> bool {
        let m = &self.matcher;
        m.methods.as_ref().is_none_or(|ms| ms.contains(method))
            && m.path.as_ref().is_none_or(|p| p == path)
            && m.path_prefix
                .as_ref()
                .is_none_or(|p| path.starts_with(p.as_str()))
            && m.path_regex.as_ref().is_none_or(|r| r.is_match(path))
    }

    /// Whether this route can only be decided with the GraphQL operation name.
    pub fn needs_operation(&self) -> bool {
        self.matcher.graphql_operations.is_some()
    }

    fn matches_operations(&self, operations: &[String]) -> bool {
        self.matcher
            .graphql_operations
            .as_ref()
            .is_none_or(|wanted| operations.iter().any(|op| wanted.contains(op)))
    }

    /// The matchers in the words of the config, for `check` and the status page.
    pub fn describe_match(&self) -> String {
        let m = &self.matcher;
        let mut parts = Vec::new();
        if let Some(methods) = &m.methods {
            let names: Vec<_> = methods.iter().map(Method::as_str).collect();
            parts.push(names.join("|"));
        }
        if let Some(p) = &m.path {
            parts.push(format!("path={p}"));
        }
        if let Some(p) = &m.path_prefix {
            parts.push(format!("prefix={p}"));
        }
        if let Some(r) = &m.path_regex {
            parts.push(format!("regex={}", r.as_str()));
        }
        if let Some(ops) = &m.graphql_operations {
            parts.push(format!("graphql={}", ops.join("|")));
        }
        if parts.is_empty() {
            "*".into()
        } else {
            parts.join(" ")
        }
    }
}

/// What the table says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// This route (an index into [`RouteTable::routes`]), or the defaults when `None`.
    Route(Option<usize>),
    /// Route `index` matches on method and path but needs the GraphQL operation.
    NeedsOperation(usize),
}

/// All routes in match order plus the fallback.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    fallback: Route,
}

impl RouteTable {
    pub fn new(config: &Config) -> RouteTable {
        let routes = config
            .routes
            .iter()
            .map(|r| Route::build(&r.name, &r.settings, r.serve.clone(), r.matcher.clone()))
            .collect();
        RouteTable {
            routes,
            fallback: Route::build(
                "(defaults)",
                &config.defaults,
                Serve::Proxy,
                MatchConfig::default(),
            ),
        }
    }

    /// Finds the first route from `start` on that matches. `operations` is `None` while
    /// the GraphQL operation has not been looked for.
    pub fn select(
        &self,
        start: usize,
        method: &Method,
        path: &str,
        operations: Option<&[String]>,
    ) -> Selection {
        self.select_decoded(start, method, &decoded_path(path), operations)
    }

    /// [`RouteTable::select`] on a path already through [`decoded_path`]: a request
    /// asked about twice (before and after the GraphQL peek) is decoded once.
    pub fn select_decoded(
        &self,
        start: usize,
        method: &Method,
        path: &str,
        operations: Option<&[String]>,
    ) -> Selection {
        for (index, route) in self.routes.iter().enumerate().skip(start) {
            if !route.matches_request_line(method, path) {
                continue;
            }
            match operations {
                None if route.needs_operation() => return Selection::NeedsOperation(index),
                Some(ops) if !route.matches_operations(ops) => continue,
                _ => return Selection::Route(Some(index)),
            }
        }
        Selection::Route(None)
    }

    pub fn get(&self, selected: Option<usize>) -> &Route {
        selected
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.fallback)
    }

    /// Routes in match order, then the fallback.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().chain(std::iter::once(&self.fallback))
    }

    /// The resolved table as `check` prints it.
    pub fn render(&self, upstreams: &[UpstreamConfig]) -> String {
        let header = [
            "#",
            "route",
            "match",
            "upstream",
            "connect",
            "resp-header",
            "idle",
            "total",
            "max-body",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for (i, route) in self.iter().enumerate() {
            let s = &route.settings;
            let upstream = match &route.serve {
                Serve::Static(site) => {
                    let roots: Vec<_> =
                        site.roots.iter().map(|r| r.display().to_string()).collect();
                    format!("static {}", roots.join(" > "))
                }
                Serve::Proxy => upstreams
                    .get(s.upstream)
                    .map(|u| format!("{} ({})", u.name, u.describe_servers()))
                    .unwrap_or_default(),
            };
            let position = if i < self.routes.len() {
                (i + 1).to_string()
            } else {
                "-".to_string()
            };
            rows.push(vec![
                position,
                route.name.to_string(),
                route.describe_match(),
                upstream,
                s.timeouts.connect.to_string(),
                s.timeouts.response_header.to_string(),
                s.timeouts.idle.to_string(),
                s.timeouts.total.to_string(),
                s.max_request_body.to_string(),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// The path routes match: every `%XX` escape decoded (a broken one is kept as is), bytes
/// that are not UTF-8 replaced.
pub fn decoded_path(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 3)
            .filter(|hex| bytes[i] == b'%' && hex.iter().all(u8::is_ascii_hexdigit));
        match escape {
            Some(hex) => {
                let hex = std::str::from_utf8(hex).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // The decoded bytes become the string in place; only a path that is not UTF-8 pays
    // for the replaced copy.
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(toml: &str) -> RouteTable {
        RouteTable::new(&Config::parse(toml, Path::new("t.toml")).unwrap())
    }

    const ROUTES: &str = r#"
[[routes]]
name = "extraction"
match = { path_prefix = "/geonature/api/quadrige/", methods = ["POST"] }
[[routes]]
name = "graphql-long"
match = { path = "/graphql", graphql_operations = ["executeProgramExtraction"] }
[[routes]]
name = "exports"
match = { path_regex = "^/geonature/api/synthese/export_" }
[[routes]]
name = "graphql-any"
match = { path = "/graphql" }
"#;

    #[test]
    fn first_matching_route_wins_and_unmatched_get_defaults() {
        let t = table(ROUTES);
        let post = Method::POST;
        assert_eq!(
            t.select(0, &post, "/geonature/api/quadrige/data-extractions", None),
            Selection::Route(Some(0))
        );
        assert_eq!(
            t.select(0, &Method::GET, "/geonature/api/quadrige/config", None),
            Selection::Route(None)
        );
        assert_eq!(
            t.select(0, &post, "/geonature/api/synthese/export_taxons", None),
            Selection::Route(Some(2))
        );
        assert_eq!(t.get(None).name.as_ref(), "(defaults)");
    }

    #[test]
    fn routes_match_the_decoded_path() {
        let t = table(ROUTES);
        let post = Method::POST;
        for encoded in [
            "/geonature/api/%71uadrige/data-extractions",
            "/geonature/api/quadrige%2Fdata-extractions",
            "/geonature%2fapi%2Fquadrige%2Fx",
        ] {
            assert_eq!(
                t.select(0, &post, encoded, None),
                Selection::Route(Some(0)),
                "{encoded}"
            );
        }
        assert_eq!(decoded_path("/a%zz%4"), "/a%zz%4");
        assert_eq!(decoded_path("/%C3%A9t%C3%A9"), "/été");
        assert_eq!(decoded_path("/%ff"), "/\u{fffd}");
        assert!(matches!(decoded_path("/plain"), Cow::Borrowed("/plain")));
    }

    #[test]
    fn graphql_routes_ask_for_the_operation_then_decide() {
        let t = table(ROUTES);
        let post = Method::POST;
        assert_eq!(
            t.select(0, &post, "/graphql", None),
            Selection::NeedsOperation(1)
        );
        let long = ["executeProgramExtraction".to_string()];
        assert_eq!(
            t.select(1, &post, "/graphql", Some(&long)),
            Selection::Route(Some(1))
        );
        let other = ["getExtraction".to_string()];
        assert_eq!(
            t.select(1, &post, "/graphql", Some(&other)),
            Selection::Route(Some(3))
        );
        assert_eq!(
            t.select(1, &post, "/graphql", Some(&[])),
            Selection::Route(Some(3))
        );
    }

    #[test]
    fn check_renders_every_route_in_order_with_its_timers() {
        let config = Config::parse(ROUTES, Path::new("t.toml")).unwrap();
        let text = RouteTable::new(&config).render(&config.upstreams);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[1].starts_with("1  extraction"));
        assert!(lines[5].starts_with("-  (defaults)"));
        assert!(lines[1].contains("geonature (127.0.0.1:8080)") && lines[1].contains("1m"));
    }
}
