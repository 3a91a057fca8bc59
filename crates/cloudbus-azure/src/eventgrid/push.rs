//! The Event Grid push consumer: an HTTP endpoint (axum) that Event Grid delivers to.
//!
//! It answers both validation handshakes: the CloudEvents webhook handshake (an
//! `OPTIONS` request with `WebHook-Request-Origin`, answered with
//! `WebHook-Allowed-Origin`) and Event Grid's `SubscriptionValidationEvent` (answered
//! with `{"validationResponse": code}`). It is secure by default: every request must
//! carry a shared secret, as `Authorization: Bearer <secret>` (an Event Grid delivery
//! attribute mapping, marked secret, keeps it out of access logs) or as `?code=<secret>`
//! in the subscription URL; several secrets can be accepted at once for a rotation.
//! Serving without a secret needs an explicit
//! [`allow_unauthenticated`](PushEndpoint::allow_unauthenticated). The body is read
//! only after the secret was checked, and at most [`MAX_BODY_BYTES`].
//!
//! It reads a single CloudEvent (`application/cloudevents+json`) or a batch, applies
//! the Filter, and runs the same [`Handler`] as every other consumer, with the delivery
//! attempt from `aeg-delivery-count`. A batch is handled event by event: one bad event
//! does not cost the others. Its status codes steer Event Grid's retry policy (Event
//! Grid retries 503, never 400, 401, 403 or 413, and without a dead-letter destination
//! it drops what it does not retry):
//!
//! | outcome | status | Event Grid then |
//! |---|---|---|
//! | every event handled, filtered out, or dead-lettered to the endpoint's own sink | 200 | done |
//! | a `HandlerError::Retry`, a handler panic, or a handler unfinished at the [`deadline`](PushEndpoint::deadline), before the last attempt | 503 | retries the batch later (handled events come again: duplicates, never losses) |
//! | the same on the last attempt ([`max_attempts`](PushEndpoint::max_attempts)), with a sink | 200, the event in the sink with `max delivery attempts (N) exceeded: <why>` | done |
//! | the dead-letter sink fails (down, refusing, closed) | 503 | retries, so the sink gets another chance |
//! | a malformed or rejected event, with no sink configured | 400, with the reasons | dead-letters the batch, keeping the response as the reason |
//! | no secret | 401 | does not retry |
//! | a secret that matches none accepted (a rotation half done) | 503 | retries, so the events wait for the endpoint's new secret |
//! | body over [`MAX_BODY_BYTES`] | 413 | does not retry (Event Grid's own limit is 1 MB) |
//! | a body that breaks off while it is read | 503 | retries |
//!
//! What can go wrong while a request is handled, and why nothing is lost:
//! - the request is dropped (Event Grid gave up waiting, the connection broke): the
//!   handler is cancelled with it (when hyper notices; otherwise its answer goes
//!   nowhere); Event Grid saw no answer and retries, so the event comes again;
//! - a handler panics: caught, a retry (503), and on the last attempt a dead letter;
//! - a handler does not finish: Event Grid waits 30 s for an answer and counts
//!   silence as a failed attempt, so on its last attempt an unanswered event would
//!   be Event Grid's to dead-letter or drop. The endpoint answers first: at the
//!   [`deadline`](PushEndpoint::deadline) (25 s after the request came) it cancels the
//!   handler and answers 503, or on the last attempt dead-letters the event to its sink;
//! - the sink is down or refuses: 503, never 400; a sink slower than Event Grid's
//!   30 s is a dropped request (above); a letter whose publish was cut short may
//!   still arrive, so the sink may hold a letter twice;
//! - a malformed body or event: to the sink (200), or 400 without one;
//! - an oversized body: 413 without reading it (Event Grid never sends one);
//! - clock skew: nothing here reads a wall clock (the deadline is monotonic, the
//!   secrets do not expire).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use cloudbus_core::worker::HandlerRunner;
use cloudbus_core::{Handler, HandlerError, Publisher};
use cloudbus_driver::codec::from_structured_value;
use cloudbus_driver::{AttributesReader, Error, ErrorKind, Event, Filter, Result};
use tokio::sync::Semaphore;

use crate::auth::Secret;

/// The largest request body read (Event Grid delivers at most 1 MB per request).
pub const MAX_BODY_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// The event type of Event Grid's subscription validation.
pub const VALIDATION_EVENT_TYPE: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

/// Event Grid's default `maxDeliveryAttempts`: the default of
/// [`PushEndpoint::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 30;

/// The default of [`PushEndpoint::deadline`]: under the 30 s Event Grid waits for an
/// answer, with room left for the dead-letter sink.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(25);

/// Cloned when a setting changes on an endpoint that has clones (see
/// `PushEndpoint::with`); the handler, its runner and the permits stay shared.
#[derive(Clone)]
struct Inner {
    handler: Arc<dyn Handler>,
    runner: Arc<HandlerRunner>,
    /// The secrets accepted (more than one during a rotation).
    secrets: Vec<Secret>,
    /// Serving without a secret was asked for explicitly.
    unauthenticated: bool,
    filter: Option<Filter>,
    permits: Arc<Semaphore>,
    dead_letter: Option<Publisher>,
    /// The delivery attempt that is the last (at least 1).
    max_attempts: u32,
    /// How long after a request came its handlers may run.
    deadline: Duration,
}

