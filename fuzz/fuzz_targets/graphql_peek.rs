//! The GraphQL operation peek on arbitrary bytes: a JSON body prefix and a query string.
//! It must never panic, recurse or loop, and only return non-empty names it read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quadrige_proxy::graphql::{operation_in_query, operations_in_json};

fuzz_target!(|data: &[u8]| {
    let names = operations_in_json(data);
    // Every name was read between quotes in the input, so there are fewer of them than
    // input bytes.
    assert!(names.len() * 2 <= data.len());
    // A cut-off body (what the bounded peek sees) is handled the same way.
    let _ = operations_in_json(&data[..data.len() / 2]);
    if let Ok(query) = std::str::from_utf8(data) {
        if let Some(name) = operation_in_query(query) {
            assert!(!name.is_empty());
            assert!(query.contains("operationName="));
        }
    }
});
