//! Handlers and the one way they are run: the [`Handler`] trait (async closures
//! included), what a handler is told ([`HandlerContext`]) and answers
//! ([`HandlerError`]), and [`HandlerRunner`], which every consumer of events (the
//! worker, the stream consumer, an Event Grid webhook) runs them through: trace
//! continued, span, panic caught, time and outcome counted.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use tracing::Instrument;

use crate::consumer::Delivery;
use crate::spans::Destination;
use cloudbus_driver::error::Error;
use cloudbus_driver::event::{AttributesReader, Event};
use cloudbus_driver::trace_context::TraceContext;

/// What a handler knows about the delivery it handles.
#[derive(Clone, Debug)]
pub struct HandlerContext {
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// The consumer's name.
    pub consumer: Arc<str>,
    /// The trace context of this handling (a child of the event's `traceparent`).
    pub trace: TraceContext,
    /// The delivery being handled, when it came from a [`Consumer`](crate::Consumer)
    /// (a stream record or a webhook call has none).
    delivery: Option<Arc<Delivery>>,
    /// The partition the message was read from, if the provider has partitions.
    partition: Option<Arc<str>>,
    /// Its offset in that partition, if the provider numbers messages.
    offset: Option<i64>,
}

impl HandlerContext {
    /// A context for handling outside a consumer (tests, bridges): attempt
    /// `attempt`, a new trace, no delivery.
    ///
    /// ```
    /// let ctx = cloudbus_core::HandlerContext::new(1, "test");
    /// assert_eq!(ctx.attempt, 1);
    /// assert!(ctx.ordering_key().is_none());
    /// ```
    pub fn new(attempt: u32, consumer: impl Into<Arc<str>>) -> Self {
        HandlerContext {
            attempt,
            consumer: consumer.into(),
            trace: TraceContext::new_root(),
            delivery: None,
            partition: None,
            offset: None,
        }
    }

    /// The delivery's ordering key (as the provider delivered it).
    pub fn ordering_key(&self) -> Option<&str> {
        self.delivery.as_deref().and_then(Delivery::ordering_key)
    }

    /// The delivery being handled, if any.
    pub fn delivery(&self) -> Option<&Arc<Delivery>> {
        self.delivery.as_ref()
    }

    /// The partition the message was read from, where the provider has partitions
    /// (a Kafka delivery, a stream record); `None` elsewhere.
    ///
    /// ```
    /// let ctx = cloudbus_core::HandlerContext::new(1, "test");
    /// assert!(ctx.partition().is_none() && ctx.offset().is_none());
    /// ```
    pub fn partition(&self) -> Option<&str> {
        self.partition.as_deref()
    }

    /// The message's offset within [`partition`](Self::partition), where the
    /// provider numbers messages (Kafka); `None` elsewhere.
    pub fn offset(&self) -> Option<i64> {
        self.offset
    }

    /// Extends the delivery's lease by `lease` (for long handling). Fails with
    /// [`Unsupported`](cloudbus_driver::ErrorKind::Unsupported) when there is no delivery or
    /// the provider grants no leases.
    pub async fn extend(&self, lease: Duration) -> cloudbus_driver::Result<()> {
        match &self.delivery {
            Some(delivery) => delivery.extend(lease).await,
            None => Err(Error::unsupported(
                "this event was not received through a consumer; it has no lease",
            )),
        }
    }
}

