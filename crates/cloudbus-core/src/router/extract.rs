//! Extractors in the axum style: what a routed handler asks for after the event
//! ([`Context`], [`State`], [`Sender`], [`RawEvent`]), each taken from the [`Context`]
//! by [`FromContext`]. A type of the application's own implements it the same way.
//! What an extractor needs from the router (a state, the publisher) it declares as
//! [`Requirement`]s, which [`Router::check`](crate::Router::check) verifies when a
//! worker starts.

use std::any::TypeId;
use std::sync::Arc;

use crate::handler::HandlerError;
use crate::publisher::Publisher;
use crate::router::context::Context;
use crate::typed::{CloudEvent, SendEvent};
use cloudbus_driver::event::{Event, EventBuilder};

/// Something an extractor needs from the router it runs in, declared by
/// [`FromContext::requirements`] and checked by [`Router::check`](crate::Router::check)
/// (which [`Consumer::start_worker`](crate::Consumer::start_worker) calls), so that a
/// router wired without it fails to start instead of failing every event.
///
/// ```
/// use cloudbus_core::router::{FromContext, Requirement, Sender, State};
/// #[derive(Clone)]
/// struct Db;
/// assert_eq!(State::<Db>::requirements(), [Requirement::state::<Db>()]);
/// assert_eq!(Sender::requirements(), [Requirement::Publisher]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requirement {
    /// The router's shared state of one type, added with
    /// [`Router::state`](crate::Router::state) (what [`State<T>`] takes).
    State {
        /// The state's type.
        type_id: TypeId,
        /// Its name (`std::any::type_name`), for the error.
        type_name: &'static str,
    },
    /// The router's publisher of follow-up events, given with
    /// [`Router::publisher`](crate::Router::publisher) (what [`Sender`] takes).
    Publisher,
}

impl Requirement {
    /// The router's state of type `T`.
    pub fn state<T: 'static>() -> Self {
        Requirement::State {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
        }
    }

    /// The router call that provides it, as the error names it: `.state(app::Db)`,
    /// `.publisher(..)`.
    pub(crate) fn provided_by(&self) -> String {
        match self {
            Requirement::State { type_name, .. } => format!(".state({type_name})"),
            Requirement::Publisher => ".publisher(..)".to_owned(),
        }
    }
}

/// Something a handler can ask for, taken from the [`Context`] of the handling.
///
/// ```
/// use cloudbus_core::HandlerError;
/// use cloudbus_core::router::{Context, FromContext};
/// /// The tenant of an event, from its `subject`.
/// struct Tenant(String);
/// impl FromContext for Tenant {
///     fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
///         use cloudbus_core::AttributesReader;
///         ctx.event().subject().map(|s| Tenant(s.to_owned()))
///             .ok_or_else(|| HandlerError::reject("no subject, so no tenant"))
///     }
/// }
/// ```
///
/// An extractor that reads the router's state or publisher says so in
/// [`requirements`](FromContext::requirements), so that a router without them fails
/// when its worker starts:
///
/// ```
/// use cloudbus_core::HandlerError;
/// use cloudbus_core::router::{Context, FromContext, Requirement};
/// #[derive(Clone)]
/// struct Pool;
/// /// A connection from the router's pool.
/// struct Conn;
/// impl FromContext for Conn {
///     fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
///         ctx.state::<Pool>().map(|_pool| Conn)
///             .ok_or_else(|| HandlerError::retry("no pool"))
///     }
///     fn requirements() -> Vec<Requirement> {
///         vec![Requirement::state::<Pool>()]
///     }
/// }
/// ```
pub trait FromContext: Sized {
    /// Takes the value; an error is the handling's outcome (the handler is not run).
    fn from_context(ctx: &Context) -> Result<Self, HandlerError>;

    /// What this extractor needs from the router (a state, the publisher), checked
    /// once when a worker starts ([`Router::check`](crate::Router::check)) instead of
    /// failing every event. Default: nothing.
    fn requirements() -> Vec<Requirement> {
        Vec::new()
    }
}

impl FromContext for Context {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        Ok(ctx.clone())
    }
}

