//! `quadrige-proxy import-apache` on the Apache configurations GeoNature has shipped
//! (tests/fixtures/apache/): the real binary writes the TOML, the TOML must pass
//! `Config::parse` and the binary's `check`, and its route table must send a list of
//! sample URLs where Apache sent them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use http::Method;
use quadrige_proxy::config::{Config, Serve};
use quadrige_proxy::route::{RouteTable, Selection};
use support::temp_dir;

const BIN: &str = env!("CARGO_BIN_EXE_quadrige-proxy");
const BASE: &str = "/home/geonatureadmin/geonature";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apache")
        .join(name)
}

struct Imported {
    toml: String,
    stderr: String,
    config: Config,
}

fn run_import(args: &[&std::ffi::OsStr]) -> (String, String) {
    let out = Command::new(BIN)
        .arg("import-apache")
        .args(args)
        .output()
        .expect("run quadrige-proxy import-apache");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.status.success(),
        "import-apache failed: {stderr}\n{stdout}"
    );
    (stdout, stderr)
}

/// Imports `files` (under the fixture's sites-available) with `--root` the fixture,
/// then validates the output both ways.
fn import(name: &str, files: &[&str], extra: &[&str]) -> Imported {
    let root = fixture(name);
    let mut args: Vec<std::ffi::OsString> = vec!["--root".into(), root.clone().into()];
    args.extend(extra.iter().map(Into::into));
    for f in files {
        args.push(root.join("etc/apache2/sites-available").join(f).into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (toml, stderr) = run_import(&refs);
    validated(name, toml, stderr)
}

fn validated(tag: &str, toml: String, stderr: String) -> Imported {
    let config = Config::parse(&toml, Path::new("imported.toml"))
        .unwrap_or_else(|e| panic!("the imported config is refused: {e}\n{toml}"));
    // The binary's own check, on a file: it must pass although none of the GeoNature
    // folders or certificates exist here.
    let dir = temp_dir(&tag.replace('/', "-"));
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &toml).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check refused the imported config: {}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(check.contains(": OK"), "{check}");
    Imported {
        toml,
        stderr,
        config,
    }
}

/// Where a request ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    /// Files from these folders (in order), the prefix removed.
    Files(Vec<String>, String),
    /// Forwarded to this address, with this `response_header` in seconds.
    Upstream(String, Option<u64>),
}

fn files(roots: &[&str], strip: &str) -> Dest {
    Dest::Files(
        roots.iter().map(|r| format!("{BASE}/{r}")).collect(),
        strip.to_string(),
    )
}

fn upstream(address: &str) -> Dest {
    Dest::Upstream(address.to_string(), None)
}

fn upstream_timed(address: &str, secs: u64) -> Dest {
    Dest::Upstream(address.to_string(), Some(secs))
}

fn route(config: &Config, method: &str, path: &str) -> (String, Dest) {
    let table = RouteTable::new(config);
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let selected = match table.select(0, &method, path, None) {
        Selection::Route(r) => r,
        Selection::NeedsOperation(_) => panic!("no GraphQL route is imported"),
    };
    let route = table.get(selected);
    let dest = match &route.serve {
        Serve::Static(site) => Dest::Files(
            site.roots.iter().map(|r| r.display().to_string()).collect(),
            site.strip_prefix.clone(),
        ),
        Serve::Proxy => Dest::Upstream(
            config.upstreams[route.settings.upstream].servers[0].to_string(),
            route
                .settings
                .timeouts
                .response_header
                .0
                .map(|d| d.as_secs()),
        ),
    };
    (route.name.to_string(), dest)
}

/// Checks each `(method, path, where Apache sent it)`; a destination without a timer
/// only checks the address.
fn assert_routes(imported: &Imported, cases: &[(&str, &str, Dest)]) {
    for (method, path, want) in cases {
        let (name, got) = route(&imported.config, method, path);
        let matches = match (want, &got) {
            (Dest::Upstream(a, None), Dest::Upstream(b, _)) => a == b,
            (w, g) => w == g,
        };
        assert!(
            matches,
            "{method} {path}: route `{name}` gives {got:?}, Apache gave {want:?}\n{}",
            imported.toml
        );
    }
}