/// Why a handler did not process an event.
///
/// Handlers return any error that converts into it: a cloudbus [`Error`] (by its
/// kind), an `anyhow::Error` or a `Box<dyn Error>` (retried: a failure of unknown
/// cause may pass), or a [`Permanent`] (dead-lettered now).
///
/// ```
/// use cloudbus_core::{HandlerError, Permanent};
/// fn parse(text: &str) -> Result<u32, HandlerError> {
///     let n: u32 = text.parse().map_err(Permanent)?; // bad data never gets better
///     Ok(n)
/// }
/// assert!(matches!(parse("x"), Err(HandlerError::Reject { .. })));
/// let io: Box<dyn std::error::Error + Send + Sync> = "connection reset".into();
/// assert!(matches!(HandlerError::from(io), HandlerError::Retry { .. }));
/// ```
#[derive(Debug)]
pub enum HandlerError {
    /// A transient failure: try again later (after `delay`, or the policy's backoff).
    Retry {
        /// What went wrong.
        message: String,
        /// Explicit delay before the next attempt.
        delay: Option<Duration>,
    },
    /// The event can never be processed: dead-letter it now with this reason.
    Reject {
        /// The reason kept with the dead letter.
        reason: String,
    },
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(message: impl std::fmt::Display) -> Self {
        HandlerError::Retry {
            message: message.to_string(),
            delay: None,
        }
    }
    /// A transient failure, retried after `delay`.
    pub fn retry_after(message: impl std::fmt::Display, delay: Duration) -> Self {
        HandlerError::Retry {
            message: message.to_string(),
            delay: Some(delay),
        }
    }
    /// A permanent failure: dead-letter now.
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        HandlerError::Reject {
            reason: reason.to_string(),
        }
    }
}

impl From<Error> for HandlerError {
    /// A cloudbus error met while handling (publishing a follow-up event, reading the
    /// data) is retried, unless its kind says that the same event can never succeed:
    /// [`Malformed`](cloudbus_driver::ErrorKind::Malformed),
    /// [`InvalidArgument`](cloudbus_driver::ErrorKind::InvalidArgument),
    /// [`TooLarge`](cloudbus_driver::ErrorKind::TooLarge) and
    /// [`Unsupported`](cloudbus_driver::ErrorKind::Unsupported) reject (dead-letter now). A closed
    /// publisher during shutdown, a paused ordering key, a lost lease or an internal
    /// error are not the event's fault and must not dead-letter it on the first try.
    ///
    /// ```
    /// use cloudbus_core::{Error, ErrorKind, HandlerError};
    /// let closed: HandlerError = Error::closed("publisher is closed").into();
    /// assert!(matches!(closed, HandlerError::Retry { .. }));
    /// let bad: HandlerError = Error::new(ErrorKind::Malformed, "no id").into();
    /// assert!(matches!(bad, HandlerError::Reject { .. }));
    /// ```
    fn from(e: Error) -> Self {
        use cloudbus_driver::ErrorKind as K;
        match e.kind() {
            K::Malformed | K::InvalidArgument | K::TooLarge | K::Unsupported => {
                HandlerError::reject(e)
            }
            _ => HandlerError::retry(e),
        }
    }
}

/// Marks an error as permanent: the event can never be processed, so it is
/// dead-lettered now with the error as the reason (`Err(Permanent(e))?`, or
/// `.map_err(Permanent)?`).
#[derive(Debug)]
pub struct Permanent<E>(pub E);

impl<E: std::fmt::Display> From<Permanent<E>> for HandlerError {
    fn from(p: Permanent<E>) -> Self {
        HandlerError::reject(p.0)
    }
}

impl From<anyhow::Error> for HandlerError {
    /// Retried (a [`HandlerError`] or [`Permanent`] inside keeps its meaning when it
    /// was wrapped as the error itself).
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<HandlerError>() {
            Ok(inner) => inner,
            Err(e) => HandlerError::retry(format!("{e:#}")),
        }
    }
}

impl From<Box<dyn std::error::Error + Send + Sync>> for HandlerError {
    /// Retried, except a boxed [`HandlerError`] (what tower layers such as
    /// `tower::timeout` hand back), which is unboxed as it was.
    fn from(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        match e.downcast::<HandlerError>() {
            Ok(inner) => *inner,
            Err(e) => HandlerError::retry(e),
        }
    }
}

impl From<Box<dyn std::error::Error>> for HandlerError {
    /// Retried.
    fn from(e: Box<dyn std::error::Error>) -> Self {
        HandlerError::retry(e)
    }
}

impl std::error::Error for HandlerError {}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retry { message, .. } => write!(f, "retry: {message}"),
            HandlerError::Reject { reason } => write!(f, "reject: {reason}"),
        }
    }
}

