//! [`HttpSchemaRegistry`]: schemas read over HTTP(S) from a registry that speaks the
//! Confluent Schema Registry REST paths, with the event type as the subject:
//! `GET /subjects`, `GET /subjects/{type}/versions`,
//! `GET /subjects/{type}/versions/{version}/schema`.

use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use crate::schema::registry::{SchemaId, SchemaRegistry};

/// A schema registry over HTTP(S) (certificates verified).
///
/// ```
/// let registry = cloudbus_core::schema::HttpSchemaRegistry::new("http://127.0.0.1:8081").unwrap();
/// # let _ = registry;
/// ```
#[derive(Debug, Clone)]
pub struct HttpSchemaRegistry {
    base: url::Url,
    client: reqwest::Client,
}

impl HttpSchemaRegistry {
    /// A registry at `base` (`http://` or `https://`).
    pub fn new(base: &str) -> Result<Self> {
        let mut base = url::Url::parse(base).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                format!("bad registry URL {base:?}"),
                e,
            )
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "a schema registry URL is http:// or https://, not {}://",
                base.scheme()
            )));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::with_source(ErrorKind::Internal, "building the HTTP client", e))?;
        Ok(HttpSchemaRegistry { base, client })
    }

    /// GETs `path` (segments percent-encoded) as JSON; `None` on 404.
    async fn get(&self, segments: &[&str]) -> Result<Option<Value>> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| Error::invalid("the registry URL cannot have a path"))?
            .pop_if_empty()
            .extend(segments);
        let response = self
            .client
            .get(url.clone())
            .header(
                "accept",
                "application/vnd.schemaregistry.v1+json, application/json",
            )
            .send()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Unavailable, format!("GET {url}"), e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let kind = if status.is_server_error() || status.as_u16() == 429 {
                ErrorKind::Unavailable
            } else {
                ErrorKind::InvalidArgument
            };
            return Err(Error::new(kind, format!("GET {url}: HTTP {status}")));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Unavailable, format!("GET {url}"), e))?;
        serde_json::from_slice(&body).map(Some).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                format!("GET {url}: not JSON"),
                e,
            )
        })
    }
}

#[async_trait]
impl SchemaRegistry for HttpSchemaRegistry {
    async fn schema(&self, id: &SchemaId) -> Result<Option<Value>> {
        let version = id.version.to_string();
        self.get(&["subjects", &id.ty, "versions", &version, "schema"])
            .await
    }

    async fn list(&self) -> Result<Vec<SchemaId>> {
        let subjects: Vec<String> = match self.get(&["subjects"]).await? {
            Some(v) => serde_json::from_value(v).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidArgument,
                    "GET /subjects: not a list of names",
                    e,
                )
            })?,
            None => return Ok(Vec::new()),
        };
        let mut ids = Vec::new();
        for subject in subjects {
            let versions: Vec<u32> = match self.get(&["subjects", &subject, "versions"]).await? {
                Some(v) => serde_json::from_value(v).map_err(|e| {
                    Error::with_source(
                        ErrorKind::InvalidArgument,
                        format!("GET /subjects/{subject}/versions: not a list of versions"),
                        e,
                    )
                })?,
                None => continue,
            };
            ids.extend(
                versions
                    .into_iter()
                    .map(|v| SchemaId::new(subject.clone(), v)),
            );
        }
        Ok(ids)
    }
}