/// An HTTP endpoint Event Grid pushes to, running a [`Handler`].
///
/// ```no_run
/// # async fn run() -> cloudbus_core::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_azure::{Secret, eventgrid::push::PushEndpoint};
/// use cloudbus_core::{AttributesReader, Event, Filter, HandlerContext, HandlerError};
/// let endpoint = PushEndpoint::new("orders-webhook", |e: Arc<Event>, _c: HandlerContext| async move {
///     println!("got {}", e.id());
///     Ok::<(), HandlerError>(())
/// })
/// .secret(Secret::new("s3cret"))            // Authorization: Bearer s3cret (or ?code=s3cret)
/// .filter(Filter::prefix("type", "com.example.order."));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await
///     .map_err(|e| cloudbus_core::Error::with_source(cloudbus_core::ErrorKind::Unavailable, "bind", e))?;
/// endpoint.serve(listener, std::future::pending()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PushEndpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PushEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushEndpoint")
            .field("name", self.inner.runner.name())
            .field("secrets", &self.inner.secrets)
            .field("unauthenticated", &self.inner.unauthenticated)
            .field("filter", &self.inner.filter)
            .field("dead_letter", &self.inner.dead_letter.is_some())
            .field("max_attempts", &self.inner.max_attempts)
            .field("deadline", &self.inner.deadline)
            .finish()
    }
}

impl PushEndpoint {
    /// An endpoint called `name` (the consumer label of metrics and spans) running
    /// `handler`, with up to 64 handlers at once.
    pub fn new(name: impl Into<Arc<str>>, handler: impl Handler) -> Self {
        PushEndpoint {
            inner: Arc::new(Inner {
                handler: Arc::new(handler),
                runner: Arc::new(HandlerRunner::new(name)),
                secrets: Vec::new(),
                unauthenticated: false,
                filter: None,
                permits: Arc::new(Semaphore::new(64)),
                dead_letter: None,
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                deadline: DEFAULT_DEADLINE,
            }),
        }
    }

    /// Applies a setting. An endpoint that has clones (or a router being served) is
    /// copied rather than changed under them; the setting is never dropped.
    fn with(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        change(&mut inner);
        PushEndpoint {
            inner: Arc::new(inner),
        }
    }

    /// Accepts requests that carry `secret`, as `Authorization: Bearer <secret>` or
    /// `?code=<secret>`. Call it again to accept a second secret while a rotation is
    /// under way; [`retire_secrets`](Self::retire_secrets) starts over.
    pub fn secret(self, secret: Secret) -> Self {
        self.with(|i| i.secrets.push(secret))
    }

    /// Forgets the secrets accepted so far (the end of a rotation).
    pub fn retire_secrets(self) -> Self {
        self.with(|i| i.secrets.clear())
    }

    /// Serves without any secret: anyone who can reach the endpoint can make it run
    /// the handler. Only for endpoints behind another authentication (a gateway that
    /// checks Entra ID tokens) or for local tests.
    pub fn allow_unauthenticated(self) -> Self {
        self.with(|i| i.unauthenticated = true)
    }

    /// Where malformed and rejected events go, and those that failed their
    /// [last attempt](Self::max_attempts), with a `deadletterreason` extension (or
    /// attribute), so that the rest of their batch can be answered 200 and nothing
    /// depends on the subscription having a dead-letter destination. While the sink
    /// fails, their requests are answered 503 (Event Grid retries), never 400.
    pub fn dead_letter_to(self, sink: Publisher) -> Self {
        self.with(|i| i.dead_letter = Some(sink))
    }

    /// Handles only events that match; others are answered 200 and dropped.
    pub fn filter(self, filter: Filter) -> Self {
        self.with(|i| i.filter = Some(filter))
    }

    /// How many handlers run at once (further deliveries wait, within the
    /// [`deadline`](Self::deadline)).
    pub fn concurrency(self, n: usize) -> Self {
        self.with(|i| i.permits = Arc::new(Semaphore::new(n.max(1))))
    }

    /// The delivery attempt that is Event Grid's last (30 by default, Event Grid's
    /// default `maxDeliveryAttempts`; 0 counts as 1). On it, an event whose handler
    /// asks for a retry, panics or misses the [`deadline`](Self::deadline) is
    /// dead-lettered to the [sink](Self::dead_letter_to) with the reason
    /// `max delivery attempts (N) exceeded: <why>` and answered 200, instead of being
    /// left to Event Grid, which drops it unless the subscription has a dead-letter
    /// destination of its own. With 1, every such event is dead-lettered at once.
    /// Without a sink the last attempt is answered 503 like the others.
    ///
    /// Set it to the subscription's `maxDeliveryAttempts`, and mind its event
    /// time-to-live: Event Grid stops at whichever comes first, and its schedule (10 s,
    /// 30 s, 1 min, 5 min, 10 min, 30 min, 1 h, 3 h, 6 h, then every 12 h) makes only
    /// about 11 attempts within the default 24 h. Event Grid may also skip retries of
    /// an endpoint it sees as unhealthy, so an attempt at or past this number counts
    /// as the last.
    pub fn max_attempts(self, n: u32) -> Self {
        self.with(|i| i.max_attempts = n.max(1))
    }

