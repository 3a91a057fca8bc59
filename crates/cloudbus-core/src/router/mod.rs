//! Typed handlers by event type, in the axum style: [`Router`] dispatches each event
//! to the route of its type (exact or prefix) or to the [`UnknownTypes`] policy,
//! upcasting older versions; handlers are plain async functions of the typed event
//! and extractors ([`Context`], [`State`], [`Sender`], [`RawEvent`], or an
//! application's own [`FromContext`]); routes and the router are `tower::Service`s,
//! so any tower layer applies, and [`layers`] has the ones event consumers need.
//! What the extractors need from the router ([`Requirement`]s: a state, the
//! publisher) is checked when a worker starts ([`Router::check`]), not per event.

mod context;
mod dispatch;
mod extract;
mod handler_fn;
pub mod layers;

pub use context::{Context, Extensions};
pub use dispatch::{RouteService, Router, UnknownTypes};
pub use extract::{FromContext, RawEvent, Requirement, Sender, State};
pub use handler_fn::{ContextHandler, ContextRoute, HandlerFuture, TypedHandler, TypedRoute};
