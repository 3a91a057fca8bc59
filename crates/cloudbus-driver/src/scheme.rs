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
pub fn parse(url: &str) -> Result<url::Url> {
    url::Url::parse(url).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            format!("{url:?} is not a URL (try mem://)"),
            e,
        )
    })
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