    /// How long a request's handlers may run, counted from its arrival (25 s by
    /// default). Event Grid waits 30 s for an answer and counts silence as a failed
    /// attempt; answering first lets the endpoint decide: at the deadline the running
    /// handler is cancelled (as a dropped request would cancel it) and it and the
    /// batch's unhandled events are answered 503, or, on the
    /// [last attempt](Self::max_attempts), dead-lettered to the sink. Keep it under
    /// 30 s by the time the sink takes; `Duration::MAX` is no deadline.
    pub fn deadline(self, deadline: Duration) -> Self {
        self.with(|i| i.deadline = deadline)
    }

    /// The endpoint as an axum [`Router`] answering on every path; mount it with
    /// `Router::nest("/events", endpoint.router()?)`. Refused (InvalidArgument) with
    /// neither a secret nor [`allow_unauthenticated`](Self::allow_unauthenticated), and
    /// when the handler's wiring is incomplete (a cloudbus router route that takes a
    /// state or a `Sender` the router was not given, two routes for one type), as
    /// `start_worker` refuses it.
    pub fn router(&self) -> Result<Router> {
        self.inner.handler.check_wiring()?;
        if self.inner.secrets.is_empty() && !self.inner.unauthenticated {
            return Err(Error::invalid(
                "a push endpoint needs a secret (PushEndpoint::secret), or an explicit allow_unauthenticated()",
            ));
        }
        Ok(Router::new()
            .fallback(serve_request)
            .with_state(self.inner.clone()))
    }

    /// Serves the endpoint on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        axum::serve(listener, self.router()?)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::with_source(ErrorKind::Unavailable, "the push endpoint stopped", e))
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

/// What the caller's credential says.
#[derive(Debug, PartialEq, Eq)]
enum Auth {
    Accepted,
    /// No credential at all.
    Missing,
    /// A credential that matches none of the accepted secrets.
    Mismatch,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(inner: &Inner, query: Option<&str>, headers: &HeaderMap) -> Auth {
    if inner.secrets.is_empty() {
        return if inner.unauthenticated {
            Auth::Accepted
        } else {
            Auth::Missing
        };
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_owned());
    let code = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned());
    let given: Vec<String> = bearer.into_iter().chain(code).collect();
    if given.is_empty() {
        return Auth::Missing;
    }
    let matches = given.iter().any(|g| {
        inner
            .secrets
            .iter()
            .any(|s| constant_time_eq(g.as_bytes(), s.expose().as_bytes()))
    });
    if matches {
        Auth::Accepted
    } else {
        Auth::Mismatch
    }
}

async fn serve_request(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    // Event Grid's 30 s start when it sends, so the deadline counts from the arrival,
    // body upload included. A deadline too far to represent is none.
    let deadline = tokio::time::Instant::now().checked_add(inner.deadline);
    let (parts, body) = request.into_parts();
    match authorize(&inner, parts.uri.query(), &parts.headers) {
        Auth::Accepted => {}
        Auth::Missing => {
            tracing::warn!(consumer = %inner.runner.name(), "push request without a secret");
            return text(StatusCode::UNAUTHORIZED, "missing secret");
        }
        Auth::Mismatch => {
            // Possibly Event Grid with a secret the endpoint does not know yet: 503
            // makes it retry instead of dropping the events.
            tracing::warn!(consumer = %inner.runner.name(), "push request with a secret that matches none accepted");
            return text(StatusCode::SERVICE_UNAVAILABLE, "secret not accepted");
        }
    }
    // Only now is the body read.
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    match parts.method {
        Method::OPTIONS => webhook_handshake(&parts.headers),
        Method::POST => deliver(&inner, &parts.headers, &body, deadline).await,
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "POST or OPTIONS"),
    }
}

/// Reads a body of at most [`MAX_BODY_BYTES`]: one over it is 413 (unread beyond the
/// limit), one that breaks off is 503. (axum's `to_bytes` gives both the same error,
/// and a 413 for a cut body would tell Event Grid never to retry it.)
async fn read_body(body: axum::body::Body) -> std::result::Result<Vec<u8>, Response> {
    use futures::StreamExt as _;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a push body is at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let mut stream = body.into_data_stream();
    // A Content-Length over the limit is refused before a byte is read.
    if futures::Stream::size_hint(&stream).0 > MAX_BODY_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the body broke off while it was read: {e}"),
            )
        })?;
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The CloudEvents webhook handshake (abuse protection): allow the requesting origin.
fn webhook_handshake(headers: &HeaderMap) -> Response {
    let Some(origin) = headers.get("webhook-request-origin") else {
        return text(StatusCode::BAD_REQUEST, "no WebHook-Request-Origin");
    };
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert("webhook-allowed-origin", origin.clone());
    h.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
    h.insert("allow", HeaderValue::from_static("POST, OPTIONS"));
    response
}

/// Event Grid's own handshake: the validation code of a SubscriptionValidationEvent.
fn validation_code(body: &serde_json::Value) -> Option<&str> {
    let first = match body {
        serde_json::Value::Array(a) => a.first()?,
        other => other,
    };
    let ty = first
        .get("eventType")
        .or_else(|| first.get("type"))?
        .as_str()?;
    (ty == VALIDATION_EVENT_TYPE)
        .then(|| first.get("data")?.get("validationCode")?.as_str())
        .flatten()
}

