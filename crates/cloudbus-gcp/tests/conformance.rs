//! Pub/Sub against its emulator (PUBSUB_EMULATOR_HOST): the conformance suite and
//! the "nothing lost" promise under injected faults (issue 12). A test target with
//! `harness = false`: the cases come from the suite's registries
//! (`cloudbus_conformance::Suite`). Without an emulator (and outside CI) each case
//! passes at once after the loud message; under CI=true `emulator()` panics instead.

mod common;

use common::{PubSubHarness, emulator};

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .bus("conformance", || async {
            emulator().map(|host| PubSubHarness { host })
        })
        .chaos(
            "chaos",
            || async { emulator().map(|host| PubSubHarness { host }) },
            300,
        )
        .run()
}
