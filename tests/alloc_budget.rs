//! The allocation budget of the request path (issue 5): route matching, header
//! rewriting both ways and the GraphQL peek may allocate at most as often as they did
//! when the budget was last set. Counts, not time, so the result does not depend on the
//! machine. The cases are the `alloc` bench's (`cargo bench --bench alloc` gives their
//! time and bytes too).

#[path = "../benches/alloc/cases.rs"]
mod cases;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt;

use cases::{Fixture, GRAPHQL, HEADERS, PATHS};

/// Calls that hand out memory: `alloc` (and `alloc_zeroed`), and `realloc` to a larger
/// size, which may move the block and is what a growing `Vec` or `String` costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    allocs: u32,
    grows: u32,
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} alloc + {} grow", self.allocs, self.grows)
    }
}

thread_local! {
    // Per thread, so that the harness and any other thread allocating at the same time
    // are not counted; `None` outside a measurement. Const-initialised and without a
    // destructor, so reading it never allocates from inside the allocator.
    static COUNTS: Cell<Option<Counts>> = const { Cell::new(None) };
}

struct Counting;

fn note(grow: bool) {
    // `try_with`: the allocator also runs while this thread's locals are torn down.
    let _ = COUNTS.try_with(|counts| {
        if let Some(mut c) = counts.get() {
            if grow {
                c.grows += 1;
            } else {
                c.allocs += 1;
            }
            counts.set(Some(c));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(false);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(false);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            note(true);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `op` once to warm what is built on first use (regex caches), then counts it a
/// few times and keeps the most, so that a count that is not steady is held to the
/// bound at its worst. The result is dropped outside the count: a deallocation is no
/// allocation, and whoever ends the exchange pays for it anyway.
fn measure<R>(mut op: impl FnMut() -> R) -> Counts {
    drop(op());
    let mut most = Counts::default();
    for _ in 0..3 {
        COUNTS.set(Some(Counts::default()));
        let out = op();
        let counts = COUNTS.take().unwrap_or_default();
        drop(out);
        most.allocs = most.allocs.max(counts.allocs);
        most.grows = most.grows.max(counts.grows);
    }
    most
}

const fn budget(allocs: u32, grows: u32) -> Counts {
    Counts { allocs, grows }
}

// Each bound is the count measured when it was set (rustc 1.95, http 1.5, regex 1):
// the comment says where the allocations come from, so that a cut can lower it.

const ROUTE_BUDGET: &[(&str, Counts)] = &[
    // Measured 0: a borrowed path, literal and regex matchers (regex's cache is warm).
    ("api_call", budget(0, 0)),
    ("quadrige_extraction", budget(0, 0)),
    ("quadrige_download", budget(0, 0)),
    ("frontend_file", budget(0, 0)),
    ("media_file", budget(0, 0)),
    ("unmatched", budget(0, 0)),
    // Measured 2: route::decoded_path's `out` Vec, then `from_utf8_lossy(..).into_owned()`
    // copying valid UTF-8 into a new String.
    ("percent_encoded", budget(2, 0)),
];

const HEADER_BUDGET: &[(&str, Counts)] = &[
    // Measured 8 + 1 grow: the generated request id (RequestIds::generate's String, then
    // HeaderValue::from_str's copy), strip_hop_by_hop's Vec of `Connection` names and
    // the custom name `keep-alive` it parses, append_forwarded_for's String and its
    // HeaderValue copy, the first clone of the new id (Bytes promotes its buffer to
    // shared), and the map outgrowing hyper's reservation at its 13th field (a new
    // index table, and the entries Vec's grow).
    ("request_direct", budget(8, 1)),
    // Measured 4 + 1 grow: real_client's Vec of X-Forwarded-For lines,
    // append_forwarded_for's String and HeaderValue copy, and the map's growth (new
    // index table + entries grow). The client's id is kept, no `Connection` to parse.
    ("request_via_trusted_proxy", budget(4, 1)),
    // Measured 2: strip_hop_by_hop's Vec and the parsed `keep-alive` name.
    ("response_json", budget(2, 0)),
    // Measured 4: the same 2, then rewrite_self_reference's `concat` and the
    // HeaderValue::from_bytes copy of it.
    ("response_location_rewrite", budget(4, 0)),
];

const GRAPHQL_BUDGET: &[(&str, Counts)] = &[
    // Measured 5 + 3 grows: Scanner::string's Vec for each key walked (`operationName`,
    // `variables`, `query`) and for the name, each starting empty and growing past 8
    // bytes; then the `found` Vec.
    ("small_body", budget(5, 3)),
    // Measured 13 + 10 grows: 4 Strings and 3 or 4 grows per object (the 24-byte
    // `executeProgramExtraction` grows twice), and one `found` Vec for all three names.
    ("batch_body", budget(13, 10)),
    // Measured 2: graphql::percent_decode's Vec (kept as the String), and the Vec the
    // proxy's peek wraps the name in.
    ("get_query", budget(2, 0)),
];

fn bound(table: &[(&str, Counts)], case: &str) -> Counts {
    table
        .iter()
        .find(|(name, _)| *name == case)
        .map(|(_, counts)| *counts)
        .unwrap_or_else(|| panic!("{case} has no allocation budget: measure it and add one"))
}

#[test]
fn the_request_path_allocates_within_its_budget() {
    let fixture = Fixture::new();
    let mut report = Vec::new();
    let mut over = Vec::new();
    let mut record = |area: &str, case: &str, measured: Counts, budget: Counts| {
        let mut line = format!("{area}/{case}: {measured} (budget {budget})");
        if measured.allocs > budget.allocs || measured.grows > budget.grows {
            over.push(line.clone());
        } else if measured != budget {
            // A cut that is not written down would let the next regression through.
            line.push_str(": under budget, lower the bound");
        }
        report.push(line);
    };

    for case in &PATHS {
        case.check(&fixture);
        let measured = measure(|| case.run(&fixture).name.len());
        record("route", case.name, measured, bound(ROUTE_BUDGET, case.name));
    }
    for case in &HEADERS {
        case.check(&fixture);
        let measured = measure_head(&fixture, case);
        record(
            "headers",
            case.name,
            measured,
            bound(HEADER_BUDGET, case.name),
        );
    }
    for case in &GRAPHQL {
        case.check();
        let measured = measure(|| case.run());
        record(
            "graphql",
            case.name,
            measured,
            bound(GRAPHQL_BUDGET, case.name),
        );
    }

    println!("{}", report.join("\n"));
    assert!(
        over.is_empty(),
        "over the allocation budget:\n{}",
        over.join("\n")
    );
}

/// Like [`measure`], with a fresh head built before each count: hyper's parse is not
/// the rewrite's cost.
fn measure_head(fixture: &Fixture, case: &cases::HeaderCase) -> Counts {
    let mut heads = (0..4).map(|_| case.input(fixture)).collect::<Vec<_>>();
    let mut heads = heads.iter_mut();
    measure(|| {
        if let Some(head) = heads.next() {
            case.run(fixture, head);
        }
    })
}
