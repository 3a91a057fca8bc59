//! The conformance suite every provider runs from its tests (feature `conformance`).
//!
//! A provider implements [`Harness`] (a [`Bus`] on which the suite may create
//! uniquely named topics and subscriptions) and calls [`conformance_suite!`](crate::conformance_suite) with it,
//! which generates one `#[tokio::test]` per case, named after the case. Cases that
//! need a capability the provider lacks print a SKIPPED line naming it and pass; every
//! other failure fails the test.
//!
//! The cases cover Go CDK's drivertest, Watermill's pubsub tests and Dapr's
//! conformance suite (see `cases`), plus dead-lettering, redrive, ordering, filters,
//! delays, malformed input, publisher close and graceful shutdown.
//!
//! Partitioned logs (Kinesis, the memory broker's logs) have no subscriptions to ack;
//! they implement [`StreamHarness`] and run [`stream_conformance_suite!`](crate::stream_conformance_suite)
//! instead (see `stream_cases`): round trip, order per key, checkpoints, consumer
//! groups, `Latest`, replay from the start and from a time, retries, dead letters,
//! malformed records, publisher close, trace context and a missing stream.
//!
//! Stores (dedup stores for idempotent consumers, checkpoint stores for stream
//! readers) implement [`StoreHarness`] and run [`store_conformance_suite!`](crate::store_conformance_suite)
//! (see `store_cases`): the memory stores here, the durable ones in `cloudbus-store`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::bus::Bus;
use crate::capabilities::Capabilities;
use crate::checkpoint::CheckpointStore;
use crate::error::Result;
use crate::idempotency::DedupStore;

/// Fails the case with the condition and a message when the condition is false.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Error::new(ErrorKind::Internal, format!("check failed: {}: {}", stringify!($cond), format!($($msg)+))));
        }
    };
}

/// Skips the case, naming the capability, when the provider lacks it.
macro_rules! need {
    ($cond:expr, $what:expr) => {
        if !$cond {
            return Ok(Outcome::Skipped($what.to_string()));
        }
    };
}

pub mod cases;
pub mod chaos;
pub mod emulator;
pub mod network;
#[cfg(feature = "otel")]
pub mod otel_cases;
pub mod store_cases;
pub mod stream_cases;

/// What a provider gives the suite.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A bus on which the suite creates uniquely named topics and subscriptions.
    async fn bus(&self) -> Result<Bus>;
    /// The capabilities of the entities the suite creates.
    fn capabilities(&self) -> Capabilities;
    /// How long to wait for asynchronous delivery (emulators can be slow).
    fn patience(&self) -> Duration {
        Duration::from_secs(10)
    }
    /// The shortest lease (ack deadline, visibility timeout) the provider honours.
    fn short_lease(&self) -> Duration {
        Duration::from_secs(1)
    }
    /// How subscriptions get their names made unique (some clouds limit length).
    fn unique(&self, prefix: &str) -> String {
        format!("{prefix}-{:08x}", fastrand::u32(..))
    }
}

/// What a partitioned-log provider gives the stream suite.
#[async_trait]
pub trait StreamHarness: Send + Sync + 'static {
    /// The bus whose streams the suite reads and writes.
    async fn bus(&self) -> Result<Bus>;
    /// Creates a new, uniquely named stream with at least two partitions.
    async fn new_stream(&self) -> Result<String>;
    /// The bus that holds the dead-letter places (the same bus, or another provider's:
    /// Kinesis dead-letters into SQS).
    async fn dead_letter_bus(&self) -> Result<Bus>;
    /// Creates a new dead-letter place on [`dead_letter_bus`](Self::dead_letter_bus):
    /// a topic with a subscription of the same name. Returns its name.
    async fn dead_letter_place(&self) -> Result<String>;
    /// Whether raw (non-CloudEvent) records can be written, for the malformed case.
    fn raw_records(&self) -> bool {
        true
    }
    /// How long to wait for records to become readable.
    fn patience(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// What a store gives the store suite. Each call opens a new handle (a new
/// connection pool, client or reference) on the same data, as two processes would
/// have; a store kind it does not offer answers `None` and its cases skip.
#[async_trait]
pub trait StoreHarness: Send + Sync + 'static {
    /// A handle on the dedup store.
    async fn dedup_store(&self) -> Result<Option<Arc<dyn DedupStore>>>;
    /// A handle on the checkpoint store.
    async fn checkpoint_store(&self) -> Result<Option<Arc<dyn CheckpointStore>>>;
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All checks held.
    Passed,
    /// The provider lacks a capability the case needs.
    Skipped(String),
}

