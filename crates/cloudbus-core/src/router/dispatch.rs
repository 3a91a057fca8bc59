//! [`Router`]: handlers by event type (exact, by prefix), the policy for types nobody
//! handles ([`UnknownTypes`]), upcasting of older versions to the version a typed
//! handler reads, and tower layers over the routes. The router is itself a
//! [`Handler`] (give it to `Consumer::start_worker`, which checks its wiring first:
//! [`Router::check`]) and a `tower::Service`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::Poll;

use serde_json::Value;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::handler::{Handler, HandlerContext, HandlerError};
use crate::publisher::Publisher;
use crate::router::context::{Context, Shared};
use crate::router::extract::Requirement;
use crate::router::handler_fn::{
    ContextHandler, ContextRoute, HandlerFuture, TypedHandler, TypedRoute,
};
use crate::typed::{CloudEvent, event_version, split_type_version};
use cloudbus_driver::error::Error;
use cloudbus_driver::event::{AttributesReader, AttributesWriter, Event, EventExt};

/// A route's service, with any layers applied.
pub type RouteService = BoxCloneSyncService<Context, (), HandlerError>;

/// What the router does with an event of a type no route handles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownTypes {
    /// Dead-letter it with the reason "no route for event type …" (the default: an
    /// event nobody handles is a mistake to look at, not to lose).
    #[default]
    DeadLetter,
    /// Acknowledge it, with a warning in the log.
    Ack,
    /// Acknowledge it quietly (a subscription that knowingly receives more types than
    /// this service handles).
    Ignore,
}

/// Turns version `n` of an event's JSON data into version `n + 1`.
type Upcaster = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// A typed route's target: the version its handler reads and that version's schema URI.
#[derive(Clone)]
struct Target {
    version: u32,
    schema: String,
}

/// A route without layers is called directly (no service to clone per event); the
/// first layer turns it into a service.
type DirectFn = Arc<dyn Fn(Context) -> HandlerFuture + Send + Sync>;

#[derive(Clone)]
enum Call {
    Direct(DirectFn),
    Service(RouteService),
}

impl Call {
    fn into_service(self) -> RouteService {
        match self {
            Call::Direct(f) => BoxCloneSyncService::new(DirectService(f)),
            Call::Service(s) => s,
        }
    }
}

/// A direct route as a `tower::Service`, for layers.
#[derive(Clone)]
struct DirectService(DirectFn);

impl tower::Service<Context> for DirectService {
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, ctx: Context) -> HandlerFuture {
        (self.0)(ctx)
    }
}

/// What a route's handler takes that the router must provide: each extractor's
/// type name with its [`Requirement`].
type Needs = Vec<(&'static str, Requirement)>;

#[derive(Clone)]
struct Route {
    call: Call,
    target: Option<Target>,
    /// What its extractors need from the router, checked by [`Router::check`].
    needs: Needs,
    /// The router it is, when a router was routed to as a service (its wiring is
    /// checked with its own state and publisher, which it keeps).
    nested: Option<Router>,
}

impl Route {
    /// The direct route of a handler of extractors only.
    fn of_context_handler<Args: 'static, H: ContextHandler<Args>>(handler: H) -> Route {
        let needs = <H as ContextHandler<Args>>::requirements();
        let route = ContextRoute::new(handler);
        Route {
            call: Call::Direct(Arc::new(move |ctx| route.handle(ctx))),
            target: None,
            needs,
            nested: None,
        }
    }
}

/// A route's key as the errors of [`Router::check`] name it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RouteKey {
    /// A route of one event type.
    Exact(String),
    /// A route of every type with this prefix.
    Prefix(String),
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteKey::Exact(ty) => write!(f, "{ty:?}"),
            RouteKey::Prefix(prefix) => write!(f, "prefix {prefix:?}"),
        }
    }
}

/// The last segment of a type's path, its generic arguments kept as they are:
/// `cloudbus_core::router::State<app::Db>` is `State<app::Db>`.
fn short_type_name(name: &str) -> &str {
    let outer = name.find('<').unwrap_or(name.len());
    let start = name[..outer].rfind("::").map_or(0, |i| i + 2);
    &name[start..]
}

