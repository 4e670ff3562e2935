//! The route matcher, built once from the shipped configuration (every kind of matcher:
//! exact path, prefix, regex, methods, GraphQL operations), fed arbitrary methods, paths
//! and operation names. Input: `method \0 path \0 op \0 op ...`.
//!
//! Checked: selection is deterministic, indexes are in range, and once the operations
//! are known the table always decides (the proxy's loop cannot spin).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use http::Method;
use libfuzzer_sys::fuzz_target;
use quadrige_proxy::route::{RouteTable, Selection};
use quadrige_proxy::Config;

const SHIPPED: &str = include_str!("../../config/proxy.toml");

fn table() -> &'static (RouteTable, usize) {
    static TABLE: OnceLock<(RouteTable, usize)> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config =
            Config::parse(SHIPPED, Path::new("proxy.toml")).expect("the shipped config is valid");
        (RouteTable::new(&config), config.routes.len())
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let Some(method) = parts.next().and_then(|m| Method::from_bytes(m).ok()) else {
        return;
    };
    let path = String::from_utf8_lossy(parts.next().unwrap_or(b"/"));
    let operations: Vec<String> = parts
        .map(|op| String::from_utf8_lossy(op).into_owned())
        .collect();
    let (table, routes) = table();

    let first = table.select(0, &method, &path, None);
    assert_eq!(
        first,
        table.select(0, &method, &path, None),
        "not deterministic"
    );
    let decided = match first {
        Selection::Route(index) => index,
        Selection::NeedsOperation(index) => {
            assert!(index < *routes);
            match table.select(index, &method, &path, Some(&operations)) {
                Selection::Route(index) => index,
                Selection::NeedsOperation(_) => panic!("asked for the operation twice"),
            }
        }
    };
    if let Some(index) = decided {
        assert!(index < *routes);
    }
    let _ = table.get(decided).name.len();
});
