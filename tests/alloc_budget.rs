//! The allocation budget of the request path (issue 5): route matching, header
//! rewriting both ways, the GraphQL peek and the exchange's bookkeeping may allocate at
//! most as often as they did when the budget was last set. Counts, not time, so the
//! result does not depend on the machine. The cases are the `alloc` bench's (`cargo
//! bench --bench alloc` gives their time and bytes too).

#[path = "../benches/alloc/cases.rs"]
mod cases;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt;

use cases::{Fixture, EXCHANGES, GRAPHQL, HEADERS, PATHS, UPSTREAM};

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

// Each bound is the count measured when it was set (rustc 1.95, http 1.5, bytes 1.12,
// regex 1): the comment says where the allocations come from, so that a cut can lower
// it.

const ROUTE_BUDGET: &[(&str, Counts)] = &[
    // Measured 0: a borrowed path, literal and regex matchers (regex's cache is warm).
    ("api_call", budget(0, 0)),
    ("quadrige_extraction", budget(0, 0)),
    ("quadrige_download", budget(0, 0)),
    ("frontend_file", budget(0, 0)),
    ("media_file", budget(0, 0)),
    ("unmatched", budget(0, 0)),
    // Measured 1: route::decoded_path's buffer, which becomes the decoded String.
    ("percent_encoded", budget(1, 0)),
];

const HEADER_BUDGET: &[(&str, Counts)] = &[
    // Measured 1: the generated request id (one `Bytes` owning its 32 digits, so its
    // clones count references). The proxy's own fields are written after the map's, not
    // inserted into it, so the map no longer grows (was 3 + 1 grow with them in the
    // map); the client's address is formatted once per connection and shared.
    ("request_direct", budget(1, 0)),
    // Measured 1: the extended `X-Forwarded-For` list. The client's id is kept.
    ("request_via_trusted_proxy", budget(1, 0)),
    // Measured 0: the `Connection` tokens are removed by name, parsed on the stack.
    ("response_json", budget(0, 0)),
    // Measured 1: rewrite_self_reference's exact-size `Location`.
    ("response_location_rewrite", budget(1, 0)),
];

const GRAPHQL_BUDGET: &[(&str, Counts)] = &[
    // Measured 2: the name, copied once at its size (keys are compared in the body),
    // then the `found` Vec.
    ("small_body", budget(2, 0)),
    // Measured 4: the three names, and one `found` Vec for all of them.
    ("batch_body", budget(4, 0)),
    // Measured 2: the name (graphql::percent_decode borrows it, having nothing to
    // decode; the function returns it owned), and the Vec the proxy's peek wraps it in.
    ("get_query", budget(2, 0)),
];

const EXCHANGE_BUDGET: &[(&str, Counts)] = &[
    // Measured 3: the log record's Box (the response body takes it boxed), its own copy
    // of the request target (an `Arc<str>` the status page shares: a clone of hyper's
    // target would keep the connection's 8 KiB read buffer alive for the whole
    // transfer), and the status page's `Arc<Tracked>`, which its registry shares. The
    // method and route names are reference-counted clones; Referer and User-Agent are
    // copied only when an access log is written (not here); the registry's shard has
    // room.
    ("proxied", budget(3, 0)),
    ("refused_before_routing", budget(3, 0)),
];

const UPSTREAM_BUDGET: &[(&str, Counts)] = &[
    // Measured 1: the head's buffer, sized exactly (as a `Bytes` it cost a second one,
    // the shared header of a `Vec` whose length is not its capacity).
    ("request_head", budget(1, 0)),
    // Measured 4: the header map's two tables, the shared header the read buffer gets
    // when the head is first split off it (once per buffer, not per response, on a
    // kept-alive connection), and `X-Request-ID`'s name, which `http` does not know
    // (measured 3 without it). Values share the head's bytes.
    ("response_head", budget(4, 0)),
    // Measured 1: the same shared header, on this fresh buffer; the data piece shares it.
    ("chunked_piece", budget(1, 0)),
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

    for case in &EXCHANGES {
        case.check(&fixture);
        let head = case.input();
        let measured = measure(|| case.run(&fixture, &head));
        record(
            "exchange",
            case.name,
            measured,
            bound(EXCHANGE_BUDGET, case.name),
        );
    }

    for case in &UPSTREAM {
        case.check(&fixture);
        let mut inputs = (0..4).map(|_| case.input(&fixture)).collect::<Vec<_>>();
        let mut inputs = inputs.iter_mut();
        let measured = measure(|| inputs.next().map(|input| case.run(input)));
        let name = case.to_string();
        record("upstream", &name, measured, bound(UPSTREAM_BUDGET, &name));
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
