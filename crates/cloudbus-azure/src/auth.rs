//! Credentials and the signing of SAS tokens: the [`Secret`] that keeps keys and tokens
//! out of Debug output, logs and errors; the percent-encoding and HMAC-SHA256 signature
//! of SAS tokens; and the Service Bus SAS token, which the AMQP connection (CBS) and
//! the management API both put on their requests.

#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
use cloudbus_driver::{Error, Result};

/// A secret (key, SAS token, connection string): kept out of Debug output, logs and
/// errors.
///
/// ```
/// let s = cloudbus_azure::Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What the Azure SDKs leave unencoded in SAS tokens (`generate_sas`, `quote_plus`):
/// letters, digits and `-_.~()*!'`.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
const SAS_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'!')
    .remove(b'\'');

/// Percent-encodes a part of a SAS token.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
pub(crate) fn sas_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SAS_ENCODE).to_string()
}

/// The base64 HMAC-SHA256 of `text` under `key`: the signature of a SAS token.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
pub(crate) fn hmac_sha256_base64(key: &[u8], text: &str) -> Result<String> {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .map_err(|_| Error::invalid("the key cannot key an HMAC"))?;
    mac.update(text.as_bytes());
    Ok(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A Service Bus SAS token for `resource` (`SharedAccessSignature sr=&sig=&se=&skn=`),
/// as the Azure SDKs' `generate_sas_token` makes it.
///
/// ```
/// use cloudbus_azure::{Secret, servicebus::service_bus_sas_token};
/// let t = service_bus_sas_token("https://ns.servicebus.windows.net/orders", "RootManageSharedAccessKey",
///     &Secret::new("c2VjcmV0"), 1_900_000_000).unwrap();
/// assert!(t.expose().starts_with("SharedAccessSignature sr=https%3A%2F%2Fns.servicebus.windows.net%2Forders&sig="));
/// assert!(t.expose().ends_with("&se=1900000000&skn=RootManageSharedAccessKey"));
/// ```
#[cfg(feature = "servicebus")]
pub fn service_bus_sas_token(
    resource: &str,
    key_name: &str,
    key: &Secret,
    expiry_unix_seconds: i64,
) -> Result<Secret> {
    let encoded = sas_encode(resource);
    let signature = hmac_sha256_base64(
        key.expose().as_bytes(),
        &format!("{encoded}\n{expiry_unix_seconds}"),
    )?;
    Ok(Secret::new(format!(
        "SharedAccessSignature sr={encoded}&sig={}&se={expiry_unix_seconds}&skn={}",
        sas_encode(&signature),
        sas_encode(key_name)
    )))
}