/// A boxed case future.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<Outcome>> + Send + 'a>>;

/// Runs one case and panics with its name and the error when it fails.
pub async fn run_case<H: Harness>(
    name: &str,
    harness: &H,
    case: for<'a> fn(&'a dyn Harness) -> CaseFuture<'a>,
) {
    report("conformance case", name, case(harness).await);
}

/// Prints a skipped case; panics with the error of a failed one.
fn report(kind: &str, name: &str, outcome: Result<Outcome>) {
    match outcome {
        Ok(Outcome::Passed) => {}
        Ok(Outcome::Skipped(why)) => {
            eprintln!("SKIPPED {kind} {name}: the provider lacks {why}");
        }
        Err(e) => panic!("{kind} {name} failed: {e}"),
    }
}

/// Runs one stream case and panics with its name and the error when it fails.
pub async fn run_stream_case<H: StreamHarness>(
    name: &str,
    harness: &H,
    case: for<'a> fn(&'a dyn StreamHarness) -> CaseFuture<'a>,
) {
    report("stream conformance case", name, case(harness).await);
}

/// Runs one store case and panics with its name and the error when it fails.
pub async fn run_store_case<H: StoreHarness>(
    name: &str,
    harness: &H,
    case: for<'a> fn(&'a dyn StoreHarness) -> CaseFuture<'a>,
) {
    report("store conformance case", name, case(harness).await);
}

/// Generates one `#[tokio::test]` per store conformance case over the
/// [`StoreHarness`] that `$make` evaluates to (inside an async fn).
///
/// ```ignore
/// cloudbus_core::store_conformance_suite!(MyStoreHarness::new());
/// ```
#[macro_export]
macro_rules! store_conformance_suite {
    ($make:expr) => {
        $crate::__store_conformance_cases! { suite $make }
    };
    ($make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make;
                $crate::conformance::run_store_case(stringify!($case), &harness, |h| {
                    Box::pin($crate::conformance::store_cases::$case(h))
                })
                .await;
            }
        )+
    };
}

/// Generates one `#[tokio::test]` per stream conformance case over the
/// [`StreamHarness`] that `$make` evaluates to (inside an async fn).
///
/// ```ignore
/// cloudbus_core::stream_conformance_suite!(MyStreamHarness::new());
/// ```
#[macro_export]
macro_rules! stream_conformance_suite {
    ($make:expr) => {
        $crate::__stream_conformance_cases! { suite $make }
    };
    ($make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make;
                $crate::conformance::run_stream_case(stringify!($case), &harness, |h| {
                    Box::pin($crate::conformance::stream_cases::$case(h))
                })
                .await;
            }
        )+
    };
}

/// Generates one `#[tokio::test]` per conformance case over the harness that
/// `$make` evaluates to (inside an async fn, so it may `.await`).
///
/// ```ignore
/// cloudbus_core::conformance_suite!(MyHarness::new());
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::__conformance_cases! { suite $make }
    };
    ($make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make;
                $crate::conformance::run_case(stringify!($case), &harness, |h| {
                    Box::pin($crate::conformance::cases::$case(h))
                })
                .await;
            }
        )+
    };
}