/// Decodes a push body as the endpoint does: a JSON array of structured CloudEvents
/// (a batch) or a single one, each decoded on its own. `Err` when the body is not JSON.
///
/// ```
/// use cloudbus_azure::eventgrid::push::decode_push_body;
/// let events = decode_push_body(br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"}, {"id": 2}]"#).unwrap();
/// assert!(events[0].is_ok() && events[1].is_err());
/// assert!(decode_push_body(b"not json").is_err());
/// ```
pub fn decode_push_body(
    body: &[u8],
) -> std::result::Result<
    Vec<std::result::Result<Event, cloudbus_driver::DecodeError>>,
    serde_json::Error,
> {
    Ok(push_values(serde_json::from_slice(body)?)
        .into_iter()
        .map(from_structured_value)
        .collect())
}

/// The events of a push body: the array's items, or the one value.
fn push_values(json: serde_json::Value) -> Vec<serde_json::Value> {
    match json {
        serde_json::Value::Array(a) => a,
        single => vec![single],
    }
}

/// The delivery attempt of a request, from 1.
///
/// Event Grid's `aeg-delivery-count` header is documented only as the "number of
/// attempts made for the event" (Microsoft Learn, Event Grid message headers). It is
/// read here as the attempts made before this one, 0 on the first delivery: what the
/// project's emulator sends (tests/emulators/eventgrid), what other Event Grid
/// simulators send on a first POST, and what this endpoint has always assumed. Were
/// Event Grid to count this delivery too, this reading would see each attempt as one
/// later than it is, so the last attempt's dead-lettering would come one attempt
/// early, never too late. A missing or unreadable header is the first attempt.
fn delivery_attempt(headers: &HeaderMap) -> u32 {
    headers
        .get("aeg-delivery-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(1, |n| n.saturating_add(1))
}

/// Runs `f` until `deadline` (`None`: no deadline); `None` when it passed first.
async fn until<F: Future>(deadline: Option<tokio::time::Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, f).await.ok(),
        None => Some(f.await),
    }
}

/// What a request's events came to, and so its status.
#[derive(Default)]
struct Outcome {
    /// Why the first of the events to deliver again must come again (a retry, the
    /// deadline, a dead-letter sink that failed), and how many there are: 503.
    again: Option<String>,
    again_count: usize,
    /// Reasons of events refused with no sink of the endpoint's own: 400, for Event
    /// Grid to dead-letter.
    refused: Vec<String>,
}

impl Outcome {
    fn again(&mut self, why: String) {
        self.again.get_or_insert(why);
        self.again_count += 1;
    }

    /// Records what dead-lettering an event came to.
    fn dead_lettered(&mut self, result: std::result::Result<(), NotDeadLettered>) {
        match result {
            Ok(()) => {}
            Err(NotDeadLettered::NoSink(reason)) => self.refused.push(reason),
            Err(NotDeadLettered::SinkFailed(message)) => self.again(message),
        }
    }

    fn response(self) -> Response {
        match (self.again, self.refused.is_empty()) {
            (Some(first), _) if self.again_count > 1 => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{first} (and {} more to deliver again)",
                    self.again_count - 1
                ),
            ),
            (Some(first), _) => text(StatusCode::SERVICE_UNAVAILABLE, first),
            (None, false) => text(StatusCode::BAD_REQUEST, self.refused.join("; ")),
            (None, true) => StatusCode::OK.into_response(),
        }
    }
}