/// The router's shared state of type `T` (added with [`Router::state`](crate::Router::state)).
///
/// A route that takes it on a router with no state of type `T` is an error of
/// [`Router::check`](crate::Router::check), so of
/// [`Consumer::start_worker`](crate::Consumer::start_worker).
#[derive(Debug, Clone)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromContext for State<T> {
    /// Fails with a retry (a deployment mistake, not the event's fault) when the router
    /// has no state of that type (only a router that was not checked gets here).
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        ctx.state::<T>().cloned().map(State).ok_or_else(|| {
            HandlerError::retry(format!(
                "the router has no state of type {}; add it with Router::state",
                std::any::type_name::<T>()
            ))
        })
    }

    fn requirements() -> Vec<Requirement> {
        vec![Requirement::state::<T>()]
    }
}

/// The router's publisher of follow-up events, as an extractor: what
/// [`Context::send`] does, with the publisher checked when the worker starts. A route
/// that takes a `Sender` on a router with no [`Router::publisher`](crate::Router::publisher)
/// is an error of [`Router::check`](crate::Router::check), so of
/// [`Consumer::start_worker`](crate::Consumer::start_worker), instead of a failure of
/// every event.
///
/// ```
/// use cloudbus_core::{CloudEvent, HandlerError, Router};
/// use cloudbus_core::router::Sender;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderCreated { order_id: String }
/// impl CloudEvent for OrderCreated {
///     const TYPE: &'static str = "com.example.order.created";
///     const SOURCE: &'static str = "/orders";
/// }
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct PaymentRequested { order_id: String }
/// impl CloudEvent for PaymentRequested {
///     const TYPE: &'static str = "com.example.payment.requested";
///     const SOURCE: &'static str = "/payments";
/// }
/// async fn on_created(order: OrderCreated, sender: Sender) -> Result<(), HandlerError> {
///     // Causation id, correlation id and trace carried on from the order.
///     sender.send(&PaymentRequested { order_id: order.order_id }).await?;
///     Ok(())
/// }
/// let router = Router::new().route(on_created);
/// // No `.publisher(p)`: the router cannot start.
/// let e = router.check().unwrap_err();
/// assert_eq!(e.kind(), cloudbus_core::ErrorKind::InvalidArgument);
/// assert!(e.message().contains("takes Sender"), "{e}");
/// ```
#[derive(Clone)]
pub struct Sender {
    publisher: Publisher,
    cause: Arc<Event>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use cloudbus_driver::event::AttributesReader;
        f.debug_struct("Sender")
            .field("cause", &self.cause.id())
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// Sends `value` through the router's publisher as a follow-up of the event being
    /// handled: causation id = its id, correlation id and trace carried on (what
    /// [`Context::send`] does, without its per-event failure).
    pub fn send<'a, T: CloudEvent>(&'a self, value: &'a T) -> SendEvent<'a, T> {
        self.send_to(&self.publisher, value)
    }

    /// Sends `value` through `publisher` as a follow-up of the event being handled
    /// (what [`Context::send_to`] does).
    pub fn send_to<'a, T: CloudEvent>(
        &'a self,
        publisher: &'a Publisher,
        value: &'a T,
    ) -> SendEvent<'a, T> {
        publisher.send(value).caused_by(self.cause.clone())
    }

    /// `builder` marked as a follow-up of the event being handled (for events built
    /// by hand, then published with [`publisher`](Self::publisher)).
    pub fn follow_up(&self, builder: EventBuilder) -> EventBuilder {
        builder.caused_by(&self.cause)
    }

    /// The router's publisher.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }
}

impl FromContext for Sender {
    /// Fails with a retry (a deployment mistake, not the event's fault) when the router
    /// has no publisher (only a router that was not checked gets here).
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        match ctx.publisher() {
            Some(publisher) => Ok(Sender {
                publisher: publisher.clone(),
                cause: ctx.event().clone(),
            }),
            None => Err(HandlerError::retry(
                "the router has no publisher for follow-up events; give it one with Router::publisher",
            )),
        }
    }

    fn requirements() -> Vec<Requirement> {
        vec![Requirement::Publisher]
    }
}

/// The event itself, as received (after upcasting).
#[derive(Debug, Clone)]
pub struct RawEvent(pub Arc<Event>);

impl FromContext for RawEvent {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        Ok(RawEvent(ctx.event().clone()))
    }
}
