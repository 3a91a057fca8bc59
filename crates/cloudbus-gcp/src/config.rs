//! How to reach Pub/Sub: the project, the endpoint (Google's, another `https://` one,
//! or the emulator), the credentials mode that goes with it, the CloudEvents mode and
//! the flow control of streaming pulls; read from a `pubsub://` URL and
//! `PUBSUB_EMULATOR_HOST`, with the resource names and the codec that follow from it.

use cloudbus_driver::config::{UrlParams, env_var};
use cloudbus_driver::{BinaryCodec, Error, Result};

/// The environment variable naming the emulator (`host:port`), as Google's tools use it.
pub const EMULATOR_HOST_ENV: &str = "PUBSUB_EMULATOR_HOST";
/// The attribute prefix of binary-mode CloudEvents (`ce-id`, `ce-type`, ...).
pub const ATTRIBUTE_PREFIX: &str = "ce-";
/// The attribute that carries `datacontenttype` in binary mode, named as the
/// CloudEvents Pub/Sub binding and sdk-go write it (names are read
/// case-insensitively, so `content-type` from older writers still works).
pub const CONTENT_TYPE_ATTRIBUTE: &str = "Content-Type";
/// Pub/Sub allows 100 attributes per message.
pub const MAX_ATTRIBUTES: usize = 100;
/// Attributes cloudbus may add itself (dead-letter reason, source, redrive target).
const RESERVED_ATTRIBUTES: usize = 8;

/// How to reach Pub/Sub.
///
/// ```
/// let c = cloudbus_gcp::PubSubConfig::new("my-project").emulator("127.0.0.1:8085");
/// assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:8085"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PubSubConfig {
    /// The Google Cloud project of the topics and subscriptions.
    pub project: String,
    /// An endpoint other than `https://pubsub.googleapis.com` (the emulator).
    pub endpoint: Option<String>,
    /// Anonymous credentials (the emulator); otherwise Application Default Credentials.
    pub anonymous: bool,
    /// Send CloudEvents in structured mode (the whole event as a JSON body).
    pub structured: bool,
    /// Flow control of each streaming pull: most messages held unsettled.
    pub max_outstanding_messages: i64,
    /// Flow control of each streaming pull: most bytes held unsettled.
    pub max_outstanding_bytes: i64,
}

impl PubSubConfig {
    /// The real service for `project`, with Application Default Credentials.
    pub fn new(project: impl Into<String>) -> Self {
        PubSubConfig {
            project: project.into(),
            endpoint: None,
            anonymous: false,
            structured: false,
            max_outstanding_messages: 1000,
            max_outstanding_bytes: 100 * 1024 * 1024,
        }
    }

    /// The emulator at `host:port`, with anonymous credentials.
    pub fn emulator(mut self, host: &str) -> Self {
        let host = host.trim();
        self.endpoint = Some(
            if host.starts_with("http://") || host.starts_with("https://") {
                host.to_owned()
            } else {
                format!("http://{host}")
            },
        );
        self.anonymous = true;
        self
    }

    /// A Pub/Sub endpoint other than Google's (a regional or private endpoint), used
    /// with the real credentials: it must be `https://`. This never switches to the
    /// emulator's anonymous mode; use [`emulator`](Self::emulator) for that.
    pub fn endpoint(mut self, url: &str) -> Result<Self> {
        let url = url.trim();
        if !url.starts_with("https://") {
            return Err(Error::invalid(format!(
                "a Pub/Sub endpoint used with real credentials must be https:// (got {url:?}); an emulator is selected with PUBSUB_EMULATOR_HOST or ?emulator=HOST:PORT"
            )));
        }
        self.endpoint = Some(url.to_owned());
        self.anonymous = false;
        Ok(self)
    }

    /// Structured-mode CloudEvents.
    pub fn structured(mut self) -> Self {
        self.structured = true;
        self
    }

    /// Flow control of each consumer's streaming pull.
    pub fn flow_control(mut self, max_messages: i64, max_bytes: i64) -> Self {
        self.max_outstanding_messages = max_messages.max(1);
        self.max_outstanding_bytes = max_bytes.max(1);
        self
    }

    /// Reads `pubsub://PROJECT[?emulator=HOST:PORT | ?endpoint=https://...][&mode=structured]`.
    /// `emulator=` (or, without either parameter, `PUBSUB_EMULATOR_HOST`) selects the
    /// emulator with anonymous credentials; `endpoint=` is another `https://` endpoint
    /// used with Application Default Credentials, never anonymously.
    ///
    /// ```
    /// let c = cloudbus_gcp::PubSubConfig::from_url("pubsub://demo?emulator=127.0.0.1:9999").unwrap();
    /// assert_eq!(c.project, "demo");
    /// assert!(c.anonymous);
    /// let c = cloudbus_gcp::PubSubConfig::from_url("pubsub://demo?endpoint=https://europe-west1-pubsub.googleapis.com").unwrap();
    /// assert!(!c.anonymous);
    /// assert!(cloudbus_gcp::PubSubConfig::from_url("pubsub://demo?endpoint=http://10.0.0.7:8085").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid(format!("not a pubsub:// URL: {e}")))?;
        if parsed.scheme() != "pubsub" {
            return Err(Error::invalid(format!(
                "expected a pubsub:// URL, got scheme {:?}",
                parsed.scheme()
            )));
        }
        let project = parsed.host_str().unwrap_or_default();
        if project.is_empty() {
            return Err(Error::invalid(
                "pubsub:// URL needs a project: pubsub://PROJECT",
            ));
        }
        let params = UrlParams::parse(&parsed, &["emulator", "endpoint", "mode"])?;
        let mut config = PubSubConfig::new(project);
        if params.choice("mode", &["binary", "structured"])? == Some("structured") {
            config = config.structured();
        }
        match (params.get("emulator"), params.get("endpoint")) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "pubsub:// takes emulator= or endpoint=, not both",
                ));
            }
            (Some(host), None) => config = config.emulator(host),
            (None, Some(url)) => config = config.endpoint(url)?,
            (None, None) => {
                if let Some(host) = env_var(EMULATOR_HOST_ENV) {
                    config = config.emulator(&host);
                }
            }
        }
        Ok(config)
    }

    pub(crate) fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project)
    }
    pub(crate) fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project)
    }
    pub(crate) fn snapshot_path(&self, snapshot: &str) -> String {
        format!("projects/{}/snapshots/{snapshot}", self.project)
    }
    pub(crate) fn codec(&self) -> BinaryCodec {
        let c = codec();
        if self.structured { c.structured() } else { c }
    }
}

/// The binary-mode codec of Pub/Sub messages.
pub(crate) fn codec() -> BinaryCodec {
    BinaryCodec::new(ATTRIBUTE_PREFIX)
        .content_type_attribute(CONTENT_TYPE_ATTRIBUTE)
        .max_attributes(MAX_ATTRIBUTES, RESERVED_ATTRIBUTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_driver::ErrorKind;

    #[test]
    fn urls_are_read_or_refused_with_a_reason() {
        let c =
            PubSubConfig::from_url("pubsub://p1?emulator=localhost:9000&mode=structured").unwrap();
        assert_eq!(c.project, "p1");
        assert_eq!(c.endpoint.as_deref(), Some("http://localhost:9000"));
        assert!(c.anonymous && c.structured);
        for bad in ["pubsub://", "sqs://q", "pubsub://p?colour=red", "not a url"] {
            let e = PubSubConfig::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        assert_eq!(c.topic_path("t"), "projects/p1/topics/t");
        assert_eq!(c.subscription_path("s"), "projects/p1/subscriptions/s");
    }
}