/// The URLs a GeoNature 2.12+ host answers, and where Apache sent them.
fn geonature_212_cases() -> Vec<(&'static str, &'static str, Dest)> {
    vec![
        ("GET", "/geonature", files(&["frontend/dist"], "/geonature")),
        (
            "GET",
            "/geonature/",
            files(&["frontend/dist"], "/geonature"),
        ),
        (
            "GET",
            "/geonature/main.1234.js",
            files(&["frontend/dist"], "/geonature"),
        ),
        (
            "GET",
            "/geonature/api/gn_commons/modules",
            upstream("127.0.0.1:8000"),
        ),
        ("GET", "/geonature/api/", upstream("127.0.0.1:8000")),
        (
            "GET",
            "/geonature/api/static/images/logo_structure.png",
            files(&["custom", "backend/static"], "/geonature/api/static"),
        ),
        (
            "GET",
            "/geonature/api/media/attachments/photo.jpg",
            files(&["backend/media"], "/geonature/api/media"),
        ),
        ("GET", "/usershub/", upstream("127.0.0.1:5001")),
        ("POST", "/usershub/login", upstream("127.0.0.1:5001")),
        (
            "POST",
            "/geonature/api/quadrige/data-extractions",
            upstream_timed("127.0.0.1:8000", 3600),
        ),
        (
            "POST",
            "/geonature/api/quadrige/program-extraction",
            upstream_timed("127.0.0.1:8000", 1200),
        ),
        (
            "GET",
            "/geonature/api/quadrige/output_data/programme_1.zip",
            upstream_timed("127.0.0.1:8000", 300),
        ),
        (
            "POST",
            "/geonature/api/synthese/export_observations",
            upstream_timed("127.0.0.1:8000", 900),
        ),
        // A short call keeps Apache's Timeout 300.
        (
            "GET",
            "/geonature/api/quadrige/config",
            upstream_timed("127.0.0.1:8000", 300),
        ),
        ("GET", "/robots.txt", upstream("127.0.0.1:8000")),
    ]
}

#[test]
fn geonature_212_plain_http() {
    let imported = import("gn-2.12", &["geonature.conf"], &[]);
    assert_routes(&imported, &geonature_212_cases());
    let c = &imported.config;
    assert!(c.server.tls.is_none());
    assert_eq!(
        c.server.listen,
        vec!["0.0.0.0:80".parse().unwrap(), "[::]:80".parse().unwrap()]
    );
    assert!(
        imported.toml.contains("# NOT TRANSLATED: nothing."),
        "{}",
        imported.toml
    );
    assert!(imported.stderr.contains("every directive was translated"));
    // DEFLATE sits in <Location /geonature/api>: the API is compressed, the frontend not.
    let table = RouteTable::new(c);
    let api = table.get(
        match table.select(0, &Method::GET, "/geonature/api/x", None) {
            Selection::Route(r) => r,
            _ => unreachable!(),
        },
    );
    let compress = api
        .settings
        .compress
        .as_ref()
        .expect("the API is compressed");
    assert_eq!(
        compress.types,
        vec!["application/json", "application/geo+json"]
    );
    let frontend = table.get(match table.select(0, &Method::GET, "/geonature/", None) {
        Selection::Route(r) => r,
        _ => unreachable!(),
    });
    assert!(frontend.settings.compress.is_none());
    // Apache's limits, carried over.
    assert_eq!(
        c.defaults.timeouts.response_header.0.unwrap().as_secs(),
        300
    );
    assert_eq!(c.defaults.max_request_body.0, Some(1 << 30));
    assert_eq!(
        c.log.access,
        quadrige_proxy::config::AccessLogTarget::File(
            "/var/log/quadrige-proxy/geonature_access.log".into()
        )
    );
    assert_eq!(c.server.name, "geonature.example.org");
    assert!(c.maintenance.is_some());
}

