//! `Config::parse` on arbitrary text: it answers `Ok` or an error naming a line and a
//! column, never panics; a config it accepts builds a route table that renders. The
//! value parsers (durations, sizes, address ranges, rates) get the text on their own too.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use quadrige_proxy::config::{Cidr, Rate, Size, Timer};
use quadrige_proxy::route::RouteTable;
use quadrige_proxy::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Timer::parse(text);
    let _ = Size::parse(text);
    let _ = Rate::parse(text);
    if let Ok(range) = Cidr::parse(text) {
        assert_eq!(Cidr::parse(&range.to_string()), Ok(range));
        let _ = range.contains("192.0.2.7".parse().unwrap());
        let _ = range.contains("::ffff:10.0.0.1".parse().unwrap());
    }
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            let table = RouteTable::new(&config);
            let rendered = table.render(&config.upstreams);
            assert_eq!(rendered.lines().count(), config.routes.len() + 2);
        }
        Err(ConfigError::Invalid { line, column, .. }) => {
            assert!(
                line >= 1 && line <= text.lines().count().max(1) + 1,
                "line {line}"
            );
            assert!(column >= 1, "column {column}");
        }
        Err(e) => panic!("parsing text cannot fail to read a file: {e}"),
    }
});
