//! [`HttpSchemaRegistry`]: schemas read over HTTP(S) from a registry that speaks the
//! Confluent Schema Registry REST paths, with the event type as the subject:
//! `GET /subjects`, `GET /subjects/{type}/versions`,
//! `GET /subjects/{type}/versions/{version}/schema`.
//!
//! Credentials (HTTP Basic, as Confluent's `basic.auth.user.info`, or a bearer token)
//! go with every request, only over HTTPS (or to this machine's loopback), and never
//! into `Debug` output or error messages.

use async_trait::async_trait;
use serde_json::Value;

use crate::schema::registry::{SchemaId, SchemaRegistry};
use cloudbus_driver::error::{Error, ErrorKind, Result};

/// A schema registry over HTTP(S) (certificates verified).
///
/// ```
/// use cloudbus_core::schema::HttpSchemaRegistry;
/// let registry = HttpSchemaRegistry::new("http://127.0.0.1:8081")?;
/// // Confluent Cloud: the API key and secret as HTTP Basic credentials.
/// let cloud = HttpSchemaRegistry::new("https://psrc-123.eu-west-1.aws.confluent.cloud")?
///     .basic_auth("API_KEY", "API_SECRET")?;
/// assert!(!format!("{cloud:?}").contains("API_SECRET"));
/// // Credentials never go over plain HTTP to another machine.
/// assert!(HttpSchemaRegistry::new("http://registry.example.com")?.bearer_token("t").is_err());
/// # let _ = registry;
/// # Ok::<(), cloudbus_core::Error>(())
/// ```
#[derive(Clone)]
pub struct HttpSchemaRegistry {
    base: url::Url,
    client: reqwest::Client,
    /// The `Authorization` header sent with every request (marked sensitive).
    authorization: Option<reqwest::header::HeaderValue>,
    /// What `Debug` says of the credentials: their kind and user, never the secret.
    credentials: Option<String>,
}

impl std::fmt::Debug for HttpSchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSchemaRegistry")
            .field("base", &self.base.as_str())
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl HttpSchemaRegistry {
    /// A registry at `base` (`http://` or `https://`). Credentials written into the
    /// URL (`https://user:password@host`) are taken out of it and sent as HTTP Basic
    /// credentials, as [`basic_auth`](Self::basic_auth) does.
    pub fn new(base: &str) -> Result<Self> {
        let mut base = url::Url::parse(base).map_err(|e| {
            // The URL may hold a password: the message names neither it nor the URL.
            Error::with_source(ErrorKind::InvalidArgument, "bad registry URL", e)
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "a schema registry URL is http:// or https://, not {}://",
                base.scheme()
            )));
        }
        let user = percent_decoded(base.username());
        let password = base.password().map(percent_decoded);
        // Cannot fail on an http(s) URL; both are cleared before the URL is kept.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
        if base
            .host_str()
            .is_some_and(cloudbus_driver::transport::is_loopback_host)
        {
            // A registry on this machine is reached directly: an HTTP_PROXY from the
            // environment would carry its credentials off it in clear text.
            client = client.no_proxy();
        }
        let client = client
            .build()
            .map_err(|e| Error::with_source(ErrorKind::Internal, "building the HTTP client", e))?;
        let registry = HttpSchemaRegistry {
            base,
            client,
            authorization: None,
            credentials: None,
        };
        if user.is_empty() && password.is_none() {
            return Ok(registry);
        }
        registry.basic_auth(user, password.unwrap_or_default())
    }

    /// Sends `user` and `password` as HTTP Basic credentials with every request
    /// (Confluent Cloud: the API key and its secret). Refused unless the registry is
    /// reached over HTTPS or on this machine's loopback.
    pub fn basic_auth(self, user: impl Into<String>, password: impl Into<String>) -> Result<Self> {
        use base64::Engine as _;
        let user = user.into();
        let pair = format!("{user}:{}", password.into());
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        self.authorized(format!("Basic {encoded}"), format!("basic (user {user})"))
    }

    /// Sends `token` as `Authorization: Bearer <token>` with every request. Refused
    /// unless the registry is reached over HTTPS or on this machine's loopback.
    pub fn bearer_token(self, token: impl Into<String>) -> Result<Self> {
        self.authorized(
            format!("Bearer {}", token.into()),
            "bearer token".to_owned(),
        )
    }

    fn authorized(mut self, header: String, described: String) -> Result<Self> {
        if !cloudbus_driver::transport::credentials_may_go_to(&self.base, true) {
            return Err(Error::invalid(format!(
                "credentials for the schema registry at {} would travel unencrypted: use https://",
                self.base
            )));
        }
        let mut value = reqwest::header::HeaderValue::from_str(&header).map_err(|_| {
            Error::invalid("schema registry credentials hold characters a header cannot carry")
        })?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        self.credentials = Some(described);
        Ok(self)
    }

    /// GETs `path` (segments percent-encoded) as JSON; `None` on 404.
    async fn get(&self, segments: &[&str]) -> Result<Option<Value>> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| Error::invalid("the registry URL cannot have a path"))?
            .pop_if_empty()
            .extend(segments);
        let mut request = self.client.get(url.clone()).header(
            "accept",
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Unavailable, format!("GET {url}"), e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            // Only "no such schema" (404, above) says something about the event; any
            // other answer is the registry's or the path's trouble (a timeout, a
            // proxy, a bad request of ours), and must not dead-letter good events.
            let kind = match status.as_u16() {
                401 | 403 => ErrorKind::PermissionDenied,
                // The path is the event's type and version: a registry that refuses
                // them (Confluent: 422 for a version it cannot read; 414 for a type
                // too long) says the event names no schema it can have.
                414 | 422 => ErrorKind::InvalidArgument,
                _ => ErrorKind::Unavailable,
            };
            return Err(Error::new(kind, format!("GET {url}: HTTP {status}")));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Unavailable, format!("GET {url}"), e))?;
        // A body that is not JSON (a proxy's HTML page) is the path's fault too.
        serde_json::from_slice(&body).map(Some).map_err(|e| {
            Error::with_source(ErrorKind::Unavailable, format!("GET {url}: not JSON"), e)
        })
    }
}

/// A URL's user or password as written before percent-encoding (`%40` is `@`).
fn percent_decoded(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[async_trait]
impl SchemaRegistry for HttpSchemaRegistry {
    async fn schema(&self, id: &SchemaId) -> Result<Option<Value>> {
        // Confluent's versions are 32-bit signed: a larger one is no schema at all.
        if i32::try_from(id.version).is_err() {
            return Ok(None);
        }
        let version = id.version.to_string();
        self.get(&["subjects", &id.ty, "versions", &version, "schema"])
            .await
    }

    async fn list(&self) -> Result<Vec<SchemaId>> {
        let subjects: Vec<String> = match self.get(&["subjects"]).await? {
            Some(v) => serde_json::from_value(v).map_err(|e| {
                Error::with_source(
                    ErrorKind::Unavailable,
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
                        ErrorKind::Unavailable,
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
