//! Schemas of event data (feature `schema`): where they are kept ([`SchemaRegistry`]:
//! [`DirectorySchemaRegistry`], and [`HttpSchemaRegistry`] with `schema-http`), the
//! JSON Schema check on publish and consume ([`SchemaValidator`]), and the
//! compatibility check of a new schema version against the old one for CI
//! ([`check_compatibility`]).
//!
//! A schema is named by event type and version; the version of an event is read from
//! its `dataschema` (see [`event_version`](crate::typed::event_version)).

mod compat;
mod directory;
#[cfg(feature = "schema-http")]
mod http;
mod registry;
mod validator;

pub use compat::{Compatibility, check_compatibility};
pub use directory::DirectorySchemaRegistry;
#[cfg(feature = "schema-http")]
pub use http::HttpSchemaRegistry;
pub use registry::{SchemaId, SchemaRegistry};
pub use validator::{CompiledSchema, SchemaValidator};
