//! [`DirectorySchemaRegistry`]: JSON Schema files in a directory, named
//! `TYPE.vVERSION.json` (`com.example.order.created.v2.json`), read once when opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde_json::Value;

use crate::schema::registry::{SchemaId, SchemaRegistry};
use crate::typed::split_type_version;
use cloudbus_driver::error::{Error, ErrorKind, Result};

/// Schemas from the files of one directory, named `TYPE.vVERSION.json`.
///
/// ```
/// use cloudbus_core::schema::{DirectorySchemaRegistry, SchemaId, SchemaRegistry};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cloudbus_core::Result<()> {
/// let dir = std::env::temp_dir().join(format!("cloudbus-doc-schemas-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("com.example.ping.v1.json"), r#"{"type": "object"}"#).unwrap();
/// let registry = DirectorySchemaRegistry::open(&dir)?;
/// assert!(registry.schema(&SchemaId::new("com.example.ping", 1)).await?.is_some());
/// assert!(registry.schema(&SchemaId::new("com.example.ping", 2)).await?.is_none());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DirectorySchemaRegistry {
    dir: PathBuf,
    schemas: HashMap<SchemaId, Value>,
}

impl DirectorySchemaRegistry {
    /// Reads every `*.json` file of `dir`. A file whose name has no `.vN` version or
    /// that is not JSON is an error naming it (a typo must not silently switch
    /// validation off); other files are skipped.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                format!("cannot read the schema directory {}", dir.display()),
                e,
            )
        })?;
        let mut schemas = HashMap::new();
        for entry in entries {
            let path = entry
                .map_err(|e| {
                    Error::with_source(ErrorKind::Unavailable, "reading the schema directory", e)
                })?
                .path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let (ty, Some(version)) = split_type_version(stem) else {
                return Err(Error::invalid(format!(
                    "schema file {} is not named TYPE.vVERSION.json",
                    path.display()
                )));
            };
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidArgument,
                    format!("cannot read schema file {}", path.display()),
                    e,
                )
            })?;
            let schema: Value = serde_json::from_str(&text).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidArgument,
                    format!("schema file {} is not JSON", path.display()),
                    e,
                )
            })?;
            schemas.insert(SchemaId::new(ty, version), schema);
        }
        Ok(DirectorySchemaRegistry { dir, schemas })
    }

    /// The directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many schemas were read.
    pub fn len(&self) -> usize {
        self.schemas.len()
    }

    /// Whether no schema was read.
    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty()
    }
}

#[async_trait]
impl SchemaRegistry for DirectorySchemaRegistry {
    async fn schema(&self, id: &SchemaId) -> Result<Option<Value>> {
        Ok(self.schemas.get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<SchemaId>> {
        let mut ids: Vec<SchemaId> = self.schemas.keys().cloned().collect();
        ids.sort();
        Ok(ids)
    }
}
