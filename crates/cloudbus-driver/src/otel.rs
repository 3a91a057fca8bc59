//! OpenTelemetry (feature `otel`): the W3C trace-context propagator between the
//! `tracing` spans of cloudbus and the `traceparent` and `tracestate` an event
//! carries (the CloudEvents distributed tracing extension), through
//! `tracing-opentelemetry`.
//!
//! The application installs `tracing_opentelemetry::layer()` with its tracer. The
//! context of each event's `create` span is then injected into the event, and the
//! consumer's `process` span is made its child, so that one trace spans the hop.
//! Where no OpenTelemetry layer records a span, cloudbus falls back to its own
//! [`TraceContext`], so events are always traced.
//!
//! ```
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("shop")));
//! let _guard = tracing::subscriber::set_default(subscriber);
//! // Events built, published and handled from here on are traced across the hop.
//! ```

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace_context::TraceContext;

/// The W3C fields an event carries: `traceparent`, and `tracestate` when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceFields {
    /// The `traceparent` value.
    pub traceparent: String,
    /// The `tracestate` value, if not empty.
    pub tracestate: Option<String>,
}

/// Reads `traceparent` and `tracestate` for the propagator.
struct Carried<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for Carried<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Collects what the propagator writes.
#[derive(Default)]
struct Written(HashMap<String, String>);

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// The span context that `traceparent` and `tracestate` carry, if valid (the W3C
/// propagator's reading).
///
/// ```
/// let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
/// let cx = cloudbus_driver::otel::extract(Some(tp), Some("vendor=1")).unwrap();
/// assert_eq!(cx.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
/// assert!(cloudbus_driver::otel::extract(Some("00-zz"), None).is_none());
/// ```
pub fn extract(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<SpanContext> {
    traceparent?;
    let cx = TraceContextPropagator::new().extract(&Carried {
        traceparent,
        tracestate,
    });
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// The W3C fields of `span`'s context, or of the current span's when `span` is not
/// recorded (filtered out); `None` when no OpenTelemetry layer records either.
pub fn inject(span: &Span) -> Option<TraceFields> {
    let recorded = |s: &Span| {
        let cx = s.context();
        (!s.is_disabled() && cx.span().span_context().is_valid()).then_some(cx)
    };
    let cx = recorded(span).or_else(|| recorded(&Span::current()))?;
    let mut written = Written::default();
    TraceContextPropagator::new().inject_context(&cx, &mut written);
    Some(TraceFields {
        traceparent: written.0.remove("traceparent")?,
        tracestate: written.0.remove("tracestate").filter(|s| !s.is_empty()),
    })
}

/// Links `span` to the context `traceparent` and `tracestate` carry.
pub fn link(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if let Some(created) = extract(traceparent, tracestate) {
        span.add_link(created);
    }
}

/// Makes the new `span` a child of the context `traceparent` and `tracestate`
/// carry, and returns the span's own context for the handler's [`TraceContext`];
/// `None` when no OpenTelemetry layer records the span.
pub fn continue_trace(
    span: &Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    if let Some(created) = extract(traceparent, tracestate) {
        let parent = opentelemetry::Context::new().with_remote_span_context(created);
        // Fails only for a span already started, which this new one is not.
        let _ = span.set_parent(parent);
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    own.is_valid().then(|| {
        TraceContext::from_parts(
            u128::from_be_bytes(own.trace_id().to_bytes()),
            u64::from_be_bytes(own.span_id().to_bytes()),
            own.trace_flags().to_u8(),
        )
    })
}
