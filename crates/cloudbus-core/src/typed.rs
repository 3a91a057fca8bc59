//! Typed application events: the [`CloudEvent`] trait (derived with
//! `#[derive(CloudEvent)]` from the `cloudbus` crate), decoding an event into one
//! ([`DecodeExt::decode`], with a [`DecodeEventError`] that says what did not match),
//! sending one ([`Publisher::send`]), and the version rules: an event's version
//! travels in its `dataschema` (`…/v2`, `…:v2`, `…/v2.json`) or, failing that, as a
//! `.v2` suffix of its type; an event with neither is version 1.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::publisher::Publisher;
use cloudbus_driver::driver::PublishOptions;
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::event::{AttributesReader, Data, Event, EventBuilder};

/// An application event type: serde data with its CloudEvents `type`, version,
/// `source` and `dataschema`. Derive it:
///
/// ```
/// # use cloudbus_core as cloudbus;
/// # use cloudbus_core::CloudEvent;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderCreated { order_id: String, total_cents: u64 }
/// // What `#[derive(CloudEvent)] #[cloudevent(type = "com.example.order.created",
/// // version = 2, source = "/orders")]` writes:
/// impl CloudEvent for OrderCreated {
///     const TYPE: &'static str = "com.example.order.created";
///     const VERSION: u32 = 2;
///     const SOURCE: &'static str = "/orders";
/// }
/// assert_eq!(OrderCreated::data_schema(), "urn:cloudbus:schema:com.example.order.created:v2");
/// ```
pub trait CloudEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`, without a version suffix.
    const TYPE: &'static str;
    /// The version of the data's shape (starts at 1).
    const VERSION: u32 = 1;
    /// The CloudEvents `source` of events sent as this type.
    const SOURCE: &'static str;

    /// The `dataschema` URI sent with the event; it carries the version.
    fn data_schema() -> String {
        default_data_schema(Self::TYPE, Self::VERSION)
    }
    /// The ordering key of this event (`partitionkey`), if it has one.
    fn partition_key(&self) -> Option<String> {
        None
    }
    /// The CloudEvents `subject` of this event, if it has one.
    fn subject(&self) -> Option<String> {
        None
    }

    /// A builder of this value as a CloudEvent (type, source, dataschema, subject,
    /// key, JSON data), for what the builder adds (`caused_by`, extensions).
    fn builder(&self) -> Result<EventBuilder> {
        let mut builder = EventBuilder::new(Self::TYPE, Self::SOURCE)
            .dataschema(Self::data_schema())
            .json(self)?;
        if let Some(subject) = self.subject() {
            builder = builder.subject(subject);
        }
        if let Some(key) = self.partition_key() {
            builder = builder.partition_key(key);
        }
        Ok(builder)
    }

    /// This value as a CloudEvent.
    fn to_event(&self) -> Result<Event> {
        self.builder()?.build()
    }
}

/// The `dataschema` cloudbus gives version `version` of `ty` when the type names no
/// schema of its own: `urn:cloudbus:schema:TYPE:vVERSION`.
pub fn default_data_schema(ty: &str, version: u32) -> String {
    format!("urn:cloudbus:schema:{ty}:v{version}")
}

/// The version of an event's data: from its `dataschema` (a last segment `v2`,
/// `v2.json`, or a trailing `:v2`), else from a `.v2` suffix of its type, else 1.
///
/// ```
/// use cloudbus_core::{EventBuilder, typed::event_version};
/// let v3 = EventBuilder::new("com.example.a", "/x")
///     .dataschema("https://schemas.example.com/a/v3.json").build().unwrap();
/// assert_eq!(event_version(&v3), 3);
/// let v2 = EventBuilder::new("com.example.a.v2", "/x").build().unwrap();
/// assert_eq!(event_version(&v2), 2);
/// assert_eq!(event_version(&EventBuilder::new("com.example.a", "/x").build().unwrap()), 1);
/// ```
pub fn event_version(event: &Event) -> u32 {
    if let Some(schema) = event.dataschema()
        && let Some(v) = version_in_schema(schema.as_str())
    {
        return v;
    }
    split_type_version(event.ty()).1.unwrap_or(1)
}

/// The version named by a schema URI's last segment (`v2`, `v2.json`, `...:v2`).
fn version_in_schema(uri: &str) -> Option<u32> {
    let last = uri.rsplit(['/', ':']).next()?;
    let last = last.strip_suffix(".json").unwrap_or(last);
    parse_version(last)
}

