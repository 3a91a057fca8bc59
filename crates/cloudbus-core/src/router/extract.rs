//! Extractors in the axum style: what a routed handler asks for after the event
//! ([`Context`], [`State`], [`RawEvent`]), each taken from the [`Context`] by
//! [`FromContext`]. A type of the application's own implements it the same way.

use std::sync::Arc;

use crate::event::Event;
use crate::handler::HandlerError;
use crate::router::context::Context;

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
pub trait FromContext: Sized {
    /// Takes the value; an error is the handling's outcome (the handler is not run).
    fn from_context(ctx: &Context) -> Result<Self, HandlerError>;
}

impl FromContext for Context {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        Ok(ctx.clone())
    }
}

/// The router's shared state of type `T` (added with [`Router::state`](crate::Router::state)).
#[derive(Debug, Clone)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromContext for State<T> {
    /// Fails with a retry (a deployment mistake, not the event's fault) when the router
    /// has no state of that type.
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        ctx.state::<T>().cloned().map(State).ok_or_else(|| {
            HandlerError::retry(format!(
                "the router has no state of type {}; add it with Router::state",
                std::any::type_name::<T>()
            ))
        })
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
