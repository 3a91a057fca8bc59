//! The spans of publishing and consuming, named and attributed after the
//! OpenTelemetry messaging semantic conventions (`create`, `send`, `receive`,
//! `process` and `settle` operations; `messaging.system`,
//! `messaging.destination.name`, ...), for any `tracing` subscriber.
//!
//! The event carries its creation context in the CloudEvents distributed tracing
//! extension (`traceparent`, `tracestate`). Without the `otel` feature that is the
//! hand-written [`TraceContext`]; with it, the W3C propagator injects the context of
//! the `create` span and the consumer's `process` span becomes its child, so a
//! tracing backend sees one trace across the hop (see the `otel` module).

use std::sync::Arc;

use tracing::Span;

#[cfg(feature = "otel")]
use cloudbus_driver::event::EventExt;
use cloudbus_driver::event::{AttributesReader, Event};
use cloudbus_driver::trace_context::TraceContext;

/// What the spans of one publisher or consumer say about where events go: the
/// messaging system (from the provider's URL scheme), the topic and the subscription.
///
/// ```
/// use cloudbus_core::spans::Destination;
/// let dest = Destination::new("pubsub", "orders").subscription("billing");
/// assert_eq!(dest.system(), "gcp_pubsub");
/// assert_eq!(dest.topic(), "orders");
/// assert_eq!(dest.subscription_name(), Some("billing"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    system: &'static str,
    topic: Arc<str>,
    subscription: Option<Arc<str>>,
}

impl Destination {
    /// `topic` of the provider opened with URL scheme `scheme`.
    pub fn new(scheme: &str, topic: &str) -> Self {
        Destination {
            system: messaging_system(scheme),
            topic: topic.into(),
            subscription: None,
        }
    }
    /// The same topic, read through subscription `name`.
    pub fn subscription(mut self, name: &str) -> Self {
        self.subscription = Some(name.into());
        self
    }
    /// The `messaging.system` value.
    pub fn system(&self) -> &'static str {
        if self.system.is_empty() {
            "cloudbus"
        } else {
            self.system
        }
    }
    /// The topic (`messaging.destination.name`).
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The subscription (`messaging.destination.subscription.name`), if any.
    pub fn subscription_name(&self) -> Option<&str> {
        self.subscription.as_deref()
    }
    /// What consumer spans are named after: the subscription, else the topic.
    fn consumed_from(&self) -> &str {
        self.subscription_name().unwrap_or(&self.topic)
    }
}

/// The `messaging.system` of a provider's URL scheme: the semantic conventions'
/// well-known value where there is one (`aws_sqs`, `gcp_pubsub`, `servicebus`,
/// `eventgrid`, `kafka`, `eventhubs`), else `aws_` or `cloudbus_` and the scheme.
///
/// ```
/// use cloudbus_core::spans::messaging_system;
/// assert_eq!(messaging_system("sqs"), "aws_sqs");
/// assert_eq!(messaging_system("kinesis"), "aws_kinesis");
/// assert_eq!(messaging_system("kafka"), "kafka");
/// assert_eq!(messaging_system("mem"), "cloudbus_memory");
/// ```
pub fn messaging_system(scheme: &str) -> &'static str {
    match scheme {
        "sqs" => "aws_sqs",
        "sns" => "aws_sns",
        "eventbridge" => "aws_eventbridge",
        "kinesis" => "aws_kinesis",
        "pubsub" => "gcp_pubsub",
        "servicebus" => "servicebus",
        "eventgrid" => "eventgrid",
        "kafka" => "kafka",
        "eventhubs" => "eventhubs",
        "mem" | "memory" => "cloudbus_memory",
        _ => "cloudbus",
    }
}

/// The `send` span of one provider call carrying `count` events (kind client: each
/// event has its `create` span, to which the send is linked).
pub(crate) fn send(dest: &Destination, count: usize) -> Span {
    tracing::debug_span!(
        "cloudbus.publish",
        otel.name = %format_args!("send {}", dest.topic()),
        otel.kind = "client",
        messaging.system = dest.system(),
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %dest.topic(),
        messaging.batch.message_count = count,
    )
}

/// The `receive` span of one receive call asking for up to `max` events (kind
/// client); the count received is recorded into `messaging.batch.message_count`.
pub(crate) fn receive(dest: &Destination, consumer: &str, max: usize) -> Span {
    tracing::debug_span!(
        "cloudbus.receive",
        otel.name = %format_args!("receive {}", dest.consumed_from()),
        otel.kind = "client",
        messaging.system = dest.system(),
        messaging.operation.type = "receive",
        messaging.operation.name = "receive",
        messaging.destination.name = %dest.topic(),
        messaging.destination.subscription.name = dest.subscription_name(),
        messaging.consumer.group.name = consumer,
        messaging.batch.message_count = tracing::field::Empty,
        max,
    )
}

