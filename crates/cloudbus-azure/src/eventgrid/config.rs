//! How a bus reaches an Event Grid topic: its endpoint and credential (the topic key,
//! a ready-made SAS token, or SAS tokens made from the key), from code, the
//! environment or an `eventgrid://` URL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudbus_driver::config::{UrlParams, env_var};
use cloudbus_driver::{Error, ErrorKind, Result};

use crate::auth::{Secret, hmac_sha256_base64, sas_encode};

/// The environment variable with the topic endpoint.
pub const ENDPOINT_ENV: &str = "EVENTGRID_ENDPOINT";
/// The environment variable with the topic key.
pub const KEY_ENV: &str = "EVENTGRID_KEY";
/// The environment variable with a ready-made SAS token (instead of the key).
pub const SAS_TOKEN_ENV: &str = "EVENTGRID_SAS_TOKEN";
/// The API version of the publish call.
pub const API_VERSION: &str = "2018-01-01";

/// What every Event Grid driver of one bus shares: the configuration and the HTTP
/// client.
pub(crate) struct EventGridContext {
    pub(crate) config: EventGridConfig,
    pub(crate) http: reqwest::Client,
}

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum Credential {
    /// The topic key, sent as `aeg-sas-key`.
    Key(Secret),
    /// A SAS token made from the key for each request, valid for `ttl`
    /// (`aeg-sas-token`); the key itself never leaves the process.
    SasFromKey {
        /// The topic key (base64).
        key: Secret,
        /// How long each token is valid.
        ttl: Duration,
    },
    /// A ready-made SAS token (`aeg-sas-token`).
    SasToken(Secret),
}

/// Where and how to publish.
///
/// ```
/// use cloudbus_azure::{Secret, eventgrid::{Credential, EventGridConfig}};
/// let c = EventGridConfig::new(
///     "https://orders.westeurope-1.eventgrid.azure.net/api/events",
///     Credential::Key(Secret::new("a2V5")),
/// );
/// assert!(!format!("{c:?}").contains("a2V5"));
/// ```
#[derive(Clone, Debug)]
pub struct EventGridConfig {
    pub(crate) endpoint: String,
    pub(crate) credential: Credential,
    pub(crate) timeout: Duration,
}

impl EventGridConfig {
    /// Publishes to `endpoint` (the topic's `.../api/events` URL) with `credential`.
    /// The endpoint must be `https://`, or `http://` on this machine's loopback (an
    /// emulator): the credential goes nowhere else, and
    /// [`EventGridBus::new`](super::EventGridBus::new) refuses any other endpoint
    /// (InvalidArgument).
    pub fn new(endpoint: impl Into<String>, credential: Credential) -> Self {
        EventGridConfig {
            endpoint: endpoint.into(),
            credential,
            timeout: Duration::from_secs(30),
        }
    }

    /// From `EVENTGRID_ENDPOINT` and `EVENTGRID_KEY` (or `EVENTGRID_SAS_TOKEN`); a
    /// variable counts when it is set and not blank.
    pub fn from_env() -> Result<Self> {
        let endpoint = env_var(ENDPOINT_ENV)
            .ok_or_else(|| Error::invalid(format!("{ENDPOINT_ENV} is not set")))?;
        let credential = match (env_var(KEY_ENV), env_var(SAS_TOKEN_ENV)) {
            (Some(key), _) => Credential::Key(Secret::new(key)),
            (None, Some(token)) => Credential::SasToken(Secret::new(token)),
            (None, None) => {
                return Err(Error::invalid(format!(
                    "neither {KEY_ENV} nor {SAS_TOKEN_ENV} is set"
                )));
            }
        };
        Ok(EventGridConfig::new(endpoint, credential))
    }

    /// From an `eventgrid://` URL: the environment ([`from_env`](Self::from_env)),
    /// then `endpoint=URL`, which replaces the endpoint. Any other parameter is
    /// InvalidArgument.
    pub fn from_url(url: &url::Url) -> Result<Self> {
        let config = Self::from_env()?;
        let params = UrlParams::parse(url, &["endpoint"])?;
        Ok(match params.get("endpoint") {
            Some(endpoint) => config.endpoint(endpoint),
            None => config,
        })
    }

    /// Replaces the endpoint.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }

    /// The timeout of one publish request (30 s by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Refuses an endpoint the credential must not travel to, before anything is sent:
/// the topic key, and a SAS token (as good as the key until it expires), go over
/// HTTPS only, or over plain HTTP to this machine's loopback (an emulator), where
/// they never leave the machine. The error names the scheme and host only. `Ok` with
/// the parsed endpoint.
///
/// (cloudbus-core's HTTP schema registry applies the same rule, but in a private
/// function, and Service Bus's host check sits behind the `servicebus` feature, so
/// neither is reachable from an Event-Grid-only build.)
pub(crate) fn check_endpoint(endpoint: &str) -> Result<url::Url> {
    let url = url::Url::parse(endpoint).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            "the Event Grid endpoint is not a URL (https://<topic>.<region>-1.eventgrid.azure.net/api/events)",
            e,
        )
    })?;
    let safe = cloudbus_driver::transport::credentials_may_go_to(&url, true);
    if safe {
        return Ok(url);
    }
    Err(Error::invalid(format!(
        "refusing to send the Event Grid credential to {}://{}: it goes over https://, \
         or over http:// only to this machine (an emulator on localhost, 127.0.0.1 or [::1])",
        url.scheme(),
        url.host_str().unwrap_or_default()
    )))
}

/// A SAS token for `endpoint` signed with `key` (base64), valid until `expiry`: the
/// format Event Grid checks in `aeg-sas-token` (and azure-eventgrid's `generate_sas`
/// makes): `r=<resource>&e=<expiry>&s=<HMAC-SHA256>`, each part URL-encoded.
///
/// ```
/// use cloudbus_azure::{Secret, eventgrid::sas_token};
/// let expiry = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").unwrap().to_utc();
/// let t = sas_token("https://t.westeurope-1.eventgrid.azure.net/api/events",
///     &Secret::new("a2V5a2V5a2V5"), expiry).unwrap();
/// assert!(t.expose().starts_with("r=https%3A%2F%2Ft.westeurope-1.eventgrid.azure.net%2Fapi%2Fevents%3FapiVersion%3D2018-01-01&e=01%2F01%2F2030%2012%3A00%3A00%20AM&s="));
/// ```
pub fn sas_token(endpoint: &str, key: &Secret, expiry: DateTime<Utc>) -> Result<Secret> {
    use base64::Engine as _;
    let resource = sas_encode(&format!("{endpoint}?apiVersion={API_VERSION}"));
    let expiry = sas_encode(&expiry.format("%m/%d/%Y %I:%M:%S %p").to_string());
    let unsigned = format!("r={resource}&e={expiry}");
    let key_bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose())
        .map_err(|_| Error::invalid("the Event Grid key is not base64"))?;
    let signature = hmac_sha256_base64(&key_bytes, &unsigned)?;
    Ok(Secret::new(format!(
        "{unsigned}&s={}",
        sas_encode(&signature)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = EventGridConfig::new(
            "http://x/api/events",
            Credential::SasFromKey {
                key: Secret::new("c2VjcmV0"),
                ttl: Duration::from_secs(60),
            },
        );
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
    }
}
