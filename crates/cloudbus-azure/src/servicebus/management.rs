//! Service Bus operations on an entity's `$management` node (request/response over
//! AMQP, with fe2o3-amqp-management): renew a message lock or a session lock, peek,
//! receive deferred messages by sequence number, and settle messages received that
//! way. One client per entity, opened on first use and opened anew after a failure
//! (a request that timed out could otherwise be answered to the next one).

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Timestamp, Uuid, Value};
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::Error as ManagementError;
use fe2o3_amqp_management::mgmt_ext::AmqpMessageManagementExt;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use tokio::sync::Mutex;

use cloudbus_driver::{Error, ErrorKind, Result};

use super::connection::{Amqp, Live};
use super::error::{self, Failure};

/// The longest a management request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const VENDOR: &str = "com.microsoft";

/// A management operation's name.
pub(crate) trait Operation {
    const NAME: &'static str;
}

macro_rules! operations {
    ($($ty:ident = $name:literal;)*) => {
        $(
            pub(crate) struct $ty;
            impl Operation for $ty {
                const NAME: &'static str = $name;
            }
        )*
    };
}

operations! {
    RenewLock = "com.microsoft:renew-lock";
    RenewSessionLock = "com.microsoft:renew-session-lock";
    PeekMessage = "com.microsoft:peek-message";
    ReceiveBySequenceNumber = "com.microsoft:receive-by-sequence-number";
    UpdateDisposition = "com.microsoft:update-disposition";
}

/// A request: the operation, a map body with text keys, and the link it is for.
struct ServiceBusRequest<O> {
    body: OrderedMap<Value, Value>,
    link_name: Option<String>,
    operation: PhantomData<O>,
}

impl<O: Operation> Request for ServiceBusRequest<O> {
    const OPERATION: &'static str = O::NAME;
    type Response = ServiceBusResponse;
    type Body = Value;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        let timeout = u32::try_from(REQUEST_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
        let mut props = ApplicationProperties::builder().insert(
            format!("{VENDOR}:server-timeout"),
            SimpleValue::Uint(timeout),
        );
        if let Some(name) = self.link_name.take() {
            props = props.insert("associated-link-name".to_owned(), SimpleValue::String(name));
        }
        Some(props.build())
    }

    fn encode_body(self) -> Self::Body {
        Value::Map(self.body)
    }
}

/// A response: its status, the error condition the service named (if any), and its
/// body.
pub(crate) struct ServiceBusResponse {
    pub status: u16,
    pub condition: Option<String>,
    pub description: Option<String>,
    pub body: Option<Value>,
}

impl Response for ServiceBusResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Option<Value>;
    type Error = ManagementError;

    fn decode_message(message: Message<Self::Body>) -> std::result::Result<Self, Self::Error> {
        Self::from_message(message)
    }

    /// Every status is an answer here; [`Management::call`] tells success from failure
    /// by the status and the `errorCondition` the service adds.
    fn from_message(mut message: Message<Self::Body>) -> std::result::Result<Self, Self::Error> {
        let status = match message.remove_status_code() {
            Some(Ok(code)) => code.0.get(),
            _ => return Err(ManagementError::StatusCodeNotFound),
        };
        let condition = message.application_properties.as_ref().and_then(|p| {
            match p.0.get("errorCondition")? {
                SimpleValue::Symbol(s) => Some(s.0.clone()),
                SimpleValue::String(s) => Some(s.clone()),
                _ => None,
            }
        });
        let description = message.remove_status_description().and_then(|d| d.ok());
        Ok(ServiceBusResponse {
            status,
            condition,
            description,
            body: message.body,
        })
    }
}

/// A request body from text keys and values.
pub(crate) fn body(
    entries: impl IntoIterator<Item = (&'static str, Value)>,
) -> OrderedMap<Value, Value> {
    entries
        .into_iter()
        .map(|(k, v)| (Value::String(k.to_owned()), v))
        .collect()
}

/// An AMQP array of lock tokens.
pub(crate) fn lock_tokens(tokens: &[Uuid]) -> Value {
    Value::Array(Array::from(
        tokens
            .iter()
            .map(|t| Value::Uuid(t.clone()))
            .collect::<Vec<_>>(),
    ))
}

/// A value of a response body's map by its text key.
pub(crate) fn field<'a>(body: &'a Value, key: &str) -> Option<&'a Value> {
    match body {
        Value::Map(map) => map.iter().find_map(|(k, v)| match k {
            Value::String(s) if s == key => Some(v),
            Value::Symbol(s) if s.0 == key => Some(v),
            _ => None,
        }),
        _ => None,
    }
}

