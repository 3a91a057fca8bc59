//! Plain async functions as routed handlers: `async fn(OrderCreated, Context) ->
//! Result<(), E>` ([`TypedHandler`]: the event decoded into its type first, then any
//! [`FromContext`] extractors) and `async fn(RawEvent, Context) -> Result<(), E>`
//! ([`ContextHandler`]: extractors only, for routes by type name or prefix), with any
//! error `E: Into<HandlerError>`. [`TypedRoute`] and [`ContextRoute`] make them
//! `tower::Service`s.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::Poll;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::extract::{FromContext, Requirement};
use crate::typed::{CloudEvent, DecodeExt};

/// The future of one handling.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// An async function of a typed event `T` and extractors `Args`.
pub trait TypedHandler<T, Args>: Clone + Send + Sync + 'static {
    /// Runs the handler on `event`, taking its other arguments from `ctx`.
    fn call(&self, event: T, ctx: Context) -> HandlerFuture;

    /// What its extractors need from the router ([`FromContext::requirements`]),
    /// each with the extractor's type name (`std::any::type_name`): what the router
    /// records when the route is added and [`Router::check`](crate::Router::check)
    /// verifies. Default: nothing.
    fn requirements() -> Vec<(&'static str, Requirement)> {
        Vec::new()
    }
}

/// An async function of extractors only (the event itself through
/// [`RawEvent`](crate::router::RawEvent) or [`Context`]).
pub trait ContextHandler<Args>: Clone + Send + Sync + 'static {
    /// Runs the handler, taking its arguments from `ctx`.
    fn call(&self, ctx: Context) -> HandlerFuture;

    /// What its extractors need from the router, as
    /// [`TypedHandler::requirements`]. Default: nothing.
    fn requirements() -> Vec<(&'static str, Requirement)> {
        Vec::new()
    }
}

fn failed(e: HandlerError) -> HandlerFuture {
    Box::pin(std::future::ready(Err(e)))
}

macro_rules! handler_impls {
    ($($arg:ident),*) => {
        impl<F, Fut, E, T, $($arg,)*> TypedHandler<T, ($($arg,)*)> for F
        where
            F: Fn(T, $($arg,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<(), E>> + Send + 'static,
            E: Into<HandlerError>,
            $($arg: FromContext + Send + 'static,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn call(&self, event: T, ctx: Context) -> HandlerFuture {
                $(
                    let $arg = match $arg::from_context(&ctx) {
                        Ok(value) => value,
                        Err(e) => return failed(e),
                    };
                )*
                let running = (self)(event, $($arg,)*);
                Box::pin(async move { running.await.map_err(Into::into) })
            }

            fn requirements() -> Vec<(&'static str, Requirement)> {
                #[allow(unused_mut)]
                let mut needs = Vec::new();
                $(
                    for need in <$arg as FromContext>::requirements() {
                        needs.push((std::any::type_name::<$arg>(), need));
                    }
                )*
                needs
            }
        }
    };
}

handler_impls!();
handler_impls!(A1);
handler_impls!(A1, A2);
handler_impls!(A1, A2, A3);
handler_impls!(A1, A2, A3, A4);

macro_rules! context_handler_impls {
    ($($arg:ident),+) => {
        impl<F, Fut, E, $($arg,)+> ContextHandler<($($arg,)+)> for F
        where
            F: Fn($($arg,)+) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<(), E>> + Send + 'static,
            E: Into<HandlerError>,
            $($arg: FromContext + Send + 'static,)+
        {
            #[allow(non_snake_case)]
            fn call(&self, ctx: Context) -> HandlerFuture {
                $(
                    let $arg = match $arg::from_context(&ctx) {
                        Ok(value) => value,
                        Err(e) => return failed(e),
                    };
                )+
                let running = (self)($($arg,)+);
                Box::pin(async move { running.await.map_err(Into::into) })
            }

            fn requirements() -> Vec<(&'static str, Requirement)> {
                let mut needs = Vec::new();
                $(
                    for need in <$arg as FromContext>::requirements() {
                        needs.push((std::any::type_name::<$arg>(), need));
                    }
                )+
                needs
            }
        }
    };
}

context_handler_impls!(A1);
context_handler_impls!(A1, A2);
context_handler_impls!(A1, A2, A3);
context_handler_impls!(A1, A2, A3, A4);

/// A [`TypedHandler`] as a `tower::Service`: decodes the event into `T` (an event that
/// does not decode is rejected with the reason) and runs the handler.
pub struct TypedRoute<H, T, Args> {
    handler: H,
    _types: PhantomData<fn() -> (T, Args)>,
}

impl<H: Clone, T, Args> Clone for TypedRoute<H, T, Args> {
    fn clone(&self) -> Self {
        TypedRoute {
            handler: self.handler.clone(),
            _types: PhantomData,
        }
    }
}

impl<H, T, Args> TypedRoute<H, T, Args>
where
    H: TypedHandler<T, Args>,
    T: CloudEvent,
{
    /// The service of `handler`.
    pub fn new(handler: H) -> Self {
        TypedRoute {
            handler,
            _types: PhantomData,
        }
    }
}

impl<H, T, Args> TypedRoute<H, T, Args>
where
    H: TypedHandler<T, Args>,
    T: CloudEvent,
{
    /// Handles one event (what `call` does, without needing `&mut`).
    pub fn handle(&self, ctx: Context) -> HandlerFuture {
        match ctx.event().decode::<T>() {
            Ok(event) => self.handler.call(event, ctx),
            Err(e) => failed(e.into()),
        }
    }
}

impl<H, T, Args> tower::Service<Context> for TypedRoute<H, T, Args>
where
    H: TypedHandler<T, Args>,
    T: CloudEvent,
{
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, ctx: Context) -> HandlerFuture {
        self.handle(ctx)
    }
}

/// A [`ContextHandler`] as a `tower::Service`.
pub struct ContextRoute<H, Args> {
    handler: H,
    _types: PhantomData<fn() -> Args>,
}

impl<H: Clone, Args> Clone for ContextRoute<H, Args> {
    fn clone(&self) -> Self {
        ContextRoute {
            handler: self.handler.clone(),
            _types: PhantomData,
        }
    }
}

impl<H: ContextHandler<Args>, Args> ContextRoute<H, Args> {
    /// The service of `handler`.
    pub fn new(handler: H) -> Self {
        ContextRoute {
            handler,
            _types: PhantomData,
        }
    }
}

impl<H: ContextHandler<Args>, Args> ContextRoute<H, Args> {
    /// Handles one event (what `call` does, without needing `&mut`).
    pub fn handle(&self, ctx: Context) -> HandlerFuture {
        self.handler.call(ctx)
    }
}

impl<H: ContextHandler<Args>, Args> tower::Service<Context> for ContextRoute<H, Args> {
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, ctx: Context) -> HandlerFuture {
        self.handler.call(ctx)
    }
}
