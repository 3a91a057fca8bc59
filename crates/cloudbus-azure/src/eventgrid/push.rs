//! The Event Grid push consumer: an HTTP endpoint (axum) that Event Grid delivers to.
//!
//! It answers both validation handshakes: the CloudEvents webhook handshake (an
//! `OPTIONS` request with `WebHook-Request-Origin`, answered with
//! `WebHook-Allowed-Origin`) and Event Grid's `SubscriptionValidationEvent` (answered
//! with `{"validationResponse": code}`). It authenticates the caller with a shared
//! secret in the URL (`?code=<secret>`, the way Event Grid webhooks carry one), reads a
//! single CloudEvent (`application/cloudevents+json`) or a batch, applies the Filter,
//! and runs the same [`Handler`] as every other consumer, with the delivery attempt from
//! `aeg-delivery-count`. Its status codes steer Event Grid's retry policy:
//!
//! | outcome | status | Event Grid then |
//! |---|---|---|
//! | handled, or filtered out | 200 | done |
//! | `HandlerError::Retry`, a handler panic | 503 | retries later, dead-letters after the last attempt |
//! | `HandlerError::Reject` | 400 | dead-letters at once (no retry) |
//! | not a CloudEvent (malformed) | 400, with the reason | dead-letters at once, keeping the response as the reason |
//! | wrong or missing secret | 401 | does not retry |

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use cloudbus_core::codec::from_structured_value;
use cloudbus_core::worker::HandlerRunner;
use cloudbus_core::{AttributesReader, Error, ErrorKind, Filter, Handler, HandlerError, Result};
use tokio::sync::Semaphore;

use crate::Secret;

/// The event type of Event Grid's subscription validation.
pub const VALIDATION_EVENT_TYPE: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

struct Inner {
    handler: Box<dyn Handler>,
    runner: HandlerRunner,
    secret: Option<Secret>,
    filter: Option<Filter>,
    permits: Semaphore,
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
/// .secret(Secret::new("s3cret"))            // subscribe https://host/events?code=s3cret
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
            .field("secret", &self.inner.secret)
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
                secret: None,
                filter: None,
                permits: Semaphore::new(64),
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

    /// Requires `?code=<secret>` on every request (put it in the subscription's URL).
    pub fn secret(self, secret: Secret) -> Self {
        self.with(|i| i.secret = Some(secret))
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
    /// `Router::nest("/events", endpoint.router())`.
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(serve_request)
            .with_state(self.inner.clone())
    }

    /// Serves the endpoint on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::with_source(ErrorKind::Unavailable, "the push endpoint stopped", e))
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

fn authorized(inner: &Inner, query: Option<&str>) -> bool {
    let Some(secret) = &inner.secret else {
        return true;
    };
    let given = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    // Compare in constant time.
    let (a, b) = (given.as_bytes(), secret.expose().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn serve_request(
    State(inner): State<Arc<Inner>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&inner, query.as_deref()) {
        tracing::warn!(consumer = %inner.runner.name(), "push request without the right secret");
        return text(StatusCode::UNAUTHORIZED, "missing or wrong code");
    }
    match method {
        Method::OPTIONS => webhook_handshake(&headers),
        Method::POST => deliver(&inner, &headers, &body).await,
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

async fn deliver(inner: &Inner, headers: &HeaderMap, body: &[u8]) -> Response {
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("malformed: invalid JSON: {e}");
            inner.runner.dead_lettered(&reason);
            return text(StatusCode::BAD_REQUEST, reason);
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
    let values = match json {
        serde_json::Value::Array(a) => a,
        single => vec![single],
    };
    let mut events = Vec::with_capacity(values.len());
    for v in values {
        match from_structured_value(v) {
            Ok(e) => events.push(Arc::new(e)),
            Err(e) => {
                // Event Grid dead-letters the delivery with this response as the reason.
                let reason = format!("malformed: {e}");
                tracing::warn!(consumer = %inner.runner.name(), %reason, "refusing a pushed message");
                inner.runner.dead_lettered(&reason);
                return text(StatusCode::BAD_REQUEST, reason);
            }
        }
    }
    let attempt = headers
        .get("aeg-delivery-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(1, |n| n.saturating_add(1));
    let mut retry = None;
    let mut reject = None;
    for event in events {
        if inner.filter.as_ref().is_some_and(|f| !f.matches(&event)) {
            continue;
        }
        let Ok(_permit) = inner.permits.acquire().await else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        };
        let id = event.id().to_owned();
        match inner.runner.run(&*inner.handler, event, attempt).await {
            Ok(()) => {}
            Err(HandlerError::Retry { message, .. }) => {
                retry.get_or_insert(format!("event {id}: {message}"));
            }
            Err(HandlerError::Reject { reason }) => {
                inner.runner.dead_lettered(&format!("rejected: {reason}"));
                reject.get_or_insert(format!("event {id} rejected: {reason}"));
            }
        }
    }
    match (retry, reject) {
        (Some(message), _) => text(StatusCode::SERVICE_UNAVAILABLE, message),
        (None, Some(reason)) => text(StatusCode::BAD_REQUEST, reason),
        (None, None) => StatusCode::OK.into_response(),
    }
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