/// Handlers by event type, with tower layers. An event goes to the route of its type
/// (a `.vN` suffix of the type is ignored), else to the longest prefix route, else to
/// the [`UnknownTypes`] policy. A typed route's handler gets older versions upcast to
/// its version by the registered upcasters; a newer version is dead-lettered.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use cloudbus_core::{CloudEvent, Context, Handler, HandlerContext, HandlerError, Router};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Ping { n: u32 }
/// impl CloudEvent for Ping {
///     const TYPE: &'static str = "com.example.ping";
///     const SOURCE: &'static str = "/doc";
/// }
/// async fn on_ping(ping: Ping, ctx: Context) -> Result<(), HandlerError> {
///     assert_eq!((ping.n, ctx.attempt()), (7, 1));
///     Ok(())
/// }
/// let router = Router::new().route(on_ping);
/// let event = Arc::new(Ping { n: 7 }.to_event().unwrap());
/// assert!(router.handle(event, HandlerContext::new(1, "doc")).await.is_ok());
/// let other = Arc::new(cloudbus_core::EventBuilder::new("com.example.pong", "/doc").build().unwrap());
/// // Unknown types are dead-lettered by default.
/// assert!(matches!(router.handle(other, HandlerContext::new(1, "doc")).await, Err(HandlerError::Reject { .. })));
/// # }
/// ```
///
/// Its wiring is checked before a worker runs it ([`check`](Self::check), called by
/// `Consumer::start_worker`): a route whose extractors need a state or a publisher
/// the router was not given, or two routes for one type, fail the start instead of
/// every event.
#[derive(Clone, Default)]
pub struct Router {
    exact: Arc<HashMap<String, Route>>,
    /// Longest prefix first.
    prefixes: Arc<Vec<(String, Route)>>,
    upcasters: Arc<HashMap<(String, u32), Upcaster>>,
    unknown: UnknownTypes,
    shared: Arc<Shared>,
    /// Routes added for a type (or prefix) that had one already, one entry per extra
    /// route: the last one added replaces the earlier for an exact type, the first
    /// one added wins for a prefix, and [`check`](Self::check) reports both.
    duplicates: Arc<Vec<RouteKey>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<&String> = self.exact.keys().collect();
        types.sort();
        f.debug_struct("Router")
            .field("types", &types)
            .field(
                "prefixes",
                &self.prefixes.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("unknown", &self.unknown)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router with no routes; unknown types are dead-lettered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes events of `T::TYPE` to `handler`, an `async fn(T, extractors…) ->
    /// Result<(), E>`.
    pub fn route<T, Args, H>(self, handler: H) -> Self
    where
        T: CloudEvent,
        Args: 'static,
        H: TypedHandler<T, Args>,
    {
        let needs = <H as TypedHandler<T, Args>>::requirements();
        let route = TypedRoute::new(handler);
        self.route_typed::<T>(Call::Direct(Arc::new(move |ctx| route.handle(ctx))), needs)
    }

    /// [`route`](Self::route) with `layer` applied to this route only.
    pub fn route_with<T, Args, H, L>(self, handler: H, layer: L) -> Self
    where
        T: CloudEvent,
        Args: 'static,
        H: TypedHandler<T, Args>,
        L: tower::Layer<RouteService>,
        L::Service: tower::Service<Context, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<Context>>::Error: Into<HandlerError>,
        <L::Service as tower::Service<Context>>::Future: Send + 'static,
    {
        let needs = <H as TypedHandler<T, Args>>::requirements();
        let service = boxed(layer.layer(BoxCloneSyncService::new(TypedRoute::new(handler))));
        self.route_typed::<T>(Call::Service(service), needs)
    }

    fn route_typed<T: CloudEvent>(self, call: Call, needs: Needs) -> Self {
        let route = Route {
            call,
            target: Some(Target {
                version: T::VERSION,
                schema: T::data_schema(),
            }),
            needs,
            nested: None,
        };
        self.insert_exact(T::TYPE.to_owned(), route)
    }

    /// Adds the route of `ty`, recording a duplicate when `ty` had one.
    fn insert_exact(mut self, ty: String, route: Route) -> Self {
        let exact = Arc::make_mut(&mut self.exact);
        if exact.contains_key(&ty) {
            Arc::make_mut(&mut self.duplicates).push(RouteKey::Exact(ty.clone()));
        }
        exact.insert(ty, route);
        self
    }

    /// Routes events of type `ty` to `handler`, an `async fn(extractors…) -> Result<(), E>`
    /// (the event through [`RawEvent`](crate::router::RawEvent) or [`Context`]).
    pub fn route_type<Args: 'static, H: ContextHandler<Args>>(
        self,
        ty: impl Into<String>,
        handler: H,
    ) -> Self {
        self.insert_exact(ty.into(), Route::of_context_handler(handler))
    }

