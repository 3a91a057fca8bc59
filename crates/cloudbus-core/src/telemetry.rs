//! Observability in one place: the metric names of the seed (recorded through the
//! `metrics` facade, so any exporter works) and W3C trace context carried inside the
//! event's `traceparent` extension, with the current context kept per task so that
//! events published while handling an event continue its trace. Consumers keep their
//! metric handles per event type; install the metrics exporter before consuming.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::event::{AttributesReader, EXT_TRACEPARENT, Event, EventExt};

/// Metric names, as the seed defines them.
pub mod names {
    /// Counter: events accepted by a provider. Labels: `source`, `event_type`.
    pub const EVENTS_PUBLISHED_TOTAL: &str = "events_published_total";
    /// Counter: deliveries settled. Labels: `consumer`, `event_type`, `status`.
    pub const EVENTS_CONSUMED_TOTAL: &str = "events_consumed_total";
    /// Histogram: handler time in seconds. Labels: `consumer`, `event_type`.
    pub const EVENT_PROCESSING_DURATION_SECONDS: &str = "event_processing_duration_seconds";
    /// Gauge: messages waiting in the queue or subscription. Label: `consumer`.
    pub const EVENT_QUEUE_DEPTH: &str = "event_queue_depth";
    /// Counter: messages moved to a dead-letter place. Labels: `consumer`, `reason`.
    pub const DLQ_MESSAGES_TOTAL: &str = "dlq_messages_total";
    /// Histogram: seconds from the event's `time` to its receipt. Label: `consumer`.
    pub const EVENT_LAG_SECONDS: &str = "event_lag_seconds";
}

/// Distinct values a label taken from the wire (`event_type`, `source`) may have in
/// one process; later new values are counted as [`OTHER_LABEL`]. A producer that puts
/// ids into types or sources cannot make the metrics backend run out of series.
pub const MAX_LABEL_VALUES: usize = 256;
/// The label value of everything beyond [`MAX_LABEL_VALUES`].
pub const OTHER_LABEL: &str = "other";

