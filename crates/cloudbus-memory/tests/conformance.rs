//! The memory broker against the conformance suites: topics and subscriptions, the
//! partitioned logs, the in-memory stores, and the "nothing lost" promise under each
//! injected fault kind (issue 12). A test target with `harness = false`: the cases
//! come from the suite's registries (`cloudbus_conformance::Suite`).

mod common;

use common::{MemoryHarness, MemoryStores};

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .store("store_conformance", || async { Some(MemoryStores::new()) })
        .bus("conformance", || async { Some(MemoryHarness::new()) })
        .chaos("chaos", || async { Some(MemoryHarness::new()) }, 2_000)
        .stream_chaos("chaos", || async { Some(MemoryHarness::new()) }, 2_000)
        .stream("stream_conformance", || async {
            Some(MemoryHarness::new())
        })
        .run()
}