/// The `process` span of one handling (kind consumer), and the trace context the
/// handler runs in: a child of the event's `traceparent`, or a new trace.
///
/// `partition` and `offset` say where the message was read from, when the provider
/// reads partitioned logs (Kafka, streams): they become
/// `messaging.destination.partition.id` (the generic attribute, a string) and
/// `messaging.kafka.offset` (an int), and are left out when `None`. The offset has
/// no generic attribute; Kafka's is the only one the conventions define, and only
/// a Kafka driver reports an offset with a delivery (see
/// <https://opentelemetry.io/docs/specs/semconv/messaging/kafka/> and
/// <https://opentelemetry.io/docs/specs/semconv/registry/attributes/messaging/>;
/// `opentelemetry-semantic-conventions` 0.27 spells them `MESSAGING_KAFKA_OFFSET`
/// and `MESSAGING_DESTINATION_PARTITION_ID`, which replaced the older
/// `messaging.kafka.message.offset` and `messaging.kafka.destination.partition`).
pub(crate) fn process(
    dest: &Destination,
    consumer: &str,
    event: &Event,
    attempt: u32,
    partition: Option<&str>,
    offset: Option<i64>,
) -> (Span, TraceContext) {
    let span = tracing::info_span!(
        "cloudbus.handle",
        otel.name = %format_args!("process {}", dest.consumed_from()),
        otel.kind = "consumer",
        messaging.system = dest.system(),
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %dest.topic(),
        messaging.destination.subscription.name = dest.subscription_name(),
        messaging.consumer.group.name = consumer,
        messaging.message.id = %event.id(),
        messaging.destination.partition.id = partition,
        messaging.kafka.offset = offset,
        cloudevents.event_type = %event.ty(),
        // The names cloudbus's logs have always used.
        consumer,
        event_type = %event.ty(),
        event_id = %event.id(),
        attempt,
        trace_id = tracing::field::Empty,
    );
    let trace = continue_trace(&span, event);
    if !span.is_disabled() {
        span.record("trace_id", tracing::field::display(trace.trace_id()));
    }
    (span, trace)
}

/// The `settle` span of settling `count` deliveries with `operation` (`ack`, `nack`,
/// `deadletter`, `extend`; kind client).
pub(crate) fn settle(dest: &Destination, consumer: &str, operation: &str, count: usize) -> Span {
    tracing::debug_span!(
        "cloudbus.settle",
        otel.name = %format_args!("{operation} {}", dest.consumed_from()),
        otel.kind = "client",
        messaging.system = dest.system(),
        messaging.operation.type = "settle",
        messaging.operation.name = operation,
        messaging.destination.name = %dest.topic(),
        messaging.destination.subscription.name = dest.subscription_name(),
        messaging.consumer.group.name = consumer,
        messaging.batch.message_count = count,
    )
}

/// The semantic conventions' `messaging.operation.name` of a settlement status.
pub(crate) fn settle_operation(status: &str) -> &'static str {
    match status {
        "ack" => "ack",
        "nack" => "nack",
        "dead_letter" => "deadletter",
        "extend" => "extend",
        _ => "settle",
    }
}

/// Gives `event` the context of its `create` span, opened by the publisher of
/// `dest` (for an event that came without a valid `traceparent`).
pub(crate) fn stamp_created(event: &mut Event, dest: &Destination) {
    let destination = (!dest.topic.is_empty()).then(|| (dest.system(), dest.topic()));
    cloudbus_driver::event::stamp_created(event, destination);
}

/// Links `span` to the creation context each event carries (a send or receive of
/// many events); nothing without the `otel` feature.
pub(crate) fn link_events<'a>(span: &Span, events: impl IntoIterator<Item = &'a Event>) {
    #[cfg(feature = "otel")]
    if !span.is_disabled() {
        for event in events {
            cloudbus_driver::otel::link(span, event.traceparent(), event.tracestate());
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, events.into_iter());
}

/// Makes `span` continue the event's trace and returns the context a handler runs
/// in: with OpenTelemetry behind the span, the span's own context (a child of the
/// event's); otherwise a child of the event's `traceparent`, or a new trace.
fn continue_trace(span: &Span, event: &Event) -> TraceContext {
    #[cfg(feature = "otel")]
    if let Some(ctx) =
        cloudbus_driver::otel::continue_trace(span, event.traceparent(), event.tracestate())
    {
        return ctx;
    }
    let _ = span;
    TraceContext::from_event(event)
        .map(|c| c.child())
        .unwrap_or_else(TraceContext::new_root)
}
