//! Observability in one place: the metric names of the seed (recorded through the
//! `metrics` facade, so any exporter works). The W3C trace context each event carries
//! lives in [`trace_context`](cloudbus_driver::trace_context) and is re-exported here with
//! [`inject`]. Consumers keep their metric handles per event type; install the
//! metrics exporter before consuming.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cloudbus_driver::event::{AttributesReader, Event};

/// Metric names, as the seed defines them.
pub mod names {
    /// Counter: events accepted by a provider. Labels: `source`, `event_type`.
    pub const EVENTS_PUBLISHED_TOTAL: &str = "events_published_total";
    /// Counter: deliveries settled. Labels: `consumer`, `event_type`, `status`.
    pub const EVENTS_CONSUMED_TOTAL: &str = "events_consumed_total";
    /// Histogram: handler time in seconds. Labels: `consumer`, `event_type`.
    pub const EVENT_PROCESSING_DURATION_SECONDS: &str = "event_processing_duration_seconds";
    /// Gauge: messages waiting in the queue or subscription. Label: `consumer`.
    ///
    /// Where it comes from: SQS `ApproximateNumberOfMessages` (and SNS's and
    /// EventBridge's queues), Service Bus `ActiveMessageCount` from the management API
    /// (read at most every 5 s), the memory broker's count. Not recorded for Pub/Sub,
    /// whose backlog (`num_undelivered_messages`) is only in Cloud Monitoring, nor for
    /// Event Grid, which pushes: the service holds what it has not delivered and
    /// retries it, and reports it in Azure Monitor (delivery and dead-letter
    /// counts). Streams (Kinesis, the memory log) have [`EVENT_STREAM_LAG_SECONDS`]
    /// instead.
    pub const EVENT_QUEUE_DEPTH: &str = "event_queue_depth";
    /// Counter: messages moved to a dead-letter place. Labels: `consumer`, `reason`.
    pub const DLQ_MESSAGES_TOTAL: &str = "dlq_messages_total";
    /// Counter: handler runs that did not succeed. Labels: `consumer`, `event_type`,
    /// `error` (`retry`: the handler asked for another attempt; `reject`: it refused
    /// the event, which goes to the dead-letter place; `panic`).
    pub const EVENT_PROCESSING_ERRORS_TOTAL: &str = "event_processing_errors_total";
    /// Histogram: seconds from the event's `time` to its receipt. Label: `consumer`.
    pub const EVENT_LAG_SECONDS: &str = "event_lag_seconds";
    /// Gauge: how far a stream consumer group's last read of a partition is behind
    /// the partition's newest record, in seconds (Kinesis `MillisBehindLatest`; the
    /// queue depth of a stream). Labels: `consumer` (the group), `partition`.
    pub const EVENT_STREAM_LAG_SECONDS: &str = "event_stream_lag_seconds";
    /// Gauge: events staged in a transactional outbox and not yet published. Label:
    /// `topic`.
    pub const OUTBOX_PENDING: &str = "outbox_pending";
    /// Gauge: age in seconds of the oldest event waiting in an outbox (0 when none).
    /// Label: `topic`.
    pub const OUTBOX_OLDEST_AGE_SECONDS: &str = "outbox_oldest_age_seconds";
    /// Counter: outbox events the broker confirmed. Label: `topic`.
    pub const OUTBOX_PUBLISHED_TOTAL: &str = "outbox_published_total";

    /// Every metric cloudbus records, for dashboards and alerts to be checked against.
    pub const ALL: &[&str] = &[
        EVENTS_PUBLISHED_TOTAL,
        EVENTS_CONSUMED_TOTAL,
        EVENT_PROCESSING_DURATION_SECONDS,
        EVENT_PROCESSING_ERRORS_TOTAL,
        EVENT_QUEUE_DEPTH,
        DLQ_MESSAGES_TOTAL,
        EVENT_LAG_SECONDS,
        EVENT_STREAM_LAG_SECONDS,
        OUTBOX_PENDING,
        OUTBOX_OLDEST_AGE_SECONDS,
        OUTBOX_PUBLISHED_TOTAL,
    ];