/// Handles one event. Implemented for async closures
/// `Fn(Arc<Event>, HandlerContext) -> impl Future<Output = Result<(), HandlerError>>`.
///
/// ```
/// use std::sync::Arc;
/// use cloudbus_core::{Event, HandlerContext, HandlerError, Handler};
/// fn assert_handler<H: Handler>(_: H) {}
/// assert_handler(|event: Arc<Event>, ctx: HandlerContext| async move {
///     if ctx.attempt > 3 { return Err(HandlerError::reject("gave up")) }
///     Ok::<(), HandlerError>(())
/// });
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Processes `event`; `Ok` acks it.
    async fn handle(&self, event: Arc<Event>, ctx: HandlerContext) -> Result<(), HandlerError>;

    /// Checks, before any event is received, that the handler has what it needs to
    /// run: [`Consumer::start_worker`](crate::Consumer::start_worker) and
    /// [`StreamConsumer::run`](crate::StreamConsumer::run) call it and fail with its
    /// error, so that a mistake of wiring stops the start instead of failing every
    /// event. A [`Router`](crate::Router) checks its routes ([`Router::check`](crate::Router::check));
    /// a handler that wraps another one (as [`Idempotent`](crate::Idempotent) does)
    /// must forward it to the inner handler. Default: nothing to check.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cloudbus_core::{Event, Handler, HandlerContext, HandlerError};
    /// /// Counts the events it hands on to `inner`.
    /// struct Counted<H>(H);
    /// #[async_trait::async_trait]
    /// impl<H: Handler> Handler for Counted<H> {
    ///     async fn handle(&self, event: Arc<Event>, ctx: HandlerContext) -> Result<(), HandlerError> {
    ///         self.0.handle(event, ctx).await
    ///     }
    ///     fn check_wiring(&self) -> cloudbus_core::Result<()> {
    ///         self.0.check_wiring()
    ///     }
    /// }
    /// ```
    fn check_wiring(&self) -> cloudbus_driver::Result<()> {
        Ok(())
    }
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Arc<Event>, HandlerContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, event: Arc<Event>, ctx: HandlerContext) -> Result<(), HandlerError> {
        (self)(event, ctx).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, event: Arc<Event>, ctx: HandlerContext) -> Result<(), HandlerError> {
        (**self).handle(event, ctx).await
    }

    fn check_wiring(&self) -> cloudbus_driver::Result<()> {
        (**self).check_wiring()
    }
}

/// Runs a handler the way every cloudbus consumer does, for consumers that receive
/// events by other means than a [`Consumer`](crate::Consumer) (a stream reader, an Event Grid webhook):
/// the event's trace is continued in a `cloudbus.handle` span, a panic becomes a
/// retryable [`HandlerError`], and the processing time and outcome are counted under
/// the consumer's name.
///
/// ```
/// # async fn demo() {
/// use std::sync::Arc;
/// use cloudbus_core::{EventBuilder, HandlerContext, HandlerError};
/// use cloudbus_core::worker::HandlerRunner;
/// let handler = |_e: Arc<cloudbus_core::Event>, _c: HandlerContext| async {
///     Ok::<(), HandlerError>(())
/// };
/// let runner = HandlerRunner::new("webhook");
/// let event = Arc::new(EventBuilder::new("com.example.ping", "/demo").build().unwrap());
/// assert!(runner.run(&handler, event, 1).await.is_ok());
/// # }
/// ```
pub struct HandlerRunner {
    name: Arc<str>,
    metrics: Arc<crate::telemetry::ConsumerMetrics>,
    destination: Destination,
}

