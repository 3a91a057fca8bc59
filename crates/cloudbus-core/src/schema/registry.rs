//! The [`SchemaRegistry`] trait: JSON Schemas by event type and version.

use async_trait::async_trait;
use serde_json::Value;

use cloudbus_driver::error::Result;

/// Names one schema: an event type (without version suffix) and a version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaId {
    /// The CloudEvents type.
    pub ty: String,
    /// The data version (from 1).
    pub version: u32,
}

impl SchemaId {
    /// The schema of version `version` of `ty`.
    pub fn new(ty: impl Into<String>, version: u32) -> Self {
        SchemaId {
            ty: ty.into(),
            version,
        }
    }
}

impl std::fmt::Display for SchemaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.ty, self.version)
    }
}

/// Where the JSON Schemas of event data are kept.
#[async_trait]
pub trait SchemaRegistry: Send + Sync + 'static {
    /// The schema of `id`, or `None` when none is registered. An error means the
    /// registry could not answer (kind [`Unavailable`](cloudbus_driver::ErrorKind::Unavailable)
    /// when it may answer later).
    async fn schema(&self, id: &SchemaId) -> Result<Option<Value>>;

    /// Every schema the registry holds (to load them all at once).
    async fn list(&self) -> Result<Vec<SchemaId>>;
}
