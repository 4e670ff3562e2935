//! Time and allocations per operation on the request path (issue 5): route matching,
//! header rewriting both ways, the GraphQL peek, the exchange's bookkeeping, the upstream
//! connection's head writing and parsing. Run with
//! `cargo bench --bench alloc`; the `alloc:` and `grow:` rows are counts per operation.
//! `tests/alloc_budget.rs` holds the counts so that a regression fails the tests.

#[path = "alloc/cases.rs"]
mod cases;

use std::sync::LazyLock;

use cases::{
    ExchangeCase, Fixture, GraphqlCase, HeaderCase, PathCase, UpstreamCase, EXCHANGES, GRAPHQL,
    HEADERS, PATHS, UPSTREAM,
};
use divan::{black_box, AllocProfiler, Bencher};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

/// Built once: loading the config and compiling the regexes is start-up work.
static FIXTURE: LazyLock<Fixture> = LazyLock::new(Fixture::new);

fn main() {
    divan::main();
}

#[divan::bench(args = PATHS)]
fn route(bencher: Bencher, case: &PathCase) {
    let fixture = &*FIXTURE;
    case.check(fixture);
    bencher.bench_local(|| black_box(black_box(case).run(fixture)));
}

#[divan::bench(args = HEADERS)]
fn headers(bencher: Bencher, case: &HeaderCase) {
    let fixture = &*FIXTURE;
    case.check(fixture);
    // The map is built outside the measurement and dropped after it: hyper pays for
    // the parse, and the drop belongs to whoever ends the exchange.
    bencher
        .with_inputs(|| case.input(fixture))
        .bench_local_refs(|head| case.run(fixture, head));
}

#[divan::bench(args = GRAPHQL)]
fn graphql(bencher: Bencher, case: &GraphqlCase) {
    case.check();
    bencher.bench_local(|| black_box(case).run());
}

#[divan::bench(args = EXCHANGES)]
fn exchange(bencher: Bencher, case: &ExchangeCase) {
    let fixture = &*FIXTURE;
    case.check(fixture);
    let head = case.input();
    // The record and the entry are dropped after the measurement: they end with the
    // response body.
    bencher.bench_local(|| case.run(fixture, black_box(&head)));
}

#[divan::bench(args = UPSTREAM)]
fn upstream(bencher: Bencher, case: &UpstreamCase) {
    let fixture = &*FIXTURE;
    case.check(fixture);
    // The read buffer is filled outside the measurement: the socket's read is not ours
    // to count.
    bencher
        .with_inputs(|| case.input(fixture))
        .bench_local_refs(|input| case.run(input));
}