impl HandlerRunner {
    /// A runner for the consumer called `name` (the metrics label).
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        HandlerRunner {
            metrics: Arc::new(crate::telemetry::ConsumerMetrics::new(name.clone())),
            destination: Destination::default().subscription(&name),
            name,
        }
    }

    /// A runner that counts into a consumer's own metrics (the worker's), so that
    /// one consumer keeps one set of metric handles, and names its destination.
    pub(crate) fn for_consumer(consumer: &crate::consumer::ConsumerInner) -> Self {
        HandlerRunner {
            name: consumer.name.clone(),
            metrics: consumer.metrics.clone(),
            destination: consumer.destination.clone(),
        }
    }

    /// The consumer's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Handles `event` with `handler` once, as delivery `attempt`.
    pub async fn run<H: Handler + ?Sized>(
        &self,
        handler: &H,
        event: Arc<Event>,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        self.run_at(handler, event, attempt, None, None).await
    }

    /// [`run`](Self::run) for a message read at `offset` of `partition` of a
    /// partitioned log (a stream record): the `cloudbus.handle` span reports them
    /// (`messaging.destination.partition.id`, `messaging.kafka.offset`) and the
    /// handler sees them in its [`HandlerContext`]. `None` leaves either out.
    ///
    /// ```
    /// # async fn demo() {
    /// use std::sync::Arc;
    /// use cloudbus_core::{EventBuilder, HandlerContext, HandlerError};
    /// use cloudbus_core::worker::HandlerRunner;
    /// let handler = |_e: Arc<cloudbus_core::Event>, ctx: HandlerContext| async move {
    ///     assert_eq!((ctx.partition(), ctx.offset()), (Some("3"), Some(42)));
    ///     Ok::<(), HandlerError>(())
    /// };
    /// let runner = HandlerRunner::new("orders-stream");
    /// let event = Arc::new(EventBuilder::new("com.example.ping", "/demo").build().unwrap());
    /// assert!(runner.run_at(&handler, event, 1, Some("3"), Some(42)).await.is_ok());
    /// # }
    /// ```
    pub async fn run_at<H: Handler + ?Sized>(
        &self,
        handler: &H,
        event: Arc<Event>,
        attempt: u32,
        partition: Option<&str>,
        offset: Option<i64>,
    ) -> Result<(), HandlerError> {
        let started = Instant::now();
        let (_span, handling) =
            self.handle(handler, event.clone(), attempt, None, partition, offset);
        let ran = handling.await;
        self.processed(&event, started, &ran);
        let outcome = ran.unwrap_or_else(|_| Err(HandlerError::retry("handler panicked")));
        let status = match &outcome {
            Ok(()) => "ack",
            Err(HandlerError::Retry { .. }) => "nack",
            Err(HandlerError::Reject { .. }) => "dead_letter",
        };
        self.metrics.consumed(event.ty(), status, 1);
        outcome
    }

    /// One handling, for callers that settle by themselves (the worker): the event's
    /// trace continued as the current context and in a `cloudbus.handle` span (also
    /// returned, for the settlement that follows), a panic caught as `Err`.
    /// `partition` and `offset` say where the message was read from, if known.
    pub(crate) fn handle<'a, H: Handler + ?Sized>(
        &self,
        handler: &'a H,
        event: Arc<Event>,
        attempt: u32,
        delivery: Option<Arc<Delivery>>,
        partition: Option<&str>,
        offset: Option<i64>,
    ) -> (
        tracing::Span,
        impl Future<Output = std::thread::Result<Result<(), HandlerError>>> + Send + 'a,
    ) {
        let (span, trace) = crate::spans::process(
            &self.destination,
            &self.name,
            &event,
            attempt,
            partition,
            offset,
        );
        let ctx = HandlerContext {
            attempt,
            consumer: self.name.clone(),
            trace,
            delivery,
            partition: partition.map(Arc::from),
            offset,
        };
        let handling = std::panic::AssertUnwindSafe(trace.scope(handler.handle(event, ctx)))
            .catch_unwind()
            .instrument(span.clone());
        (span, handling)
    }

    /// Counts a handling of `event` begun at `started`: its time, and its failure
    /// (`Err`: it panicked).
    pub(crate) fn processed(
        &self,
        event: &Event,
        started: Instant,
        ran: &std::thread::Result<Result<(), HandlerError>>,
    ) {
        use crate::telemetry::RunOutcome;
        let outcome = match ran {
            Ok(Ok(())) => RunOutcome::Success,
            Ok(Err(HandlerError::Retry { .. })) => RunOutcome::Retry,
            Ok(Err(HandlerError::Reject { .. })) => RunOutcome::Reject,
            Err(_) => RunOutcome::Panic,
        };
        self.metrics
            .processing(event.ty(), started.elapsed().as_secs_f64(), outcome);
    }

    /// Counts a message dead-lettered for `reason` without reaching the handler (a
    /// malformed one) or after its last attempt.
    pub fn dead_lettered(&self, reason: &str) {
        self.metrics.dead_lettered(reason);
    }
}
