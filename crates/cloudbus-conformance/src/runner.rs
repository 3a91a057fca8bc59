//! Runs the registries as tests: [`Suite`] makes one test per case and harness,
//! named `PREFIX::case` (as `cargo test` filters and `cargo nextest` lists them), and
//! runs each on its own two-thread runtime.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::chaos::{FaultKind, run_chaos_case, run_stream_chaos_case};
use crate::harness::{Case, Harness, StoreHarness, StreamHarness, verdict};

/// The tests of one provider's test target: the case registries over its harnesses.
/// A harness maker that answers `None` (no emulator reachable, after its loud message;
/// under `CI=true` [`required_env`](crate::emulator::required_env) fails instead)
/// passes its tests without running them, as the per-test `return` did.
#[derive(Default)]
pub struct Suite {
    trials: Vec<Trial>,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("tests", &self.trials.len())
            .finish()
    }
}

/// Runs `body` on a new two-thread runtime (as `#[tokio::test(flavor =
/// "multi_thread", worker_threads = 2)]` did).
fn on_runtime(body: impl Future<Output = Result<(), String>>) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("no runtime: {e}")))?;
    runtime.block_on(body).map_err(Failed::from)
}

impl Suite {
    /// An empty suite.
    pub fn new() -> Self {
        Suite::default()
    }

    /// The conformance cases ([`BUS_CASES`](crate::BUS_CASES)) over the harness
    /// `make` opens, named `PREFIX::case`.
    pub fn bus<H, M, F>(self, prefix: &str, make: M) -> Self
    where
        H: Harness,
        M: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Option<H>>,
    {
        self.cases(prefix, "conformance case", crate::cases::CASES, make, |h| {
            h as &dyn Harness
        })
    }

    /// The stream conformance cases ([`STREAM_CASES`](crate::STREAM_CASES)) over the
    /// harness `make` opens, named `PREFIX::case`.
    pub fn stream<H, M, F>(self, prefix: &str, make: M) -> Self
    where
        H: StreamHarness,
        M: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Option<H>>,
    {
        self.cases(
            prefix,
            "stream conformance case",
            crate::stream_cases::CASES,
            make,
            |h| h as &dyn StreamHarness,
        )
    }

    /// The store conformance cases ([`STORE_CASES`](crate::STORE_CASES)) over the
    /// harness `make` opens, named `PREFIX::case`.
    pub fn store<H, M, F>(self, prefix: &str, make: M) -> Self
    where
        H: StoreHarness,
        M: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Option<H>>,
    {
        self.cases(
            prefix,
            "store conformance case",
            crate::store_cases::CASES,
            make,
            |h| h as &dyn StoreHarness,
        )
    }

    /// A test per case of `cases`, each running the case on the harness `make` opens
    /// (seen as the cases' harness type `K` through `view`).
    fn cases<H, K, M, F>(
        mut self,
        prefix: &str,
        kind: &'static str,
        cases: &'static [Case<K>],
        make: M,
        view: fn(&H) -> &K,
    ) -> Self
    where
        H: 'static,
        K: ?Sized + 'static,
        M: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Option<H>>,
    {
        let make = Arc::new(make);
        for case in cases {
            let make = Arc::clone(&make);
            self.trials
                .push(Trial::test(format!("{prefix}::{}", case.name), move || {
                    on_runtime(async move {
                        let Some(harness) = make().await else {
                            return Ok(());
                        };
                        verdict(kind, case.name, (case.run)(view(&harness)).await)
                    })
                }));
        }
        self
    }

    /// The "nothing lost" promise under each [`FaultKind`] with `count` events over
    /// the harness `make` opens, named `PREFIX::chaos_KIND`.
    pub fn chaos<H, M, F>(mut self, prefix: &str, make: M, count: usize) -> Self
    where
        H: Harness,
        M: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Option<H>>,
    {
        let make = Arc::new(make);
        for kind in FaultKind::ALL {
            let make = Arc::clone(&make);
            self.trials.push(Trial::test(
                format!("{prefix}::chaos_{}", kind.name()),
                move || {
                    on_runtime(async move {
                        if let Some(harness) = make().await {
                            run_chaos_case(harness, kind, count).await;
                        }
                        Ok(())
                    })
                },
            ));
        }
        self
    }

    /// The stream "nothing lost" promise under each [`FaultKind`] a log reader meets
    /// (all but `OverFetch`, which only a subscription's receive can do) with `count`
    /// events, named `PREFIX::stream_chaos_KIND`.
    pub fn stream_chaos<H, M, F>(mut self, prefix: &str, make: M, count: usize) -> Self
    where
        H: StreamHarness,
        M: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Option<H>>,
    {
        let make = Arc::new(make);
        for kind in FaultKind::ALL {
            if kind == FaultKind::OverFetch {
                continue;
            }
            let make = Arc::clone(&make);
            self.trials.push(Trial::test(
                format!("{prefix}::stream_chaos_{}", kind.name()),
                move || {
                    on_runtime(async move {
                        if let Some(harness) = make().await {
                            run_stream_chaos_case(harness, kind, count).await;
                        }
                        Ok(())
                    })
                },
            ));
        }
        self
    }

    /// Lists test `name` (`PREFIX::case`) as ignored, saying why on stderr: for a
    /// case that one harness cannot pass for a reason outside the provider (a broker
    /// that gets a protocol detail wrong) and that another harness of the suite runs.
    /// A name that is not in the suite panics, so that a renamed case is noticed.
    ///
    /// ```
    /// let suite = cloudbus_conformance::Suite::new();
    /// assert!(suite.names().is_empty());
    /// ```
    pub fn elsewhere(mut self, name: &str, why: &str) -> Self {
        let Some(i) = self.trials.iter().position(|t| t.name() == name) else {
            panic!("Suite::elsewhere: the suite has no test {name:?}");
        };
        let trial = self.trials.remove(i).with_ignored_flag(true);
        eprintln!("IGNORED {name}: {why}");
        self.trials.insert(i, trial);
        self
    }

    /// The names of the tests, in order.
    pub fn names(&self) -> Vec<String> {
        self.trials.iter().map(|t| t.name().to_owned()).collect()
    }

    /// Runs the tests the command line selects (the arguments of `cargo test --
    /// ...`), prints the libtest report, and answers the exit code.
    pub fn run(self) -> ExitCode {
        libtest_mimic::run(&Arguments::from_args(), self.trials).exit_code()
    }
}
