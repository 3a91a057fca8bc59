//! URL schemes: each provider crate registers the schemes it opens once, as
//! [`Scheme`]s (a name and an opener of its [`BusDriver`]), and whoever opens a URL
//! (a provider's own `connect`, the `cloudbus` facade over every enabled provider)
//! dispatches through [`open`] once.

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use crate::driver::BusDriver;
use crate::error::{Error, ErrorKind, Result};

/// What an opener returns: the provider's bus driver, once it is open.
pub type Opening = Pin<Box<dyn Future<Output = Result<Arc<dyn BusDriver>>> + Send>>;

/// One URL scheme (`sqs`, `mem`, ...) and how a bus driver for one of its URLs is
/// opened.
///
/// ```
/// use cloudbus_driver::scheme::{self, Scheme};
/// use cloudbus_driver::ErrorKind;
/// let schemes = [Scheme {
///     name: "never",
///     open: |url| Box::pin(async move {
///         Err(cloudbus_driver::Error::unsupported(format!("{url} is never open")))
///     }),
/// }];
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let Err(e) = scheme::open(&schemes, "never://x").await else { panic!("opened") };
/// assert_eq!(e.kind(), ErrorKind::Unsupported);
/// let Err(e) = scheme::open(&schemes, "other://x").await else { panic!("opened") };
/// assert_eq!(e.kind(), ErrorKind::InvalidArgument);
/// # });
/// ```
#[derive(Clone, Copy)]
pub struct Scheme {
    /// The scheme, without `://`.
    pub name: &'static str,
    /// Opens the bus driver for a URL of this scheme.
    pub open: fn(url::Url) -> Opening,
}

impl std::fmt::Debug for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheme").field("name", &self.name).finish()
    }
}

/// Parses `url`; a text that is not a URL is InvalidArgument.
///
/// A list of servers as the authority (`kafka://a:9092,b:9092`, the form Kafka's
/// `bootstrap.servers` takes) is not a URL host, so its colons are percent-encoded
/// (`a%3A9092,b%3A9092`, an opaque host): the provider reads the list back with
/// [`host_list`].
///
/// ```
/// use cloudbus_driver::scheme;
/// let url = scheme::parse("kafka://a:9092,b:9093?mode=structured").unwrap();
/// assert_eq!(scheme::host_list(&url), vec!["a:9092", "b:9093"]);
/// assert_eq!(url.query(), Some("mode=structured"));
/// let one = scheme::parse("kafka://a:9092").unwrap();
/// assert_eq!(scheme::host_list(&one), vec!["a:9092"]);
/// // A password in a URL that does not parse stays out of the error.
/// let e = scheme::parse("kafka://user:secret@a:1,b:2").unwrap_err();
/// assert!(!e.to_string().contains("secret"), "{e}");
/// ```
pub fn parse(url: &str) -> Result<url::Url> {
    url::Url::parse(url)
        .or_else(|e| match encode_host_list(url) {
            Some(encoded) => url::Url::parse(&encoded).map_err(|_| e),
            None => Err(e),
        })
        .map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                format!("{:?} is not a URL (try mem://)", without_userinfo(url)),
                e,
            )
        })
}

/// `url` with what stands before an `@` in its authority (a user and password)
/// replaced, for error messages.
fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]).into(),
        None => url.into(),
    }
}

/// `scheme://h1:p1,h2:p2/rest` with the authority's colons percent-encoded, when the
/// authority is a comma-separated list; `None` otherwise.
fn encode_host_list(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !authority.contains(',') || authority.contains(['@', '[', '%']) {
        return None;
    }
    Some(format!(
        "{scheme}://{}{tail}",
        authority.replace(':', "%3A")
    ))
}

/// The `host:port` entries of `url`'s authority: the list [`parse`] encoded, or the
/// one host and its port (the host alone when it has none); empty without a host.
pub fn host_list(url: &url::Url) -> Vec<String> {
    let Some(host) = url.host_str() else {
        return Vec::new();
    };
    if host.contains(',') {
        return host
            .replace("%3A", ":")
            .replace("%3a", ":")
            .split(',')
            .map(str::to_owned)
            .collect();
    }
    match url.port() {
        Some(port) => vec![format!("{host}:{port}")],
        None => vec![host.to_owned()],
    }
}

/// Opens `url` with the one of `schemes` that serves its scheme; a scheme none of
/// them serves is InvalidArgument, naming those they do.
pub async fn open(schemes: &[Scheme], url: &str) -> Result<Arc<dyn BusDriver>> {
    let parsed = parse(url)?;
    match find(schemes, parsed.scheme()) {
        Some(scheme) => (scheme.open)(parsed).await,
        None => Err(Error::invalid(format!(
            "unknown URL scheme {:?}; known here: {}",
            parsed.scheme(),
            names(schemes)
        ))),
    }
}

/// The scheme called `name`.
pub fn find<'a>(schemes: &'a [Scheme], name: &str) -> Option<&'a Scheme> {
    schemes.iter().find(|s| s.name == name)
}

/// The names of `schemes`, comma separated.
pub fn names(schemes: &[Scheme]) -> String {
    schemes
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}