    /// The histograms among [`ALL`]: a Prometheus exporter with buckets exposes each
    /// as `NAME_bucket`, `NAME_sum` and `NAME_count`.
    pub const HISTOGRAMS: &[&str] = &[EVENT_PROCESSING_DURATION_SECONDS, EVENT_LAG_SECONDS];
}

/// The metric handles of one transactional outbox relay (`cloudbus-store`): what waits
/// and what went out, per topic.
///
/// ```
/// let metrics = cloudbus_core::telemetry::OutboxMetrics::new("orders");
/// metrics.backlog(12, 3.5);
/// metrics.published(12);
/// ```
#[derive(Clone)]
pub struct OutboxMetrics {
    pending: metrics::Gauge,
    oldest_age: metrics::Gauge,
    published: metrics::Counter,
}

impl OutboxMetrics {
    /// The handles of the outbox of `topic`.
    pub fn new(topic: &str) -> Self {
        OutboxMetrics {
            pending: metrics::gauge!(names::OUTBOX_PENDING, "topic" => topic.to_owned()),
            oldest_age: metrics::gauge!(names::OUTBOX_OLDEST_AGE_SECONDS, "topic" => topic.to_owned()),
            published: metrics::counter!(names::OUTBOX_PUBLISHED_TOTAL, "topic" => topic.to_owned()),
        }
    }

    /// Records the backlog: `pending` events, the oldest `oldest_age_seconds` old.
    pub fn backlog(&self, pending: u64, oldest_age_seconds: f64) {
        self.pending.set(pending as f64);
        self.oldest_age.set(oldest_age_seconds);
    }

    /// Counts `n` events the broker confirmed.
    pub fn published(&self, n: u64) {
        self.published.increment(n);
    }
}

/// Distinct values a label taken from the wire (`event_type`, `source`) may have in
/// one process unless [`set_max_label_values`] says otherwise; later new values are
/// counted as [`OTHER_LABEL`]. A producer that puts ids into types or sources cannot
/// make the metrics backend run out of series.
pub const MAX_LABEL_VALUES: usize = 256;
/// The label value of everything beyond the cap.
pub const OTHER_LABEL: &str = "other";

static LABEL_VALUES_CAP: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(MAX_LABEL_VALUES);