fn parse_version(segment: &str) -> Option<u32> {
    let digits = segment
        .strip_prefix('v')
        .or_else(|| segment.strip_prefix('V'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|v| *v > 0)
}

/// A type without its version suffix, and the suffix's version:
/// `com.example.a.v2` is (`com.example.a`, Some(2)).
pub fn split_type_version(ty: &str) -> (&str, Option<u32>) {
    match ty.rsplit_once('.') {
        Some((base, last)) => match parse_version(last) {
            Some(v) => (base, Some(v)),
            None => (ty, None),
        },
        None => (ty, None),
    }
}

/// Why an event could not be decoded as a typed event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeEventError {
    /// The event is of another type.
    #[error("event {id} is of type {found:?}, not {expected:?}")]
    WrongType {
        /// The event's id.
        id: String,
        /// The type decoded into.
        expected: &'static str,
        /// The event's type.
        found: String,
    },
    /// The event is of another version of the type.
    #[error("event {id} is version {found} of {ty}, and {rust_type} reads version {expected}")]
    WrongVersion {
        /// The event's id.
        id: String,
        /// The event type.
        ty: &'static str,
        /// The Rust type decoded into.
        rust_type: &'static str,
        /// The version the Rust type reads.
        expected: u32,
        /// The event's version.
        found: u32,
    },
    /// The event has no data.
    #[error("event {id} of type {ty} has no data")]
    NoData {
        /// The event's id.
        id: String,
        /// The event type.
        ty: &'static str,
    },
    /// The data does not have the shape of the Rust type.
    #[error("data of event {id} ({ty} v{version}) does not match {rust_type}: {source}")]
    Data {
        /// The event's id.
        id: String,
        /// The event type.
        ty: &'static str,
        /// The version read.
        version: u32,
        /// The Rust type decoded into.
        rust_type: &'static str,
        /// What serde said (the field, and where).
        source: serde_json::Error,
    },
}

impl From<DecodeEventError> for Error {
    fn from(e: DecodeEventError) -> Self {
        Error::with_source(ErrorKind::InvalidArgument, e.to_string(), e)
    }
}

impl From<DecodeEventError> for crate::handler::HandlerError {
    /// An event that does not decode never will: dead-letter it with the reason.
    fn from(e: DecodeEventError) -> Self {
        crate::handler::HandlerError::reject(e)
    }
}

/// Decodes events into typed events.
pub trait DecodeExt {
    /// This event as a `T`: its type must be `T::TYPE` (with or without a version
    /// suffix) and its version `T::VERSION`.
    ///
    /// ```
    /// # use cloudbus_core as cloudbus;
    /// use cloudbus_core::{CloudEvent, DecodeExt, DecodeEventError};
    /// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    /// struct Ping { n: u32 }
    /// impl CloudEvent for Ping {
    ///     const TYPE: &'static str = "com.example.ping";
    ///     const SOURCE: &'static str = "/doc";
    /// }
    /// let event = Ping { n: 7 }.to_event().unwrap();
    /// assert_eq!(event.decode::<Ping>().unwrap(), Ping { n: 7 });
    /// let other = cloudbus_core::EventBuilder::new("com.example.pong", "/doc").build().unwrap();
    /// assert!(matches!(other.decode::<Ping>(), Err(DecodeEventError::WrongType { .. })));
    /// ```
    fn decode<T: CloudEvent>(&self) -> std::result::Result<T, DecodeEventError>;
}

impl DecodeExt for Event {
    fn decode<T: CloudEvent>(&self) -> std::result::Result<T, DecodeEventError> {
        let (base, _) = split_type_version(self.ty());
        if base != T::TYPE && self.ty() != T::TYPE {
            return Err(DecodeEventError::WrongType {
                id: self.id().to_owned(),
                expected: T::TYPE,
                found: self.ty().to_owned(),
            });
        }
        let version = event_version(self);
        if version != T::VERSION {
            return Err(DecodeEventError::WrongVersion {
                id: self.id().to_owned(),
                ty: T::TYPE,
                rust_type: std::any::type_name::<T>(),
                expected: T::VERSION,
                found: version,
            });
        }
        let parsed = match self.data() {
            Some(Data::Json(v)) => T::deserialize(v),
            Some(Data::String(s)) => serde_json::from_str(s),
            Some(Data::Binary(b)) => serde_json::from_slice(b),
            None => {
                return Err(DecodeEventError::NoData {
                    id: self.id().to_owned(),
                    ty: T::TYPE,
                });
            }
        };
        parsed.map_err(|source| DecodeEventError::Data {
            id: self.id().to_owned(),
            ty: T::TYPE,
            version,
            rust_type: std::any::type_name::<T>(),
            source,
        })
    }
}