/// The items of a list or an array.
pub(crate) fn items(value: &Value) -> Vec<&Value> {
    match value {
        Value::List(list) => list.iter().collect(),
        Value::Array(array) => array.0.iter().collect(),
        _ => Vec::new(),
    }
}

/// A timestamp of a response.
pub(crate) fn timestamp(value: &Value) -> Option<Timestamp> {
    match value {
        Value::Timestamp(t) => Some(t.clone()),
        _ => None,
    }
}

/// A message encoded in a response (peek, receive-by-sequence-number).
pub(crate) fn decode_message(value: &Value) -> Option<Message<Body<Value>>> {
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    let Value::Binary(bytes) = value else {
        return None;
    };
    serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes)
        .ok()
        .map(|d| d.0)
}

/// The `$management` node of one entity.
pub(crate) struct Management {
    amqp: Arc<Amqp>,
    path: String,
    client: Mutex<Option<(Arc<Live>, MgmtClient)>>,
    /// Requests sent (a diagnostic).
    requests: AtomicU64,
}

impl Management {
    pub(crate) fn new(amqp: Arc<Amqp>, path: impl Into<String>) -> Self {
        Management {
            amqp,
            path: path.into(),
            client: Mutex::new(None),
            requests: AtomicU64::new(0),
        }
    }

    /// How many requests were sent.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Sends `operation` with `body` and returns the answer (200 or 204). One request
    /// at a time per entity (the client reads answers in order). The client is lent
    /// out for the request: a request dropped half-way (its caller cancelled) takes
    /// the client with it, since the answer may still come and would be read as the
    /// next request's; the next request opens a new one.
    pub(crate) async fn call<O: Operation>(
        &self,
        body: OrderedMap<Value, Value>,
        link_name: Option<String>,
    ) -> Result<ServiceBusResponse> {
        let what = format!("{} on {}", O::NAME, self.path);
        let mut guard = self.client.lock().await;
        let (live, client) = match guard.take() {
            Some(c) => c,
            None => self
                .amqp
                .management(&self.path)
                .await
                .map_err(|f| f.error)?,
        };
        let mut lent = Lent(Some(client));
        let Some(client) = lent.0.as_mut() else {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("{what}: no client"),
            ));
        };
        let request = ServiceBusRequest::<O> {
            body,
            link_name,
            operation: PhantomData,
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.call(request)).await;
        let failure: Failure = match answer {
            Ok(Ok(response)) => {
                // Answered: the client is in step, and serves the next request.
                *guard = lent.0.take().map(|c| (live, c));
                if matches!(response.status, 200 | 204) {
                    return Ok(response);
                }
                // The condition says more than the status, when the service sends one.
                let kind = match &response.condition {
                    Some(c) => error::kind_of_condition(c),
                    None => error::kind_of_status(response.status),
                };
                return Err(Error::new(
                    kind,
                    format!(
                        "{what}: status {}{}: {}",
                        response.status,
                        response
                            .condition
                            .as_deref()
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default(),
                        response.description.as_deref().unwrap_or("")
                    ),
                ));
            }
            Ok(Err(e)) => error::from_management(e, &what),
            Err(_) => error::timed_out(&what, REQUEST_TIMEOUT),
        };
        if failure.scope == error::Scope::Operation {
            *guard = lent.0.take().map(|c| (live, c));
        } else {
            // The link may be gone, or an answer may still come: the client is closed
            // (as `lent` drops) and the next request opens a new one.
            self.amqp.failed(&live, &failure);
        }
        Err(failure.error)
    }

    /// Closes the client.
    pub(crate) async fn close(&self) {
        if let Some((_, client)) = self.client.lock().await.take() {
            let _ = client.close().await;
        }
    }
}

/// A management client lent out for one request; closed on a task of its own when
/// it is dropped without being given back.
struct Lent(Option<MgmtClient>);

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(client) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = client.close().await;
            });
        }
    }
}

/// An error for a response that lacks what it must carry.
pub(crate) fn malformed(what: &str) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("the Service Bus answer to {what} is not as documented"),
    )
}
