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
//! | a `HandlerError::Retry` or a handler panic on any event | 503 | retries the batch later (handled events come again: duplicates, never losses) |
//! | a malformed or rejected event, with no sink configured | 400, with the reasons | dead-letters the batch, keeping the response as the reason |
//! | no secret | 401 | does not retry |
//! | a secret that matches none accepted (a rotation half done) | 503 | retries, so the events wait for the endpoint's new secret |
//! | body over [`MAX_BODY_BYTES`] | 413 | does not retry (Event Grid's own limit is 1 MB) |

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use cloudbus_core::codec::from_structured_value;
use cloudbus_core::worker::HandlerRunner;
use cloudbus_core::{
    AttributesReader, Error, ErrorKind, Event, Filter, Handler, HandlerError, Publisher, Result,
};
use tokio::sync::Semaphore;

use crate::Secret;

/// The largest request body read (Event Grid delivers at most 1 MB per request).
pub const MAX_BODY_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// The event type of Event Grid's subscription validation.
pub const VALIDATION_EVENT_TYPE: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

struct Inner {
    handler: Box<dyn Handler>,
    runner: HandlerRunner,
    /// The secrets accepted (more than one during a rotation).
    secrets: Vec<Secret>,
    /// Serving without a secret was asked for explicitly.
    unauthenticated: bool,
    filter: Option<Filter>,
    permits: Semaphore,
    dead_letter: Option<Publisher>,
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
            .finish()
    }
}

impl PushEndpoint {
    /// An endpoint called `name` (the consumer label of metrics and spans) running
    /// `handler`, with up to 64 handlers at once.
    pub fn new(name: impl Into<Arc<str>>, handler: impl Handler) -> Self {
        PushEndpoint {
            inner: Arc::new(Inner {
                handler: Box::new(handler),
                runner: HandlerRunner::new(name),
                secrets: Vec::new(),
                unauthenticated: false,
                filter: None,
                permits: Semaphore::new(64),
                dead_letter: None,
            }),
        }
    }

    fn with(self, change: impl FnOnce(&mut Inner)) -> Self {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                change(&mut inner);
                PushEndpoint {
                    inner: Arc::new(inner),
                }
            }
            Err(shared) => PushEndpoint { inner: shared },
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

    /// Where malformed and rejected events go, with a `deadletterreason` extension
    /// (or attribute), so that the rest of their batch can be answered 200 and nothing
    /// depends on the subscription having a dead-letter destination.
    pub fn dead_letter_to(self, sink: Publisher) -> Self {
        self.with(|i| i.dead_letter = Some(sink))
    }

    /// Handles only events that match; others are answered 200 and dropped.
    pub fn filter(self, filter: Filter) -> Self {
        self.with(|i| i.filter = Some(filter))
    }

    /// How many handlers run at once (further deliveries wait).
    pub fn concurrency(self, n: usize) -> Self {
        self.with(|i| i.permits = Semaphore::new(n.max(1)))
    }

    /// The endpoint as an axum [`Router`] answering on every path; mount it with
    /// `Router::nest("/events", endpoint.router()?)`. Refused (InvalidArgument) with
    /// neither a secret nor [`allow_unauthenticated`](Self::allow_unauthenticated).
    pub fn router(&self) -> Result<Router> {
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
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a push body is at most {MAX_BODY_BYTES} bytes"),
            );
        }
    };
    match parts.method {
        Method::OPTIONS => webhook_handshake(&parts.headers),
        Method::POST => deliver(&inner, &parts.headers, &body).await,
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "POST or OPTIONS"),
    }
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
    Vec<std::result::Result<Event, cloudbus_core::DecodeError>>,
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

async fn deliver(inner: &Inner, headers: &HeaderMap, body: &[u8]) -> Response {
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("malformed: invalid JSON: {e}");
            tracing::warn!(consumer = %inner.runner.name(), %reason, "refusing a pushed body");
            inner.runner.dead_lettered(&reason);
            let Some(sink) = &inner.dead_letter else {
                return text(StatusCode::BAD_REQUEST, reason);
            };
            let raw = cloudbus_core::RawMessage::new(body.to_vec()).with_attribute(
                cloudbus_core::event::EXT_DEAD_LETTER_REASON,
                reason.as_str(),
            );
            return match sink.publish_raw(raw).await {
                Ok(()) => StatusCode::OK.into_response(),
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    format!("{reason} (and the dead-letter sink failed: {e})"),
                ),
            };
        }
    };
    let validation = headers
        .get("aeg-event-type")
        .is_some_and(|v| v == "SubscriptionValidation");
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
    let attempt = headers
        .get("aeg-delivery-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(1, |n| n.saturating_add(1));
    let mut retry = None;
    let mut refused = Vec::new();
    for value in values {
        let event = match from_structured_value(value.clone()) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                // One malformed event must not cost the good ones of its batch.
                let reason = format!("malformed: {e}");
                tracing::warn!(consumer = %inner.runner.name(), %reason, "refusing a pushed message");
                if let Err(message) = dead_letter(inner, Refused::Raw(value), &reason).await {
                    refused.push(message);
                }
                continue;
            }
        };
        if inner.filter.as_ref().is_some_and(|f| !f.matches(&event)) {
            continue;
        }
        let Ok(_permit) = inner.permits.acquire().await else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        };
        let id = event.id().to_owned();
        match inner
            .runner
            .run(&*inner.handler, event.clone(), attempt)
            .await
        {
            Ok(()) => {}
            Err(HandlerError::Retry { message, .. }) => {
                retry.get_or_insert(format!("event {id}: {message}"));
            }
            Err(HandlerError::Reject { reason }) => {
                let reason = format!("rejected: {reason}");
                if let Err(message) = dead_letter(inner, Refused::Event(&event), &reason).await {
                    refused.push(message);
                }
            }
        }
    }
    match (retry, refused.is_empty()) {
        (Some(message), _) => text(StatusCode::SERVICE_UNAVAILABLE, message),
        (None, false) => text(StatusCode::BAD_REQUEST, refused.join("; ")),
        (None, true) => StatusCode::OK.into_response(),
    }
}

/// What a push endpoint refused: a decoded event, or JSON that is not one.
enum Refused<'a> {
    Event(&'a Event),
    Raw(serde_json::Value),
}

/// Sends a refused event to the endpoint's dead-letter sink with its reason. `Err`
/// with the text for the response when there is no sink or it failed: then Event Grid
/// must dead-letter the delivery itself (a 400 with the reason).
async fn dead_letter(
    inner: &Inner,
    refused: Refused<'_>,
    reason: &str,
) -> std::result::Result<(), String> {
    inner.runner.dead_lettered(reason);
    let Some(sink) = &inner.dead_letter else {
        return Err(reason.to_owned());
    };
    let sent = match refused {
        Refused::Event(event) => {
            let mut copy = event.clone();
            copy.set_extension(
                cloudbus_core::event::EXT_DEAD_LETTER_REASON,
                reason.to_owned(),
            );
            sink.publish(copy).await
        }
        Refused::Raw(value) => {
            sink.publish_raw(
                cloudbus_core::RawMessage::new(value.to_string())
                    .with_attribute(cloudbus_core::event::EXT_DEAD_LETTER_REASON, reason),
            )
            .await
        }
    };
    sent.map_err(|e| format!("{reason} (and the dead-letter sink failed: {e})"))
}

#[cfg(test)]
mod tests {
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
}