async fn deliver(
    inner: &Inner,
    headers: &HeaderMap,
    body: &[u8],
    deadline: Option<tokio::time::Instant>,
) -> Response {
    let validation = headers
        .get("aeg-event-type")
        .is_some_and(|v| v == "SubscriptionValidation");
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) if validation => {
            return text(
                StatusCode::BAD_REQUEST,
                "a validation request that is not JSON",
            );
        }
        Err(e) => {
            let reason = format!("malformed: invalid JSON: {e}");
            tracing::warn!(consumer = %inner.runner.name(), %reason, "refusing a pushed body");
            let mut outcome = Outcome::default();
            outcome.dead_lettered(dead_letter(inner, Refused::Body(body), &reason).await);
            return outcome.response();
        }
    };
    if let Some(code) = validation_code(&json) {
        let answer = serde_json::json!({ "validationResponse": code }).to_string();
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            answer,
        )
            .into_response();
    }
    if validation {
        return text(
            StatusCode::BAD_REQUEST,
            "a validation request without a code",
        );
    }
    let values = push_values(json);
    let attempt = delivery_attempt(headers);
    let max = inner.max_attempts;
    let last = attempt >= max;
    let mut outcome = Outcome::default();
    for value in values {
        let event = match from_structured_value(value.clone()) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                // One malformed event must not cost the good ones of its batch.
                let reason = format!("malformed: {e}");
                tracing::warn!(consumer = %inner.runner.name(), %reason, "refusing a pushed message");
                outcome.dead_lettered(dead_letter(inner, Refused::Raw(value), &reason).await);
                continue;
            }
        };
        if inner.filter.as_ref().is_some_and(|f| !f.matches(&event)) {
            continue;
        }
        let id = event.id().to_owned();
        let handling = async {
            let Ok(_permit) = inner.permits.acquire().await else {
                return Err(HandlerError::retry("the endpoint is shutting down"));
            };
            inner
                .runner
                .run(&*inner.handler, event.clone(), attempt)
                .await
        };
        // Past the deadline no handler starts: it would be cancelled at its first wait.
        let expired = deadline.is_some_and(|at| tokio::time::Instant::now() >= at);
        let ran = if expired {
            None
        } else {
            until(deadline, handling).await
        };
        let why = match ran {
            Some(Ok(())) => continue,
            Some(Err(HandlerError::Reject { reason })) => {
                let reason = format!("rejected: {reason}");
                outcome.dead_lettered(dead_letter(inner, Refused::Event(&event), &reason).await);
                continue;
            }
            Some(Err(HandlerError::Retry { message, .. })) => message,
            // The handler (or the wait for a permit) was cancelled, or never started:
            // the request must be answered before Event Grid stops waiting.
            None => format!(
                "not handled within the endpoint's deadline of {:?}",
                inner.deadline
            ),
        };
        if last && inner.dead_letter.is_some() {
            let reason = format!("max delivery attempts ({max}) exceeded: {why}");
            tracing::warn!(consumer = %inner.runner.name(), event = %id, %reason, "last attempt failed; dead-lettering");
            outcome.dead_lettered(dead_letter(inner, Refused::Event(&event), &reason).await);
        } else {
            // Without a sink even the last attempt is Event Grid's to dead-letter (to
            // the subscription's destination) once it is answered 503.
            outcome.again(format!("event {id}: {why}"));
        }
    }
    outcome.response()
}