#[test]
fn geonature_212_with_certbots_https_vhost() {
    let imported = import(
        "gn-2.12-ssl",
        &["geonature.conf", "geonature-le-ssl.conf"],
        &[],
    );
    assert_routes(&imported, &geonature_212_cases());
    let tls = imported.config.server.tls.as_ref().expect("[server.tls]");
    assert_eq!(
        tls.certificate,
        PathBuf::from("/etc/letsencrypt/live/geonature.example.org/fullchain.pem")
    );
    assert_eq!(
        tls.key,
        PathBuf::from("/etc/letsencrypt/live/geonature.example.org/privkey.pem")
    );
    assert_eq!(tls.hsts.as_deref(), Some("max-age=31536000"));
    assert!(tls.redirect_http, "certbot's RewriteRule is redirect_http");
    assert_eq!(
        tls.listen,
        vec!["0.0.0.0:443".parse().unwrap(), "[::]:443".parse().unwrap()]
    );
    assert_eq!(
        imported.config.server.acme_challenge_root,
        Some(PathBuf::from("/var/www/html"))
    );
    // Timeout 300 read from the copy of apache2.conf, named as the source.
    assert!(imported
        .toml
        .contains("Timeout 300 in /etc/apache2/apache2.conf"));
    // options-ssl-apache.conf is read and its TLS settings listed as ignored.
    assert!(imported
        .toml
        .contains("/etc/letsencrypt/options-ssl-apache.conf:10: SSLProtocol"));
    assert!(
        imported.toml.contains("# NOT TRANSLATED: nothing."),
        "{}",
        imported.toml
    );
}

#[test]
fn the_import_routes_like_the_hand_written_geonature_config() {
    let imported = import(
        "gn-2.12-ssl",
        &["geonature.conf", "geonature-le-ssl.conf"],
        &[],
    );
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/geonature.toml"),
    )
    .unwrap();
    let shipped = Config::parse(&text, Path::new("config/geonature.toml")).unwrap();
    let paths = [
        ("GET", "/geonature/"),
        ("GET", "/geonature/api/gn_commons/modules"),
        ("GET", "/geonature/api/static/css/metadata_pdf.css"),
        ("GET", "/geonature/api/media/exports/schedules/export.csv"),
        ("GET", "/usershub/"),
        ("POST", "/geonature/api/quadrige/data-extractions"),
        ("POST", "/geonature/api/quadrige/program-extraction"),
        ("GET", "/geonature/api/quadrige/programs/extraction.csv"),
        ("POST", "/geonature/api/synthese/export_taxons"),
        ("GET", "/geonature/api/occtax/export"),
        ("POST", "/geonature/api/import/synthese/imports/upload"),
        ("PUT", "/geonature/api/gn_commons/media"),
    ];
    for (method, path) in paths {
        let (name_a, a) = route(&imported.config, method, path);
        let (name_b, b) = route(&shipped, method, path);
        assert_eq!(name_a, name_b, "{method} {path}");
        match (&a, &b) {
            // The defaults differ on purpose (Apache's 300 s against 60 s), the
            // long-running routes do not.
            (Dest::Upstream(x, _), Dest::Upstream(y, _))
                if name_a == "geonature-api" || name_a == "usershub" =>
            {
                assert_eq!(x, y, "{method} {path}")
            }
            _ => assert_eq!(a, b, "{method} {path}"),
        }
    }
    let s = &shipped.server;
    let i = &imported.config.server;
    assert_eq!(s.listen, i.listen);
    assert_eq!(s.tls, i.tls);
    assert_eq!(s.acme_challenge_root, i.acme_challenge_root);
    assert_eq!(shipped.log.access, imported.config.log.access);
}

#[test]
fn geonature_28_to_211() {
    let imported = import("gn-2.8", &["geonature.conf"], &[]);
    assert_routes(
        &imported,
        &[
            (
                "GET",
                "/geonature/",
                files(&["frontend/dist"], "/geonature"),
            ),
            (
                "GET",
                "/geonature/api/gn_commons/modules",
                upstream("127.0.0.1:8000"),
            ),
            // No static aliases before 2.12: Gunicorn served its static files.
            (
                "GET",
                "/geonature/api/static/images/logo_structure.png",
                upstream("127.0.0.1:8000"),
            ),
            ("GET", "/usershub/", upstream("127.0.0.1:5001")),
            (
                "POST",
                "/geonature/api/quadrige/data-extractions",
                upstream_timed("127.0.0.1:8000", 3600),
            ),
        ],
    );
    // GeoNature's usershub_apache.conf removed /usershub before forwarding: the proxy
    // cannot, and says so at the top.
    let top = imported.toml.split("\n[server]").next().unwrap();
    assert!(top.contains("NOT TRANSLATED (1)"), "{top}");
    assert!(
        top.contains("ProxyPass http://127.0.0.1:5001/: Apache replaced /usershub"),
        "{top}"
    );
    assert!(imported
        .stderr
        .contains("1 item(s) could not be translated"));
    // The missing taxhub.conf (IncludeOptional) is listed, not silently skipped.
    assert!(top.contains(
        "IncludeOptional /etc/apache2/conf-available/taxhub.conf: nothing there to read"
    ));
}

