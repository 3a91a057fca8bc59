//! What a routed handler is given: [`Context`], the event with its delivery (attempt,
//! ordering key, lease), its trace, the router's shared state, and a way to publish
//! follow-up events caused by it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::handler::HandlerContext;
use crate::publisher::Publisher;
use crate::typed::{CloudEvent, SendEvent, event_version};
use cloudbus_driver::error::{Error, Result};
use cloudbus_driver::event::{AttributesReader, Event, EventBuilder, EventExt};
use cloudbus_driver::trace_context::TraceContext;

/// Values shared by every handler of a router, found by type (see
/// [`State`](crate::router::State)).
#[derive(Default, Clone)]
pub struct Extensions {
    values: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Extensions {
    /// Adds (or replaces) the value of type `T`.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.values.insert(TypeId::of::<T>(), Arc::new(value));
    }
    /// The value of type `T`, if one was added.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref())
    }
    /// Whether a value of the type `type_id` was added (what
    /// [`Router::check`](crate::Router::check) asks).
    pub(crate) fn contains(&self, type_id: TypeId) -> bool {
        self.values.contains_key(&type_id)
    }
}

/// What a router gives every handling: its state and its publisher of follow-ups.
#[derive(Default, Clone)]
pub(crate) struct Shared {
    pub(crate) state: Extensions,
    pub(crate) publisher: Option<Publisher>,
}

/// One event being handled, and what its handler can do with it.
///
/// ```
/// use std::sync::Arc;
/// use cloudbus_core::{Context, EventBuilder, HandlerContext};
/// let event = EventBuilder::new("com.example.ping", "/doc").partition_key("k").build().unwrap();
/// let ctx = Context::new(Arc::new(event), HandlerContext::new(2, "doc"));
/// assert_eq!(ctx.attempt(), 2);
/// assert_eq!(ctx.ordering_key(), Some("k"));
/// assert_eq!(ctx.version(), 1);
/// ```
#[derive(Clone)]
pub struct Context {
    event: Arc<Event>,
    handling: HandlerContext,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("event_id", &self.event.id())
            .field("event_type", &self.event.ty())
            .field("attempt", &self.handling.attempt)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `event` with no router state and no publisher (tests, bridges).
    pub fn new(event: Arc<Event>, handling: HandlerContext) -> Self {
        Self::with_shared(event, handling, Arc::default())
    }

    pub(crate) fn with_shared(
        event: Arc<Event>,
        handling: HandlerContext,
        shared: Arc<Shared>,
    ) -> Self {
        Context {
            event,
            handling,
            shared,
        }
    }

    /// The event (upgraded to the handler's version when the router upcast it).
    pub fn event(&self) -> &Arc<Event> {
        &self.event
    }

    /// Gives the handling a router's state and publisher (a router called as a
    /// service hands its own to its routes).
    pub(crate) fn set_shared(&mut self, shared: Arc<Shared>) {
        self.shared = shared;
    }

    /// Replaces the event (what the router does when it upcasts one).
    pub(crate) fn set_event(&mut self, event: Arc<Event>) {
        self.event = event;
    }

    /// Delivery attempt, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.handling.attempt
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.handling.consumer
    }

    /// The ordering key: the delivery's, else the event's `partitionkey`.
    pub fn ordering_key(&self) -> Option<&str> {
        self.handling
            .ordering_key()
            .or_else(|| self.event.partition_key())
    }

    /// When the event was published (its `time`).
    pub fn published_time(&self) -> Option<DateTime<Utc>> {
        self.event.time().copied()
    }

    /// The version of the event's data (see [`event_version`]).
    pub fn version(&self) -> u32 {
        event_version(&self.event)
    }

    /// The trace context of this handling (a child of the event's `traceparent`).
    pub fn trace(&self) -> &TraceContext {
        &self.handling.trace
    }

    /// The worker's context (attempt, consumer, trace, delivery).
    pub fn handler_context(&self) -> &HandlerContext {
        &self.handling
    }

    /// Extends the delivery's lease by `lease`, for long handling.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        self.handling.extend(lease).await
    }

    /// A value of the router's state (see [`Router::state`](crate::Router::state)).
    pub fn state<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.shared.state.get::<T>()
    }

    /// The router's publisher of follow-up events, if it was given one.
    pub(crate) fn publisher(&self) -> Option<&Publisher> {
        self.shared.publisher.as_ref()
    }

    /// Sends `value` through the router's publisher as a follow-up of this event:
    /// causation id = this event's id, correlation id and trace carried on.
    ///
    /// Fails when the router was given no publisher ([`Router::publisher`](crate::Router::publisher)),
    /// and that is found per event (a handler's calls cannot be seen before it runs).
    /// A handler that takes a [`Sender`](crate::router::Sender) instead has it checked
    /// once, when its worker starts.
    pub fn send<'a, T: CloudEvent>(&'a self, value: &'a T) -> Result<SendEvent<'a, T>> {
        match &self.shared.publisher {
            Some(publisher) => Ok(self.send_to(publisher, value)),
            None => Err(Error::invalid(
                "this router has no publisher for follow-up events; give it one with Router::publisher, or use Context::send_to",
            )),
        }
    }

    /// Sends `value` through `publisher` as a follow-up of this event.
    pub fn send_to<'a, T: CloudEvent>(
        &'a self,
        publisher: &'a Publisher,
        value: &'a T,
    ) -> SendEvent<'a, T> {
        publisher.send(value).caused_by(self.event.clone())
    }

    /// `builder` marked as a follow-up of this event (for events built by hand).
    pub fn follow_up(&self, builder: EventBuilder) -> EventBuilder {
        builder.caused_by(&self.event)
    }
}