/// The list of the conformance cases, the only one: the functions of `cases`, in
/// order. `suite $make` makes a test of each ([`conformance_suite!`]); `names` is the
/// list of their names (a test of this module checks it against `cases.rs`).
///
/// [`conformance_suite!`]: crate::conformance_suite
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    (@with [suite $make:expr] $($case:ident),+) => {
        $crate::conformance_suite! { $make; $($case),+ }
    };
    (@with [names] $($case:ident),+) => {
        [$(stringify!($case)),+]
    };
    ($($mode:tt)+) => {
        $crate::__conformance_cases! { @with [$($mode)+]
            send_receive_one, publish_subscribe_100, json_text_and_binary_bodies,
            metadata_round_trip, fan_out_two_subscriptions, competing_consumers_share_work,
            nack_redelivers_with_next_attempt, nack_delay_is_honoured, double_ack_is_an_error,
            unacked_is_redelivered_after_lease, extend_keeps_the_lease,
            closed_publisher_fails, closed_consumer_fails, receive_can_be_cancelled,
            send_to_missing_topic_is_not_found, receive_from_missing_subscription_is_not_found,
            explicit_dead_letter_keeps_reason, dead_letter_after_max_attempts,
            redrive_returns_to_source, redrive_ends_when_a_letter_comes_back,
            purge_empties_dead_letters,
            ordering_per_key_under_concurrency, filter_routing, delayed_delivery,
            foreign_message_dead_lettered, broken_json_dead_lettered,
            missing_required_attributes_dead_lettered, publisher_close_loses_none_of_10000,
            graceful_shutdown_finishes_in_flight, failing_handler_is_retried_then_succeeds,
            worker_dead_letters_after_max_attempts, concurrent_publishers_and_worker,
            topic_isolation, continue_after_consumer_close, batch_reports_per_event_failures,
            idempotent_consumer_skips_duplicates, trace_context_propagates,
            topology_plan_and_apply
        }
    };
}

/// The list of the stream conformance cases, the only one (see
/// [`__conformance_cases!`](crate::__conformance_cases)).
#[doc(hidden)]
#[macro_export]
macro_rules! __stream_conformance_cases {
    (@with [suite $make:expr] $($case:ident),+) => {
        $crate::stream_conformance_suite! { $make; $($case),+ }
    };
    (@with [names] $($case:ident),+) => {
        [$(stringify!($case)),+]
    };
    ($($mode:tt)+) => {
        $crate::__stream_conformance_cases! { @with [$($mode)+]
            stream_round_trip_keeps_every_attribute, stream_order_per_key,
            stream_checkpoint_resume, stream_one_owner_per_partition, stream_groups_are_independent,
            stream_latest_skips_earlier_records, stream_replay_from_earliest,
            stream_replay_from_time, stream_failing_handler_is_retried,
            stream_dead_letters_after_retries, stream_malformed_record_dead_lettered,
            stream_publisher_close_loses_none, stream_trace_context_propagates,
            stream_missing_is_not_found
        }
    };
}

/// The list of the store conformance cases, the only one (see
/// [`__conformance_cases!`](crate::__conformance_cases)).
#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_cases {
    (@with [suite $make:expr] $($case:ident),+) => {
        $crate::store_conformance_suite! { $make; $($case),+ }
    };
    (@with [names] $($case:ident),+) => {
        [$(stringify!($case)),+]
    };
    ($($mode:tt)+) => {
        $crate::__store_conformance_cases! { @with [$($mode)+]
            dedup_first_claim_wins, dedup_completed_key_is_done,
            dedup_release_frees_only_a_claim, dedup_release_and_renewal_are_by_owner,
            dedup_claims_and_keys_expire,
            dedup_concurrent_claims_one_wins, dedup_idempotent_handler_handles_once,
            checkpoint_resumes_where_saved, checkpoint_one_owner_at_a_time,
            checkpoint_lapsed_lease_passes_on, checkpoint_concurrent_acquire_one_wins
        }
    };
}

#[cfg(test)]
mod tests {
    /// The public case functions a source file defines, in order.
    fn defined(source: &str, parameter: &str) -> Vec<String> {
        source
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter(|rest| rest.contains(parameter))
            .filter_map(|rest| rest.split('(').next())
            .map(str::to_owned)
            .collect()
    }

    /// A case written in `cases.rs` but missing from the list would never run (and
    /// one listed but not written would not compile in the providers' tests).
    #[test]
    fn the_case_lists_name_every_case_function() {
        let listed: Vec<&str> = crate::__conformance_cases! { names }.to_vec();
        assert_eq!(
            listed,
            defined(include_str!("cases.rs"), "(h: &dyn Harness)")
        );
        let listed: Vec<&str> = crate::__stream_conformance_cases! { names }.to_vec();
        assert_eq!(
            listed,
            defined(include_str!("stream_cases.rs"), "(h: &dyn StreamHarness)")
        );
        let listed: Vec<&str> = crate::__store_conformance_cases! { names }.to_vec();
        assert_eq!(
            listed,
            defined(include_str!("store_cases.rs"), "(h: &dyn StoreHarness)")
        );
    }
}