/// What a push endpoint refused: a decoded event, JSON that is not one, or a body
/// that is not JSON.
enum Refused<'a> {
    Event(&'a Event),
    Raw(serde_json::Value),
    Body(&'a [u8]),
}

/// Why a refused event is not in the endpoint's dead-letter sink.
enum NotDeadLettered {
    /// No sink is configured: Event Grid must dead-letter it (400, with the reason).
    NoSink(String),
    /// The sink failed: Event Grid must deliver it again (503), never drop it.
    SinkFailed(String),
}

/// Sends a refused event to the endpoint's dead-letter sink with its reason.
async fn dead_letter(
    inner: &Inner,
    refused: Refused<'_>,
    reason: &str,
) -> std::result::Result<(), NotDeadLettered> {
    let Some(sink) = &inner.dead_letter else {
        inner.runner.dead_lettered(reason);
        return Err(NotDeadLettered::NoSink(reason.to_owned()));
    };
    let attribute = cloudbus_driver::event::EXT_DEAD_LETTER_REASON;
    let sent = match refused {
        Refused::Event(event) => {
            let mut copy = event.clone();
            copy.set_extension(attribute, reason.to_owned());
            sink.publish(copy).await
        }
        Refused::Raw(value) => {
            sink.publish_raw(
                cloudbus_driver::RawMessage::new(value.to_string())
                    .with_attribute(attribute, reason),
            )
            .await
        }
        Refused::Body(body) => {
            sink.publish_raw(
                cloudbus_driver::RawMessage::new(body.to_vec()).with_attribute(attribute, reason),
            )
            .await
        }
    };
    match sent {
        Ok(()) => {
            inner.runner.dead_lettered(reason);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(consumer = %inner.runner.name(), %reason, error = %e, "the dead-letter sink failed; asking Event Grid to deliver again");
            Err(NotDeadLettered::SinkFailed(format!(
                "{reason} (and the dead-letter sink failed: {e}; deliver again)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use axum::body::Body;
    use cloudbus_core::{HandlerContext, PublisherOptions, RetryPolicy};
    use cloudbus_driver::event::EXT_DEAD_LETTER_REASON;
    use cloudbus_driver::{
        BatchResults, Capabilities, EventBuilder, EventExt, OutgoingMessage, Payload, TopicDriver,
    };

    use super::*;

    #[test]
    fn finds_the_validation_code() {
        let v = serde_json::json!([{
            "id": "1", "eventType": VALIDATION_EVENT_TYPE,
            "data": {"validationCode": "abc"}, "subject": "", "dataVersion": "2",
            "eventTime": "2026-11-27T00:00:00Z"
        }]);
        assert_eq!(validation_code(&v), Some("abc"));
        let ce = serde_json::json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"});
        assert_eq!(validation_code(&ce), None);
    }

    // The endpoint is called as axum calls it (`serve_request`), without a socket, so
    // that these tests need no emulator and wait on answers, never on time.

    /// What a test's dead-letter sink was sent; it fails while `down`.
    #[derive(Default)]
    struct SinkState {
        down: AtomicBool,
        letters: Mutex<Vec<Payload>>,
    }

    impl SinkState {
        /// The `deadletterreason` of each letter, in arrival order.
        fn reasons(&self) -> Vec<String> {
            self.letters
                .lock()
                .unwrap()
                .iter()
                .map(|letter| match letter {
                    Payload::Event(e) => e
                        .extension_str(EXT_DEAD_LETTER_REASON)
                        .unwrap_or_default()
                        .to_owned(),
                    Payload::Raw(r) => r
                        .attributes
                        .get(EXT_DEAD_LETTER_REASON)
                        .cloned()
                        .unwrap_or_default(),
                })
                .collect()
        }
    }

    struct SinkDriver(Arc<SinkState>);

    #[async_trait]
    impl TopicDriver for SinkDriver {
        async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
            if self.0.down.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Unavailable, "the sink is down"));
            }
            let mut letters = self.0.letters.lock().unwrap();
            letters.extend(batch.iter().map(|m| m.payload.clone()));
            Ok(batch.iter().map(|_| Ok(())).collect())
        }

        fn capabilities(&self) -> Capabilities {
            let mut c = Capabilities::default();
            c.raw_messages = true;
            c.max_message_bytes = 2 * MAX_BODY_BYTES;
            c.max_batch_bytes = 2 * MAX_BODY_BYTES;
            c
        }
    }

    /// A sink publisher that does not retry (a failure is answered at once).
    fn sink() -> (Arc<SinkState>, Publisher) {
        let state = Arc::new(SinkState::default());
        let options = PublisherOptions {
            retry: RetryPolicy::none(),
            ..PublisherOptions::default()
        };
        let publisher = Publisher::with_options(Arc::new(SinkDriver(state.clone())), options);
        (state, publisher)
    }

    fn event(ty: &str) -> Event {
        EventBuilder::new(ty, "/tests/push").build().unwrap()
    }

    /// A batch body of these JSON values.
    fn batch(items: &[serde_json::Value]) -> Body {
        Body::from(serde_json::to_vec(items).unwrap())
    }

    fn json(event: &Event) -> serde_json::Value {
        serde_json::from_slice(&cloudbus_driver::codec::to_structured_json(event).unwrap()).unwrap()
    }

    /// A push of `body` at delivery count `count` (`None`: no header).
    fn push(count: Option<&str>, body: Body) -> Request {
        let mut r = axum::http::Request::builder()
            .method(Method::POST)
            .uri("/events")
            .header("content-type", "application/cloudevents-batch+json");
        if let Some(n) = count {
            r = r.header("aeg-delivery-count", n);
        }
        r.body(body).unwrap()
    }

    /// The endpoint's answer to `request`: its status and text. A test whose request
    /// would hang fails after 10 s instead.
    async fn call(endpoint: &PushEndpoint, request: Request) -> (u16, String) {
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            serve_request(State(endpoint.inner.clone()), request),
        )
        .await
        .expect("the endpoint answers");
        let status = answered.status().as_u16();
        let body = axum::body::to_bytes(answered.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Panics on `com.example.panic`, rejects `com.example.poison`, asks for a
    /// retry of anything else.
    async fn retrying(e: Arc<Event>, _c: HandlerContext) -> std::result::Result<(), HandlerError> {
        if e.ty() == "com.example.panic" {
            panic!("a handler bug");
        }
        if e.ty() == "com.example.poison" {
            return Err(HandlerError::reject("poison"));
        }
        Err(HandlerError::retry("not yet"))
    }

    /// Issue 28 item 3: a malformed or rejected event whose dead-letter sink failed
    /// was answered 400, which Event Grid never retries, so a sink outage lost it. A
    /// sink failure is 503 now, and once the sink is back the same pushes are
    /// dead-lettered and answered 200. Before the fix the first three answers were 400.
    #[tokio::test]
    async fn a_failing_dead_letter_sink_is_answered_503_never_400() {
        let (state, sink) = sink();
        let endpoint = PushEndpoint::new("sink-down", retrying)
            .allow_unauthenticated()
            .dead_letter_to(sink);
        let no_source = serde_json::json!({"specversion": "1.0", "id": "x", "type": "t"});
        let pushes = || {
            let poison = json(&event("com.example.poison"));
            [
                ("not JSON", push(Some("0"), Body::from("not json"))),
                (
                    "malformed",
                    push(Some("0"), batch(std::slice::from_ref(&no_source))),
                ),
                ("rejected", push(Some("0"), batch(&[poison]))),
            ]
        };
        state.down.store(true, Ordering::SeqCst);
        for (what, request) in pushes() {
            let (status, text) = call(&endpoint, request).await;
            assert_eq!(status, 503, "{what}: {text}");
            assert!(text.contains("dead-letter sink failed"), "{what}: {text}");
        }
        assert!(state.reasons().is_empty());
        state.down.store(false, Ordering::SeqCst);
        for (what, request) in pushes() {
            let (status, text) = call(&endpoint, request).await;
            assert_eq!(status, 200, "{what}: {text}");
        }
        let reasons = state.reasons();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].starts_with("malformed: invalid JSON"),
            "{reasons:?}"
        );
        assert!(reasons[1].contains("source"), "{reasons:?}");
        assert_eq!(reasons[2], "rejected: poison");
    }

    /// Issue 28 item 4: the delivery count was read but never compared with a
    /// maximum, so a poison event was answered 503 until Event Grid gave up and
    /// dropped it. Now, on the last attempt (`aeg-delivery-count` is 0-based: 2 is the
    /// third), a retry or a panic is dead-lettered to the sink with the reason and
    /// answered 200; earlier attempts are still 503, and so is the last one without a
    /// sink (Event Grid's to dead-letter). Before the fix the third push was 503 and
    /// the sink stayed empty.
    #[tokio::test]
    async fn the_last_attempt_dead_letters_to_the_sink_with_the_reason() {
        let (state, sink) = sink();
        let endpoint = PushEndpoint::new("last-attempt", retrying)
            .allow_unauthenticated()
            .dead_letter_to(sink)
            .max_attempts(3);
        let flaky = event("com.example.flaky");
        let panicking = event("com.example.panic");
        for count in ["0", "1"] {
            let (status, text) = call(
                &endpoint,
                push(Some(count), batch(&[json(&flaky), json(&panicking)])),
            )
            .await;
            assert_eq!(status, 503, "attempt {count}: {text}");
            assert!(text.contains("not yet"), "{text}");
        }
        assert!(
            state.reasons().is_empty(),
            "dead-lettered before the last attempt"
        );
        // The last attempt, and one past it (Event Grid may skip retries).
        for count in ["2", "7"] {
            let (status, text) = call(
                &endpoint,
                push(Some(count), batch(&[json(&flaky), json(&panicking)])),
            )
            .await;
            assert_eq!(status, 200, "attempt {count}: {text}");
        }
        let letters = state.letters.lock().unwrap().clone();
        let ids: Vec<&str> = letters
            .iter()
            .filter_map(|l| l.event().map(|e| e.id()))
            .collect();
        assert_eq!(
            ids,
            [flaky.id(), panicking.id(), flaky.id(), panicking.id()]
        );
        let reasons = state.reasons();
        assert_eq!(reasons[0], "max delivery attempts (3) exceeded: not yet");
        assert!(
            reasons[1].starts_with("max delivery attempts (3) exceeded: ")
                && reasons[1].contains("panicked"),
            "{reasons:?}"
        );
        // Without a sink of its own, the endpoint leaves the last attempt to Event Grid.
        let no_sink = PushEndpoint::new("no-sink", retrying)
            .allow_unauthenticated()
            .max_attempts(3);
        let (status, _) = call(&no_sink, push(Some("2"), batch(&[json(&flaky)]))).await;
        assert_eq!(status, 503);
    }

    /// Issue 28 item 4: a max-attempts setting of 1 makes the first failure the last
    /// attempt, and 0 means the same (there is no attempt 0); a push without
    /// `aeg-delivery-count` is a first attempt. Before the fix none of these was
    /// dead-lettered (503).
    #[tokio::test]
    async fn max_attempts_of_one_or_zero_dead_letter_the_first_failure() {
        for max in [1, 0] {
            let (state, sink) = sink();
            let endpoint = PushEndpoint::new("one-attempt", retrying)
                .allow_unauthenticated()
                .dead_letter_to(sink)
                .max_attempts(max);
            for count in [None, Some("0")] {
                let body = batch(&[json(&event("com.example.flaky"))]);
                let (status, text) = call(&endpoint, push(count, body)).await;
                assert_eq!(status, 200, "max {max}, count {count:?}: {text}");
            }
            assert_eq!(
                state.reasons(),
                ["max delivery attempts (1) exceeded: not yet"; 2],
                "max {max}"
            );
        }
    }

    /// Issue 28, the push endpoint's failure modes (a handler that does not finish):
    /// Event Grid waits 30 s for an answer, then counts the attempt as failed, so on
    /// its last attempt a hanging handler lost the event (unless the subscription had
    /// a dead-letter destination). Now the endpoint answers at its deadline: 503
    /// before the last attempt; on the last one the hanging event, and the rest of its
    /// batch that never started, are dead-lettered. Before the fix the request never
    /// answered.
    #[tokio::test]
    async fn a_handler_past_the_deadline_is_answered_before_event_grid_gives_up() {
        let (state, sink) = sink();
        let hanging = |_e: Arc<Event>, _c: HandlerContext| async {
            std::future::pending::<()>().await;
            Ok::<(), HandlerError>(())
        };
        let endpoint = PushEndpoint::new("hanging", hanging)
            .allow_unauthenticated()
            .dead_letter_to(sink)
            .max_attempts(3)
            .deadline(Duration::from_millis(200));
        let (first, second) = (event("com.example.slow"), event("com.example.slow"));
        let (status, text) = call(&endpoint, push(Some("0"), batch(&[json(&first)]))).await;
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("deadline"), "{text}");
        assert!(state.reasons().is_empty());
        let (status, text) = call(
            &endpoint,
            push(Some("2"), batch(&[json(&first), json(&second)])),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let reasons = state.reasons();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        for reason in &reasons {
            assert!(
                reason.starts_with("max delivery attempts (3) exceeded: not handled within"),
                "{reason}"
            );
        }
    }

    /// The push endpoint's failure modes (a body that breaks off): axum's `to_bytes`
    /// gave a cut body and an oversized one the same error, so a cut body was answered
    /// 413, which Event Grid never retries. Now a cut body is 503 and only an
    /// oversized one 413. Before the fix the first answer was 413.
    #[tokio::test]
    async fn a_body_that_breaks_off_is_503_and_only_an_oversized_one_413() {
        let seen = Arc::new(AtomicBool::new(false));
        let endpoint = PushEndpoint::new("bodies", {
            let seen = seen.clone();
            move |_e: Arc<Event>, _c: HandlerContext| {
                seen.store(true, Ordering::SeqCst);
                async { Ok::<(), HandlerError>(()) }
            }
        })
        .allow_unauthenticated();
        let cut = Body::from_stream(futures::stream::iter([
            Ok::<Vec<u8>, std::io::Error>(b"[{\"specversion\": \"1.0\",".to_vec()),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
        ]));
        let (status, text) = call(&endpoint, push(Some("0"), cut)).await;
        assert_eq!(status, 503, "{text}");
        let big = Body::from(vec![b' '; MAX_BODY_BYTES + 1]);
        let (status, text) = call(&endpoint, push(Some("0"), big)).await;
        assert_eq!(status, 413, "{text}");
        // The same, streamed without a length: refused once past the limit.
        let chunk = || Ok::<Vec<u8>, std::io::Error>(vec![b' '; 1024]);
        let chunks: Vec<_> = (0..MAX_BODY_BYTES / 1024 + 2).map(|_| chunk()).collect();
        let streamed = Body::from_stream(futures::stream::iter(chunks));
        let (status, text) = call(&endpoint, push(Some("0"), streamed)).await;
        assert_eq!(status, 413, "{text}");
        assert!(
            !seen.load(Ordering::SeqCst),
            "a handler ran for a refused body"
        );
    }

    /// The push endpoint's failure modes (the request dropped mid-handling, as when
    /// Event Grid stops waiting): the handler is cancelled with the request, its
    /// permit comes back, and the next push is handled. Nothing was answered, so Event
    /// Grid delivers the dropped event again.
    #[tokio::test]
    async fn a_dropped_request_cancels_its_handler_and_the_endpoint_serves_on() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let started = Arc::new(tokio::sync::Notify::new());
        let cancelled = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(Mutex::new(Vec::<String>::new()));
        let endpoint = PushEndpoint::new("dropped", {
            let (started, cancelled) = (started.clone(), cancelled.clone());
            let handled = handled.clone();
            move |e: Arc<Event>, _c: HandlerContext| {
                let (started, cancelled) = (started.clone(), cancelled.clone());
                let handled = handled.clone();
                async move {
                    if e.ty() == "com.example.stuck" {
                        let _guard = Dropped(cancelled);
                        started.notify_one();
                        std::future::pending::<()>().await;
                    }
                    handled.lock().unwrap().push(e.id().to_owned());
                    Ok::<(), HandlerError>(())
                }
            }
        })
        .allow_unauthenticated()
        .concurrency(1);
        let stuck = event("com.example.stuck");
        let request = push(Some("0"), batch(&[json(&stuck)]));
        let task = tokio::spawn({
            let endpoint = endpoint.clone();
            async move { call(&endpoint, request).await }
        });
        started.notified().await;
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
        assert!(cancelled.load(Ordering::SeqCst), "the handler kept running");
        let next = event("com.example.next");
        let (status, text) = call(&endpoint, push(Some("0"), batch(&[json(&next)]))).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(*handled.lock().unwrap(), [next.id().to_owned()]);
    }

    /// A setting applied to an endpoint that had been cloned was silently dropped
    /// (`Arc::try_unwrap` failed and the unchanged endpoint was returned): a sink, a
    /// secret, a filter or a maximum could go missing without a word. Before the fix
    /// this endpoint had no secret, no sink and 30 attempts.
    #[test]
    fn settings_on_a_cloned_endpoint_are_kept() {
        let (_state, sink) = sink();
        let endpoint = PushEndpoint::new("cloned", retrying);
        let _clone = endpoint.clone();
        let endpoint = endpoint
            .secret(Secret::new("s3cret"))
            .dead_letter_to(sink)
            .max_attempts(5);
        assert_eq!(endpoint.inner.secrets.len(), 1);
        assert!(endpoint.inner.dead_letter.is_some());
        assert_eq!(endpoint.inner.max_attempts, 5);
        assert!(endpoint.router().is_ok());
    }

    /// Issue 30: a router missing its state is refused when the endpoint is made,
    /// not answered with a retry for every delivery.
    #[test]
    fn a_router_missing_its_state_is_refused_when_the_endpoint_is_made() {
        #[derive(Clone)]
        struct Db;
        let router = cloudbus_core::Router::new().route_type(
            "com.example.order.created",
            |_: cloudbus_core::router::State<Db>| async { Ok::<(), HandlerError>(()) },
        );
        let endpoint = PushEndpoint::new("orders", router).allow_unauthenticated();
        let Err(e) = endpoint.router() else {
            panic!("an endpoint whose router lacks its state was made");
        };
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("com.example.order.created"), "{e}");
        let wired = cloudbus_core::Router::new()
            .route_type(
                "com.example.order.created",
                |_: cloudbus_core::router::State<Db>| async { Ok::<(), HandlerError>(()) },
            )
            .state(Db);
        assert!(
            PushEndpoint::new("orders", wired)
                .allow_unauthenticated()
                .router()
                .is_ok()
        );
    }
}
