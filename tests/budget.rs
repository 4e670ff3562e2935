//! `quadrige-proxy check --gunicorn-unit/--gunicorn-timeout`: the real binary reads
//! GeoNature's systemd unit and its `environ` file, and prints each route's timeout
//! chain with the exact line to change where Gunicorn would kill the worker first.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_quadrige-proxy");
const BASE: &str = "/home/geonatureadmin/geonature";

fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The fixture unit and environ, with BASE_DIR moved to a temporary folder.
fn install_unit(tag: &str, environ: Option<&str>) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("qp-budget-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let unit = std::fs::read_to_string(manifest("tests/fixtures/gunicorn/geonature.service"))
        .unwrap()
        .replace(BASE, &dir.display().to_string());
    let unit_path = dir.join("geonature.service");
    std::fs::write(&unit_path, unit).unwrap();
    let environ_path = dir.join("environ");
    if let Some(text) = environ {
        std::fs::write(&environ_path, text).unwrap();
    }
    (unit_path, environ_path)
}

fn check(config: &Path, extra: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "check failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The line of `timeouts = ...` of a route in a TOML file.
fn timeouts_line(text: &str, route: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("name = \"{route}\""))
        .unwrap();
    start
        + lines[start..]
            .iter()
            .position(|l| l.starts_with("timeouts"))
            .unwrap()
        + 1
}

#[test]
fn a_60_minute_route_in_front_of_gunicorn_timeout_600_names_both_fixes() {
    let environ = std::fs::read_to_string(manifest("tests/fixtures/gunicorn/environ")).unwrap();
    let (unit, environ_path) = install_unit("600", Some(&environ));
    let config = manifest("config/geonature.toml");
    let out = check(&config, &["--gunicorn-unit".as_ref(), unit.as_os_str()]);

    // The usual check output is still there, first.
    assert!(
        out.starts_with(&format!("{}: OK", config.display())),
        "{out}"
    );
    assert!(out.contains("routes, in match order (first match wins):"));

    assert!(
        out.contains(&format!(
        "Gunicorn: GUNICORN_TIMEOUT=600 in {}:3; upstream `geonature` (its --bind 127.0.0.1:8000)",
        environ_path.display()
    )),
        "{out}"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let line = timeouts_line(&text, "quadrige-data-extractions");
    let block: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("quadrige-data-extractions "))
        .take(4)
        .collect();
    assert!(
        block[0]
            .contains("browser no limit set → proxy response_header 1h → gunicorn 10m  WARNING"),
        "{out}"
    );
    assert!(
        block[1]
            .contains("Gunicorn kills the worker after 10m, before the proxy's response_header 1h"),
        "{out}"
    );
    assert_eq!(
        block[2].trim(),
        format!(
            "change: GUNICORN_TIMEOUT=3660 in {} (line 3), then `systemctl restart geonature`",
            environ_path.display()
        )
    );
    assert_eq!(
        block[3].trim(),
        format!(
            "or:     timeouts.response_header = \"9m\" at {}:{line}",
            config.display()
        )
    );
    // 20 minutes is over 600 s too; 15-minute exports as well; 5-minute routes and the
    // 60 s defaults are fine; static files have no chain; UsersHub is another Gunicorn.
    for warned in [
        "quadrige-program-extraction",
        "synthese-exports",
        "exports",
        "imports",
    ] {
        let row = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{warned} ")))
            .unwrap();
        assert!(row.ends_with("WARNING"), "{row}");
    }
    for fine in [
        "quadrige-downloads",
        "media-upload",
        "geonature-api",
        "(defaults)",
    ] {
        let row = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{fine} ")))
            .unwrap();
        assert!(!row.ends_with("WARNING"), "{row}");
    }
    let static_row = out
        .lines()
        .find(|l| l.trim_start().starts_with("api-static "))
        .unwrap();
    assert!(static_row.contains("static files: no chain"));
    let usershub = out
        .lines()
        .find(|l| l.trim_start().starts_with("usershub "))
        .unwrap();
    assert!(usershub.contains("upstream `usershub` is not this Gunicorn"));
    assert!(out.contains("5 warning(s)"), "{out}");
    // The longest route sets the one value that fixes them all.
    assert!(
        out.contains(&format!(
            "one change covers every route below: GUNICORN_TIMEOUT=3660 in {} (line 3)",
            environ_path.display()
        )),
        "{out}"
    );
}

#[test]
fn without_the_environ_file_the_units_default_of_30_s_applies() {
    let (unit, environ_path) = install_unit("30", None);
    let config = manifest("config/geonature.toml");
    let out = check(&config, &["--gunicorn-unit".as_ref(), unit.as_os_str()]);
    assert!(
        out.contains(&format!(
            "Environment=GUNICORN_TIMEOUT=30 in {}:17",
            unit.display()
        )),
        "{out}"
    );
    assert!(out.contains("is not there"), "{out}");
    // Even the 60 s defaults outlive a 30 s worker: the fix adds the variable to environ.
    let defaults: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("(defaults) "))
        .take(3)
        .collect();
    assert!(defaults[0].ends_with("WARNING"), "{out}");
    assert!(
        defaults[2].trim().starts_with(&format!(
            "change: add GUNICORN_TIMEOUT=120 to {} (the unit's EnvironmentFile",
            environ_path.display()
        )),
        "{out}"
    );
}

#[test]
fn an_explicit_timeout_long_enough_gives_no_warning() {
    let config = manifest("config/geonature.toml");
    let out = check(&config, &["--gunicorn-timeout".as_ref(), "3660".as_ref()]);
    assert!(
        out.contains("--timeout 3660 (given with --gunicorn-timeout)"),
        "{out}"
    );
    assert!(out.contains("no warning"), "{out}");
    // Without the flags, check prints what it always printed, and nothing more.
    let plain = check(&config, &[]);
    assert!(!plain.contains("timeout budget"));
    assert!(
        out.starts_with(&plain),
        "the budget comes after the usual output"
    );
}