    /// Routes events of type `ty` to any service (a handler with layers of its own).
    /// Its extractors cannot be seen through the service, so [`check`](Self::check)
    /// checks nothing of it, except when the service is a `Router` itself (checked
    /// against its own state and publisher, which it keeps).
    pub fn route_service<S>(self, ty: impl Into<String>, service: S) -> Self
    where
        S: tower::Service<Context, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<HandlerError>,
        S::Future: Send + 'static,
    {
        let nested = (&service as &dyn std::any::Any)
            .downcast_ref::<Router>()
            .cloned();
        let route = Route {
            call: Call::Service(boxed(service)),
            target: None,
            needs: Needs::new(),
            nested,
        };
        self.insert_exact(ty.into(), route)
    }

    /// Routes events whose type starts with `prefix` (and no exact route) to `handler`.
    pub fn route_prefix<Args: 'static, H: ContextHandler<Args>>(
        mut self,
        prefix: impl Into<String>,
        handler: H,
    ) -> Self {
        let prefix = prefix.into();
        let prefixes = Arc::make_mut(&mut self.prefixes);
        if prefixes.iter().any(|(p, _)| *p == prefix) {
            Arc::make_mut(&mut self.duplicates).push(RouteKey::Prefix(prefix.clone()));
        }
        prefixes.push((prefix, Route::of_context_handler(handler)));
        prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        self
    }

    /// Registers an upcaster of `ty`'s data from version `from` to `from + 1`. A typed
    /// handler of version n then receives every older version that a chain of
    /// upcasters reaches, upgraded; an older version with a gap in the chain is
    /// dead-lettered with the missing step as the reason.
    pub fn upcast<F>(mut self, ty: impl Into<String>, from: u32, upcaster: F) -> Self
    where
        F: Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.upcasters).insert((ty.into(), from), Arc::new(upcaster));
        self
    }

    /// What to do with events of types no route handles (default: dead-letter).
    pub fn unknown_types(mut self, policy: UnknownTypes) -> Self {
        self.unknown = policy;
        self
    }

    /// Adds shared state, taken by handlers with [`State<T>`](crate::router::State).
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        Arc::make_mut(&mut self.shared).state.insert(value);
        self
    }

    /// The publisher of follow-up events ([`Sender`](crate::router::Sender),
    /// [`Context::send`]).
    pub fn publisher(mut self, publisher: Publisher) -> Self {
        Arc::make_mut(&mut self.shared).publisher = Some(publisher);
        self
    }

    /// Checks the router's wiring, as `Consumer::start_worker` does before the first
    /// event: every route's extractors find what they need (a [`State<T>`](crate::router::State)
    /// its [`state`](Self::state), a [`Sender`](crate::router::Sender) the
    /// [`publisher`](Self::publisher)), and no event type (or prefix) has two routes.
    /// The error, [`InvalidArgument`](cloudbus_driver::ErrorKind::InvalidArgument), names every
    /// problem with its route. A router routed to with [`route_service`](Self::route_service)
    /// is checked too; what a handler calls ([`Context::send`], [`Context::state`])
    /// cannot be seen, and is found per event.
    ///
    /// ```
    /// use cloudbus_core::{CloudEvent, ErrorKind, HandlerError, Router};
    /// use cloudbus_core::router::State;
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct OrderCreated { order_id: String }
    /// impl CloudEvent for OrderCreated {
    ///     const TYPE: &'static str = "com.example.order.created";
    ///     const SOURCE: &'static str = "/orders";
    /// }
    /// #[derive(Clone)]
    /// struct Db;
    /// async fn on_created(_: OrderCreated, State(_db): State<Db>) -> Result<(), HandlerError> {
    ///     Ok(())
    /// }
    /// let e = Router::new().route(on_created).check().unwrap_err();
    /// assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    /// assert!(e.message().contains(r#"route "com.example.order.created" takes State<"#), "{e}");
    /// assert!(e.message().contains(".state("), "{e}");
    /// // Given its state (before or after the route), it is wired.
    /// assert!(Router::new().route(on_created).state(Db).check().is_ok());
    /// ```
    pub fn check(&self) -> cloudbus_driver::Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "the router is not wired for its routes: {}",
            problems.join("; ")
        )))
    }

    /// What [`check`](Self::check) reports, one sentence each.
    fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = Vec::new();
        let mut exact: Vec<(&String, &Route)> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        let routes = exact
            .into_iter()
            .map(|(ty, route)| (RouteKey::Exact(ty.clone()), route))
            .chain(
                self.prefixes
                    .iter()
                    .map(|(prefix, route)| (RouteKey::Prefix(prefix.clone()), route)),
            );
        for (key, route) in routes {
            for (argument, need) in &route.needs {
                if self.provides(need) {
                    continue;
                }
                let problem = format!(
                    "route {key} takes {} but the router has no {}",
                    short_type_name(argument),
                    need.provided_by()
                );
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
            if let Some(nested) = &route.nested {
                for inner in nested.problems() {
                    problems.push(format!("route {key} is a router of its own, whose {inner}"));
                }
            }
        }
        let mut counted: Vec<(&RouteKey, usize)> = Vec::new();
        for key in self.duplicates.iter() {
            match counted.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => counted.push((key, 2)),
            }
        }
        for (key, n) in counted {
            let how_many = if n == 2 {
                "two".to_owned()
            } else {
                n.to_string()
            };
            let kept = match key {
                RouteKey::Exact(_) => "the last one added",
                RouteKey::Prefix(_) => "the first one added",
            };
            problems.push(format!(
                "{how_many} routes for {key} (only {kept} would run)"
            ));
        }
        problems
    }

    /// Whether the router has what `need` asks for.
    fn provides(&self, need: &Requirement) -> bool {
        match need {
            Requirement::State { type_id, .. } => self.shared.state.contains(*type_id),
            Requirement::Publisher => self.shared.publisher.is_some(),
        }
    }

    /// Applies `layer` to every route added so far (as axum does): timeouts, limits,
    /// idempotency, any tower layer whose service keeps taking a [`Context`] and
    /// fails with an error that converts into [`HandlerError`].
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<RouteService>,
        L::Service: tower::Service<Context, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<Context>>::Error: Into<HandlerError>,
        <L::Service as tower::Service<Context>>::Future: Send + 'static,
    {
        let routes = Arc::make_mut(&mut self.exact)
            .values_mut()
            .chain(Arc::make_mut(&mut self.prefixes).iter_mut().map(|(_, r)| r));
        for route in routes {
            let service = route.call.clone().into_service();
            route.call = Call::Service(boxed(layer.layer(service)));
        }
        self
    }

    /// The route of an event type.
    fn find<'s>(&'s self, ty: &str) -> Option<&'s Route> {
        if let Some(route) = self.exact.get(ty) {
            return Some(route);
        }
        let (base, version) = split_type_version(ty);
        if version.is_some()
            && let Some(route) = self.exact.get(base)
        {
            return Some(route);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| ty.starts_with(prefix.as_str()))
            .map(|(_, route)| route)
    }

    /// Routes one handling: the future of its route (a direct route's own future, so
    /// that a router without layers adds no allocation to a handling).
    fn dispatch(&self, mut ctx: Context) -> HandlerFuture {
        let Some(route) = self.find(ctx.event().ty()) else {
            return Box::pin(std::future::ready(self.unrouted(ctx.event())));
        };
        if let Some(target) = &route.target {
            match self.upgrade(ctx.event(), target) {
                Ok(None) => {}
                Ok(Some(upgraded)) => ctx.set_event(Arc::new(upgraded)),
                Err(e) => return Box::pin(std::future::ready(Err(e))),
            }
        }
        match &route.call {
            Call::Direct(f) => f(ctx),
            Call::Service(service) => Box::pin(service.clone().oneshot(ctx)),
        }
    }

    fn unrouted(&self, event: &Event) -> Result<(), HandlerError> {
        match self.unknown {
            UnknownTypes::DeadLetter => Err(HandlerError::reject(format!(
                "no route for event type {:?}",
                event.ty()
            ))),
            UnknownTypes::Ack => {
                tracing::warn!(event_type = %event.ty(), event_id = %event.id(), "no route for this event type; acknowledged");
                Ok(())
            }
            UnknownTypes::Ignore => {
                tracing::debug!(event_type = %event.ty(), event_id = %event.id(), "no route for this event type; ignored");
                Ok(())
            }
        }
    }

    /// `event` upcast to the target version, or `None` when it is that version.
    fn upgrade(&self, event: &Event, target: &Target) -> Result<Option<Event>, HandlerError> {
        let found = event_version(event);
        if found == target.version {
            return Ok(None);
        }
        let (ty, _) = split_type_version(event.ty());
        if found > target.version {
            return Err(HandlerError::reject(format!(
                "event {} is version {found} of {ty}, newer than version {} that this consumer reads",
                event.id(),
                target.version
            )));
        }
        let mut data: Value = event.data_json().map_err(HandlerError::reject)?;
        for from in found..target.version {
            let Some(upcaster) = self.upcasters.get(&(ty.to_owned(), from)) else {
                return Err(HandlerError::reject(format!(
                    "event {} is version {found} of {ty}; no upcaster from version {from} to {} is registered",
                    event.id(),
                    from + 1
                )));
            };
            data = upcaster(data).map_err(|reason| {
                HandlerError::reject(format!(
                    "upcasting event {} of {ty} from version {from}: {reason}",
                    event.id()
                ))
            })?;
        }
        let mut upgraded = event.clone();
        upgraded.set_type(ty);
        upgraded.set_data("application/json", data);
        let schema = url::Url::parse(&target.schema).map_err(|e| {
            HandlerError::reject(format!(
                "the schema URI {:?} is invalid: {e}",
                target.schema
            ))
        })?;
        upgraded.set_dataschema(Some(schema));
        tracing::debug!(event_id = %event.id(), %ty, from = found, to = target.version, "event upcast");
        Ok(Some(upgraded))
    }
}