#[test]
fn geonature_27_full_vhost_with_define() {
    let imported = import("gn-2.7", &["geonature.conf"], &[]);
    assert_routes(
        &imported,
        &[
            // ${GN_DIR} from Define.
            (
                "GET",
                "/geonature/",
                files(&["frontend/dist"], "/geonature"),
            ),
            (
                "GET",
                "/geonature/api/gn_commons/modules",
                upstream("127.0.0.1:8000"),
            ),
            // The relative `Include sites-available/usershub.conf`, from ServerRoot.
            ("GET", "/usershub/", upstream("127.0.0.1:5001")),
            (
                "POST",
                "/geonature/api/quadrige/data-extractions",
                upstream_timed("127.0.0.1:8000", 3600),
            ),
        ],
    );
    // In 2.7, Gunicorn served the API at `/`: Apache removed /geonature/api.
    let top = imported.toml.split("\n[server]").next().unwrap();
    assert!(
        top.contains("<Location /geonature/api> ProxyPass http://127.0.0.1:8000: Apache replaced /geonature/api"),
        "{top}"
    );
    assert!(top.contains("GeoNature 2.8 and later serve their API under /geonature/api"));
    assert!(imported.toml.contains("# NOT EQUIVALENT"));
    assert!(top.contains("retry=0 dropped"));
    assert!(top.contains("ServerAdmin admin@example.org: nothing to carry over"));
}

#[test]
fn the_one_line_host() {
    let imported = import("one-line", &["geonature.conf"], &[]);
    let all = |path: &'static str| ("GET", path, upstream("127.0.0.1:8080"));
    assert_routes(
        &imported,
        &[
            all("/geonature/"),
            all("/geonature"),
            all("/geonature/api/gn_commons/modules"),
            all("/geonature/api/static/images/logo_structure.png"),
            all("/geonature/api/media/attachments/photo.jpg"),
            all("/usershub/"),
            all("/anything"),
            (
                "POST",
                "/geonature/api/quadrige/data-extractions",
                upstream_timed("127.0.0.1:8080", 3600),
            ),
            (
                "GET",
                "/geonature/api/",
                upstream_timed("127.0.0.1:8080", 300),
            ),
        ],
    );
    let c = &imported.config;
    // Everything is the defaults' business; only the GeoNature routes are written.
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(c.upstreams[0].name, "geonature");
    assert!(c
        .routes
        .iter()
        .all(|r| !matches!(r.serve, Serve::Static(_))));
    assert_eq!(c.routes.len(), 7, "{}", imported.toml);
    // GeoNature was inferred from the catch-all: said so.
    assert!(imported.toml.contains(
        "the GeoNature and Quadrige routes were added because /geonature/api is forwarded"
    ));

    let plain = import("one-line", &["geonature.conf"], &["--no-geonature-routes"]);
    assert!(plain.config.routes.is_empty(), "{}", plain.toml);
    assert_routes(
        &plain,
        &[(
            "POST",
            "/geonature/api/quadrige/data-extractions",
            upstream_timed("127.0.0.1:8080", 300),
        )],
    );
}