/// Sets how many distinct values each wire-taken label (`event_type`, `source`) may
/// have in this process (at least 1); the values seen first keep their own series,
/// later new ones are counted as [`OTHER_LABEL`]. Call it at start-up, before
/// publishing or consuming.
///
/// ```
/// use cloudbus_core::telemetry;
/// telemetry::set_max_label_values(50);
/// assert_eq!(telemetry::max_label_values(), 50);
/// # telemetry::set_max_label_values(telemetry::MAX_LABEL_VALUES);
/// ```
pub fn set_max_label_values(n: usize) {
    LABEL_VALUES_CAP.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The cap [`set_max_label_values`] set ([`MAX_LABEL_VALUES`] by default).
pub fn max_label_values() -> usize {
    LABEL_VALUES_CAP.load(std::sync::atomic::Ordering::Relaxed)
}

/// The values seen of one wire-taken label.
struct LabelValues(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl LabelValues {
    const fn new() -> Self {
        LabelValues(std::sync::Mutex::new(std::collections::BTreeSet::new()))
    }

    /// `value` while fewer than [`max_label_values`] were seen (or it was one of
    /// them), else [`OTHER_LABEL`].
    fn bounded(&self, value: &str) -> String {
        self.bounded_within(value, max_label_values())
    }

    /// [`bounded`](Self::bounded) with the cap `cap`.
    fn bounded_within(&self, value: &str, cap: usize) -> String {
        let Ok(mut seen) = self.0.lock() else {
            return OTHER_LABEL.to_owned();
        };
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < cap {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        OTHER_LABEL.to_owned()
    }
}

static PUBLISHED_SOURCES: LabelValues = LabelValues::new();
static PUBLISHED_TYPES: LabelValues = LabelValues::new();

pub(crate) fn record_published_n(event: &Event, n: u64) {
    metrics::counter!(names::EVENTS_PUBLISHED_TOTAL,
        "source" => PUBLISHED_SOURCES.bounded(event.source().as_str()),
        "event_type" => PUBLISHED_TYPES.bounded(event.ty()))
    .increment(n);
}

/// Sets how far `group`'s last read of `partition` is behind its newest record.
pub(crate) fn record_stream_lag(group: &str, partition: &str, behind: std::time::Duration) {
    metrics::gauge!(names::EVENT_STREAM_LAG_SECONDS,
        "consumer" => group.to_owned(),
        "partition" => partition.to_owned())
    .set(behind.as_secs_f64());
}

pub(crate) fn record_dead_lettered(consumer: &str, reason: &str) {
    // The reason label is the short category before any ':' to bound cardinality.
    let category = reason.split(':').next().unwrap_or(reason).trim().to_owned();
    metrics::counter!(names::DLQ_MESSAGES_TOTAL,
        "consumer" => consumer.to_owned(),
        "reason" => category)
    .increment(1);
}

/// The metric handles of one consumer, registered once per event type instead of on
/// every event (registration builds the label strings). Handles bind to the recorder
/// installed when they are first used: install the exporter before consuming.
pub(crate) struct ConsumerMetrics {
    consumer: Arc<str>,
    lag: metrics::Histogram,
    depth: metrics::Gauge,
    by_type: RwLock<HashMap<String, Arc<TypeMetrics>>>,
}

struct TypeMetrics {
    ack: metrics::Counter,
    nack: metrics::Counter,
    dead_letter: metrics::Counter,
    processing: metrics::Histogram,
    retry_errors: metrics::Counter,
    reject_errors: metrics::Counter,
    panic_errors: metrics::Counter,
}

/// How a handler run ended, for [`names::EVENT_PROCESSING_ERRORS_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunOutcome {
    Success,
    Retry,
    Reject,
    Panic,
}

impl ConsumerMetrics {
    pub(crate) fn new(consumer: Arc<str>) -> Self {
        ConsumerMetrics {
            lag: metrics::histogram!(names::EVENT_LAG_SECONDS, "consumer" => consumer.to_string()),
            depth: metrics::gauge!(names::EVENT_QUEUE_DEPTH, "consumer" => consumer.to_string()),
            consumer,
            by_type: RwLock::new(HashMap::new()),
        }
    }

    /// Runs `f` on the handles of `event_type`, registering them on its first use.
    /// The common case (known type) borrows them under the read lock: cloning an
    /// `Arc` per call made every handled event bounce its count between cores.
    fn with_type<R>(&self, event_type: &str, f: impl FnOnce(&TypeMetrics) -> R) -> R {
        // Beyond max_label_values() types this consumer counts new ones as "other".
        let label = match self.by_type.read() {
            Ok(m) => match m.get(event_type) {
                Some(t) => return f(t),
                None if m.len() < max_label_values() => event_type,
                None => match m.get(OTHER_LABEL) {
                    Some(t) => return f(t),
                    None => OTHER_LABEL,
                },
            },
            Err(_) => OTHER_LABEL,
        };
        f(&self.register(label))
    }

    /// Registers the handles of `event_type` (a label already bounded).
    fn register(&self, event_type: &str) -> Arc<TypeMetrics> {
        let consumed = |status: &'static str| {
            metrics::counter!(names::EVENTS_CONSUMED_TOTAL,
                "consumer" => self.consumer.to_string(),
                "event_type" => event_type.to_owned(),
                "status" => status)
        };
        let failed = |error: &'static str| {
            metrics::counter!(names::EVENT_PROCESSING_ERRORS_TOTAL,
                "consumer" => self.consumer.to_string(),
                "event_type" => event_type.to_owned(),
                "error" => error)
        };
        let made = Arc::new(TypeMetrics {
            ack: consumed("ack"),
            nack: consumed("nack"),
            dead_letter: consumed("dead_letter"),
            processing: metrics::histogram!(names::EVENT_PROCESSING_DURATION_SECONDS,
                "consumer" => self.consumer.to_string(),
                "event_type" => event_type.to_owned()),
            retry_errors: failed("retry"),
            reject_errors: failed("reject"),
            panic_errors: failed("panic"),
        });
        if let Ok(mut m) = self.by_type.write() {
            m.entry(event_type.to_owned())
                .or_insert_with(|| made.clone());
        }
        made
    }

    /// Counts `n` settlements of `status` (`ack`, `nack`, `dead_letter`).
    pub(crate) fn consumed(&self, event_type: &str, status: &'static str, n: u64) {
        self.with_type(event_type, |t| match status {
            "ack" => t.ack.increment(n),
            "nack" => t.nack.increment(n),
            "dead_letter" => t.dead_letter.increment(n),
            _ => {}
        });
    }

    /// Records one handler run: its time, and its failure when it failed.
    pub(crate) fn processing(&self, event_type: &str, seconds: f64, outcome: RunOutcome) {
        self.with_type(event_type, |t| {
            t.processing.record(seconds);
            match outcome {
                RunOutcome::Success => {}
                RunOutcome::Retry => t.retry_errors.increment(1),
                RunOutcome::Reject => t.reject_errors.increment(1),
                RunOutcome::Panic => t.panic_errors.increment(1),
            }
        });
    }

    /// Sets the queue depth gauge.
    pub(crate) fn queue_depth(&self, depth: u64) {
        self.depth.set(depth as f64);
    }

    /// Records the lag of an event: `now` (the receipt of its batch) minus its `time`.
    pub(crate) fn lag(&self, event: &Event, now: chrono::DateTime<chrono::Utc>) {
        if let Some(t) = event.time() {
            let lag = (now - *t).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.lag.record(lag.max(0.0));
        }
    }

    /// Counts one dead-lettered message (the reason's category is a label, so this
    /// one is not cached; dead letters are rare).
    pub(crate) fn dead_lettered(&self, reason: &str) {
        record_dead_lettered(&self.consumer, reason);
    }
}