/// Boxes a route service, its error converted into a [`HandlerError`].
fn boxed<S>(service: S) -> RouteService
where
    S: tower::Service<Context, Response = ()> + Clone + Send + Sync + 'static,
    S::Error: Into<HandlerError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(Into::into))
}

impl Handler for Router {
    // Written out (not `async fn` through async_trait), so that the route's future is
    // returned as it is instead of boxed once more.
    fn handle<'life0, 'async_trait>(
        &'life0 self,
        event: Arc<Event>,
        ctx: HandlerContext,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), HandlerError>> + Send + 'async_trait>,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.dispatch(Context::with_shared(event, ctx, self.shared.clone()))
    }

    /// [`Router::check`].
    fn check_wiring(&self) -> cloudbus_driver::Result<()> {
        self.check()
    }
}

impl tower::Service<Context> for Router {
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    /// Routes `ctx` with this router's state and publisher (a router nested in
    /// another one keeps its own).
    fn call(&mut self, mut ctx: Context) -> HandlerFuture {
        ctx.set_shared(self.shared.clone());
        self.dispatch(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{RawEvent, Sender, State};

    #[test]
    fn short_type_names_keep_their_generic_arguments() {
        assert_eq!(
            short_type_name("cloudbus_core::router::extract::State<app::Db>"),
            "State<app::Db>"
        );
        assert_eq!(
            short_type_name("cloudbus_core::router::extract::Sender"),
            "Sender"
        );
        assert_eq!(short_type_name("Tenant"), "Tenant");
    }

    #[derive(Clone)]
    struct Db;

    /// Every problem is listed once, with its route; a router given what its routes
    /// need (in any order) is wired.
    #[test]
    fn check_lists_each_problem_once_with_its_route() {
        let twice = |_: State<Db>, _: State<Db>, _: Sender| async { Ok::<(), HandlerError>(()) };
        let raw = |_: RawEvent| async { Ok::<(), HandlerError>(()) };
        let router = Router::new()
            .route_type("com.example.b", twice)
            .route_prefix("com.example.", twice)
            .route_type("com.example.a", raw)
            .route_type("com.example.a", raw)
            .route_type("com.example.a", raw);
        let e = router.check().expect_err("miswired");
        assert_eq!(e.kind(), cloudbus_driver::ErrorKind::InvalidArgument);
        let db = std::any::type_name::<Db>();
        let state =
            format!("route \"com.example.b\" takes State<{db}> but the router has no .state({db})");
        let message = e.message();
        assert_eq!(message.matches(&state).count(), 1, "{message}");
        for problem in [
            "route \"com.example.b\" takes Sender but the router has no .publisher(..)",
            "route prefix \"com.example.\" takes Sender",
            "3 routes for \"com.example.a\"",
        ] {
            assert!(message.contains(problem), "{problem:?} not in {message}");
        }
        assert!(
            Router::new()
                .state(Db)
                .route_type("com.example.b", raw)
                .route_type("com.example.c", |_: State<Db>| async {
                    Ok::<(), HandlerError>(())
                })
                .check()
                .is_ok()
        );
    }
}