#[test]
fn what_has_no_equivalent_is_listed_at_the_top() {
    let dir = temp_dir("untranslatable");
    let conf = dir.join("site.conf");
    std::fs::write(
        &conf,
        r#"<VirtualHost *:80>
    ServerName app.example.org
    ProxyPreserveHost On
    ProxyTimeout 120
    LimitRequestBody 104857600
    ProxyPass /api/files !
    ProxyPass /api http://127.0.0.1:9000/api timeout=600 connectiontimeout=3
    ProxyPass /secure https://10.0.0.5/secure
    ProxyPassMatch ^/(.*\.php)$ fcgi://127.0.0.1:9001/var/www/$1
    Alias /api/files /srv/files
    Alias /docs /srv/docs
    <Directory /srv/docs>
        Options Indexes FollowSymLinks
        AllowOverride All
    </Directory>
    <Location /api/admin>
        Require ip 10.1 192.168.0.0/16
    </Location>
    <Location /private>
        AuthType Basic
        Require valid-user
    </Location>
    RewriteEngine On
    RewriteRule ^/old/(.*)$ /new/$1 [R=301,L]
    Header set X-Frame-Options SAMEORIGIN
    <LocationMatch "^/[a-z]+/debug">
        Require all denied
    </LocationMatch>
    SetEnvIf User-Agent bot dontlog
    CustomLog /var/log/apache2/app.log common
</VirtualHost>
"#,
    )
    .unwrap();
    let (toml, stderr) = run_import(&[conf.as_os_str()]);
    let imported = validated("untranslatable", toml, stderr);
    let top = imported
        .toml
        .split("\n[server]")
        .next()
        .unwrap()
        .to_string();
    for expected in [
        "ProxyPass for /secure to https://10.0.0.5/secure",
        "TLS to the upstream is not supported",
        "ProxyPassMatch",
        "Options Indexes FollowSymLinks: Indexes not translated",
        "AllowOverride All: .htaccess files are not read",
        "AuthType Basic: no equivalent",
        "Require valid-user",
        "RewriteRule ^/old/(.*)$ /new/$1 [R=301,L]: rewrite not translated",
        "Header set X-Frame-Options SAMEORIGIN",
        "<LocationMatch ^/[a-z]+/debug> (1 directive(s) inside)",
        "SetEnvIf User-Agent bot dontlog",
        "CustomLog /var/log/apache2/app.log common: format `common` becomes `combined`",
    ] {
        assert!(top.contains(expected), "missing `{expected}` in:\n{top}");
    }
    assert!(imported.stderr.contains("could not be translated"));
    let c = &imported.config;
    assert!(c.upstreams[0].preserve_host, "ProxyPreserveHost On");
    assert_eq!(c.defaults.max_request_body.0, Some(100 << 20));
    assert_eq!(
        c.defaults.timeouts.response_header.0.unwrap().as_secs(),
        120
    );
    assert_routes(
        &imported,
        &[
            (
                "GET",
                "/api/files/a.pdf",
                Dest::Files(vec!["/srv/files".into()], "/api/files".into()),
            ),
            ("GET", "/api/items", upstream_timed("127.0.0.1:9000", 600)),
            (
                "GET",
                "/docs/index.html",
                Dest::Files(vec!["/srv/docs".into()], "/docs".into()),
            ),
        ],
    );
    let table = RouteTable::new(c);
    let admin = table.get(
        match table.select(0, &Method::GET, "/api/admin/users", None) {
            Selection::Route(r) => r,
            _ => unreachable!(),
        },
    );
    let access = admin
        .settings
        .access
        .as_ref()
        .expect("Require ip is carried over");
    assert!(access.permits("10.1.2.3".parse().unwrap()));
    assert!(access.permits("192.168.4.5".parse().unwrap()));
    assert!(!access.permits("8.8.8.8".parse().unwrap()));
    assert_eq!(admin.settings.timeouts.connect.0.unwrap().as_secs(), 3);
}

#[test]
fn a_conf_file_without_a_vhost_is_served_on_port_80() {
    let root = fixture("gn-2.12");
    let conf = root.join("etc/apache2/conf-available/geonature.conf");
    let (toml, stderr) = run_import(&["--root".as_ref(), root.as_os_str(), conf.as_os_str()]);
    let imported = validated("novhost", toml, stderr);
    let cases: Vec<_> = geonature_212_cases()
        .into_iter()
        .filter(|(_, path, _)| !path.starts_with("/usershub"))
        .collect();
    assert_routes(&imported, &cases);
    assert_eq!(
        imported.config.server.listen,
        vec!["0.0.0.0:80".parse().unwrap(), "[::]:80".parse().unwrap()]
    );
    assert!(imported.toml.contains("no <VirtualHost> in these files"));
    // Each rule once: the server level is not merged with itself.
    assert_eq!(
        imported.toml.matches("[upstreams.").count(),
        1,
        "{}",
        imported.toml
    );
    assert_eq!(
        imported.toml.matches("(ProxyPass at ").count(),
        1,
        "{}",
        imported.toml
    );
}