/// A typed event on its way to a publisher: options first, then `.await`. Made by
/// [`Publisher::send`].
#[must_use = "nothing is sent until the SendEvent is awaited"]
pub struct SendEvent<'a, T> {
    publisher: &'a Publisher,
    value: &'a T,
    options: PublishOptions,
    subject: Option<String>,
    id: Option<String>,
    cause: Option<Arc<Event>>,
}

impl<'a, T: CloudEvent> SendEvent<'a, T> {
    pub(crate) fn new(publisher: &'a Publisher, value: &'a T) -> Self {
        SendEvent {
            publisher,
            value,
            options: PublishOptions::default(),
            subject: None,
            id: None,
            cause: None,
        }
    }
    /// The ordering key (instead of the type's own).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.options.ordering_key = Some(key.into());
        self
    }
    /// Deliver no earlier than `delay` from now.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = Some(delay);
        self
    }
    /// The CloudEvents `subject` (instead of the type's own).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
    /// The CloudEvents `id` (default: a new UUID). Give the same id to send the same
    /// event again, so that idempotent consumers see a duplicate.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Marks the event as caused by `cause`: causation id, correlation id and trace
    /// carried on (what [`Context::send`](crate::router::Context::send) does).
    pub fn caused_by(mut self, cause: Arc<Event>) -> Self {
        self.cause = Some(cause);
        self
    }

    /// The event that would be sent.
    pub fn to_event(&self) -> Result<Event> {
        let mut builder = self.value.builder()?;
        if let Some(subject) = &self.subject {
            builder = builder.subject(subject.clone());
        }
        if let Some(id) = &self.id {
            builder = builder.id(id.clone());
        }
        if let Some(cause) = &self.cause {
            builder = builder.caused_by(cause);
        }
        builder.build()
    }
}

impl<'a, T: CloudEvent> IntoFuture for SendEvent<'a, T> {
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let event = self.to_event()?;
            self.publisher.validated(&event).await?;
            self.publisher.publish_with(event, self.options).await
        })
    }
}

impl Publisher {
    /// Sends a typed event: `publisher.send(&order).await?`, or with options,
    /// `publisher.send(&order).key("customer-7").delay(d).await?`. The data is
    /// checked against its schema first when the publisher has a validator
    /// ([`validate_with`](Self::validate_with)).
    ///
    /// ```
    /// # async fn demo(publisher: cloudbus_core::Publisher) -> cloudbus_core::Result<()> {
    /// use cloudbus_core::CloudEvent;
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Ping { n: u32 }
    /// impl CloudEvent for Ping {
    ///     const TYPE: &'static str = "com.example.ping";
    ///     const SOURCE: &'static str = "/doc";
    /// }
    /// publisher.send(&Ping { n: 1 }).key("pings").await?;
    /// # Ok(()) }
    /// ```
    pub fn send<'a, T: CloudEvent>(&'a self, value: &'a T) -> SendEvent<'a, T> {
        SendEvent::new(self, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_schema(uri: &str) -> Event {
        EventBuilder::new("com.example.a", "/t")
            .dataschema(uri)
            .build()
            .unwrap()
    }

    #[test]
    fn versions_are_read_from_the_schema_then_the_type() {
        assert_eq!(
            event_version(&with_schema("https://s.example/a/v12.json")),
            12
        );
        assert_eq!(event_version(&with_schema("https://s.example/a/V3")), 3);
        assert_eq!(
            event_version(&with_schema("urn:cloudbus:schema:com.example.a:v4")),
            4
        );
        // Not a version: v0, no digits, other words.
        assert_eq!(event_version(&with_schema("https://s.example/a/v0")), 1);
        assert_eq!(event_version(&with_schema("https://s.example/a/vip")), 1);
        assert_eq!(
            event_version(&with_schema("https://s.example/a/schema.json")),
            1
        );
        assert_eq!(
            split_type_version("com.example.a.v2"),
            ("com.example.a", Some(2))
        );
        assert_eq!(
            split_type_version("com.example.vip"),
            ("com.example.vip", None)
        );
        assert_eq!(split_type_version("v2"), ("v2", None));
        // The schema wins over the type suffix.
        let both = EventBuilder::new("com.example.a.v2", "/t")
            .dataschema("https://s.example/a/v5")
            .build()
            .unwrap();
        assert_eq!(event_version(&both), 5);
    }
}