/// The values seen of one wire-taken label.
struct LabelValues(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl LabelValues {
    const fn new() -> Self {
        LabelValues(std::sync::Mutex::new(std::collections::BTreeSet::new()))
    }

    /// `value` while fewer than [`MAX_LABEL_VALUES`] were seen (or it was one of
    /// them), else [`OTHER_LABEL`].
    fn bounded(&self, value: &str) -> String {
        let Ok(mut seen) = self.0.lock() else {
            return OTHER_LABEL.to_owned();
        };
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < MAX_LABEL_VALUES {
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

    fn for_type(&self, event_type: &str) -> Arc<TypeMetrics> {
        // Beyond MAX_LABEL_VALUES types this consumer counts new ones as "other".
        let event_type = match self.by_type.read() {
            Ok(m) => match m.get(event_type) {
                Some(t) => return t.clone(),
                None if m.len() < MAX_LABEL_VALUES => event_type,
                None => match m.get(OTHER_LABEL) {
                    Some(t) => return t.clone(),
                    None => OTHER_LABEL,
                },
            },
            Err(_) => OTHER_LABEL,
        };
        let consumed = |status: &'static str| {
            metrics::counter!(names::EVENTS_CONSUMED_TOTAL,
                "consumer" => self.consumer.to_string(),
                "event_type" => event_type.to_owned(),
                "status" => status)
        };
        let made = Arc::new(TypeMetrics {
            ack: consumed("ack"),
            nack: consumed("nack"),
            dead_letter: consumed("dead_letter"),
            processing: metrics::histogram!(names::EVENT_PROCESSING_DURATION_SECONDS,
                "consumer" => self.consumer.to_string(),
                "event_type" => event_type.to_owned()),
        });
        if let Ok(mut m) = self.by_type.write() {
            m.insert(event_type.to_owned(), made.clone());
        }
        made
    }

    /// Counts `n` settlements of `status` (`ack`, `nack`, `dead_letter`).
    pub(crate) fn consumed(&self, event_type: &str, status: &'static str, n: u64) {
        let t = self.for_type(event_type);
        match status {
            "ack" => t.ack.increment(n),
            "nack" => t.nack.increment(n),
            "dead_letter" => t.dead_letter.increment(n),
            _ => {}
        }
    }

    /// Records one handler run.
    pub(crate) fn processing(&self, event_type: &str, seconds: f64) {
        self.for_type(event_type).processing.record(seconds);
    }

    /// Sets the queue depth gauge.
    pub(crate) fn queue_depth(&self, depth: u64) {
        self.depth.set(depth as f64);
    }

    /// Records the lag of an event: now minus its `time`.
    pub(crate) fn lag(&self, event: &Event) {
        if let Some(t) = event.time() {
            let lag = (chrono::Utc::now() - *t).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.lag.record(lag.max(0.0));
        }
    }

    /// Counts one dead-lettered message (the reason's category is a label, so this
    /// one is not cached; dead letters are rare).
    pub(crate) fn dead_lettered(&self, reason: &str) {
        record_dead_lettered(&self.consumer, reason);
    }
}

/// A W3C trace context (`traceparent`): trace id, parent span id and flags.
///
/// ```
/// use cloudbus_core::TraceContext;
/// let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
/// let ctx = TraceContext::parse(tp).unwrap();
/// assert_eq!(ctx.to_string(), tp);
/// let child = ctx.child();
/// assert_eq!(child.trace_id(), ctx.trace_id());
/// assert_ne!(child.span_id(), ctx.span_id());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// A new trace (random ids, sampled).
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: 1,
        }
    }
    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }
    /// Parses a version-00 `traceparent`; `None` when it is not valid.
    pub fn parse(s: &str) -> Option<Self> {
        // Fixed layout: "00-" 32 hex "-" 16 hex "-" 2 hex, lowercase (read for every
        // published and handled event, so no splitting or trimming).
        let b = s.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        fn hex(digits: &[u8]) -> Option<u128> {
            let mut v: u128 = 0;
            for d in digits {
                let n = match d {
                    b'0'..=b'9' => d - b'0',
                    b'a'..=b'f' => d - b'a' + 10,
                    _ => return None,
                };
                v = (v << 4) | u128::from(n);
            }
            Some(v)
        }
        let trace_id = hex(&b[3..35])?;
        let span_id = u64::try_from(hex(&b[36..52])?).ok()?;
        let flags = u8::try_from(hex(&b[53..55])?).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }
    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }
    /// The context of the event, if it carries a valid `traceparent`.
    pub fn from_event(event: &Event) -> Option<Self> {
        event.traceparent().and_then(Self::parse)
    }
    /// The context of the task currently handling an event, if any.
    pub fn current() -> Option<Self> {
        CURRENT_TRACE.try_with(|c| *c).ok()
    }
    /// Runs `fut` with `self` as the current context.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT_TRACE.scope(self, fut).await
    }
}

impl TraceContext {
    /// The `traceparent` text, built without the formatting machinery (it is made for
    /// every published event).
    pub fn to_traceparent(&self) -> String {
        fn hex(out: &mut String, value: u128, digits: u32) {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for i in (0..digits).rev() {
                out.push(HEX[((value >> (i * 4)) & 0xf) as usize] as char);
            }
        }
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        hex(&mut s, self.trace_id, 32);
        s.push('-');
        hex(&mut s, u128::from(self.span_id), 16);
        s.push('-');
        hex(&mut s, u128::from(self.flags), 2);
        s
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

tokio::task_local! {
    static CURRENT_TRACE: TraceContext;
}

/// Gives the event a `traceparent` if it has none: a child of the current task's
/// context (an event published while handling another continues its trace), else a
/// new trace. Returns the context the event carries.
pub fn inject(event: &mut Event) -> Option<TraceContext> {
    if let Some(ctx) = TraceContext::from_event(event) {
        return Some(ctx);
    }
    Some(stamp(event))
}

/// Sets a new `traceparent` on the event: a child of the current task's context, else
/// a new trace.
pub(crate) fn stamp(event: &mut Event) -> TraceContext {
    let ctx = TraceContext::current()
        .map(|c| c.child())
        .unwrap_or_else(TraceContext::new_root);
    event.set_extension(EXT_TRACEPARENT, ctx.to_traceparent());
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventBuilder;

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
        let got = parent.scope(async { inject(&mut e) }).await.unwrap();
        assert_eq!(got.trace_id(), parent.trace_id());
        assert_ne!(got.span_id(), parent.span_id());
        assert_eq!(TraceContext::from_event(&e), Some(got));
        // An event that has a context keeps it.
        let kept = parent.scope(async { inject(&mut e) }).await.unwrap();
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
