//! The hook through which event data is checked against its schema before it is
//! published ([`Publisher::validate_with`](crate::Publisher::validate_with)) and
//! after it is received (the router's schema layer): [`EventValidator`]. The JSON
//! Schema implementation is `schema::SchemaValidator` (feature `schema`).

use async_trait::async_trait;

use cloudbus_driver::error::Result;
use cloudbus_driver::event::Event;

/// What a validator knows about an event without waiting for anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The data matches the schema of the event's type and version.
    Valid,
    /// No schema is registered for the event's type and version: nothing to check.
    NoSchema,
    /// The schema is not loaded yet; [`EventValidator::validate`] fetches it.
    NotLoaded,
}

/// Checks events against their schemas. A violation is an error of kind
/// [`InvalidArgument`](cloudbus_driver::ErrorKind::InvalidArgument) whose message says what
/// did not match; a registry that cannot be reached is
/// [`Unavailable`](cloudbus_driver::ErrorKind::Unavailable).
#[async_trait]
pub trait EventValidator: Send + Sync + 'static {
    /// Checks `event` against the schemas already loaded, without waiting.
    fn validate_loaded(&self, event: &Event) -> Result<Checked>;

    /// Checks `event`, fetching its schema first when it is not loaded.
    async fn validate(&self, event: &Event) -> Result<Checked>;
}