pub use cloudbus_driver::event::inject;
pub use cloudbus_driver::trace_context::TraceContext;

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_driver::event::{EXT_TRACEPARENT, EventBuilder};

    /// Issue 12 item 15: labels taken from the wire had no cardinality cap.
    #[test]
    fn wire_labels_are_capped() {
        let values = LabelValues::new();
        let distinct: std::collections::HashSet<String> = (0..1000)
            .map(|n| values.bounded(&format!("type-{n}")))
            .collect();
        assert_eq!(distinct.len(), MAX_LABEL_VALUES + 1);
        assert!(distinct.contains(OTHER_LABEL));
        assert_eq!(values.bounded("type-3"), "type-3", "known values stay");
        let consumer = ConsumerMetrics::new("c".into());
        for n in 0..1000 {
            consumer.consumed(&format!("t-{n}"), "ack", 1);
        }
        let cached = consumer.by_type.read().unwrap().len();
        assert!(cached <= MAX_LABEL_VALUES + 1, "{cached} types cached");
        // A smaller cap, as set_max_label_values gives.
        let values = LabelValues::new();
        let kept: Vec<String> = (0..5)
            .map(|n| values.bounded_within(&format!("t-{n}"), 2))
            .collect();
        assert_eq!(kept, ["t-0", "t-1", "other", "other", "other"]);
    }

    #[test]
    fn rejects_bad_traceparents() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn inject_continues_the_current_trace() {
        let parent = TraceContext::new_root();
        let mut e = EventBuilder::new("t", "/s").build().unwrap();
        e.remove_extension(EXT_TRACEPARENT);
        let got = parent.scope(async { inject(&mut e) }).await;
        assert_eq!(got.trace_id(), parent.trace_id());
        assert_ne!(got.span_id(), parent.span_id());
        assert_eq!(TraceContext::from_event(&e), Some(got));
        // An event that has a context keeps it.
        let kept = parent.scope(async { inject(&mut e) }).await;
        assert_eq!(kept, got);
        // Built outside any scope: a new trace.
        let fresh = EventBuilder::new("t", "/s").build().unwrap();
        let root = TraceContext::from_event(&fresh).unwrap();
        assert_ne!(root.trace_id(), parent.trace_id());
        // Built inside a scope: the creation continues the trace.
        let child = parent
            .scope(async { EventBuilder::new("t", "/s").build() })
            .await
            .unwrap();
        assert_eq!(
            TraceContext::from_event(&child).unwrap().trace_id(),
            parent.trace_id()
        );
    }
}
