//! The one error type of cloudbus: a portable [`ErrorKind`] that code can match on,
//! a message, and the provider's own error kept as the `source`.

use std::fmt;

/// Result alias used across cloudbus.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Portable error kinds, the same for every provider.
///
/// ```
/// use cloudbus_driver::{Error, ErrorKind};
/// let e = Error::new(ErrorKind::Throttled, "slow down");
/// assert!(e.is_retryable());
/// assert_eq!(e.kind(), ErrorKind::Throttled);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The topic, queue, subscription or stream does not exist.
    NotFound,
    /// The entity exists already (create without `ensure`).
    AlreadyExists,
    /// Credentials are missing or lack the permission.
    PermissionDenied,
    /// The request is malformed or violates a documented constraint.
    InvalidArgument,
    /// An event or a batch exceeds the provider's size limit.
    TooLarge,
    /// The provider asked us to slow down.
    Throttled,
    /// A bounded resource is full (a local queue, the memory broker's limits).
    ResourceExhausted,
    /// The provider is unreachable or answered with a transient failure.
    Unavailable,
    /// The operation timed out.
    Timeout,
    /// The publisher, consumer or broker has been closed.
    Closed,
    /// The delivery was settled already (ack, nack or dead-letter twice).
    AlreadySettled,
    /// The lease (ack deadline, visibility timeout, lock) expired before settlement.
    LeaseExpired,
    /// A received message is not a valid CloudEvent.
    Malformed,
    /// An earlier event with the same ordering key failed to publish; later ones are
    /// refused until the key is resumed, so that the key's order holds.
    OrderingKeyPaused,
    /// The provider (or the cargo feature needed for it) does not support this.
    Unsupported,
    /// Anything else; see the source.
    Internal,
}

impl ErrorKind {
    /// Whether an operation failing with this kind may succeed when tried again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Throttled
                | ErrorKind::Unavailable
                | ErrorKind::Timeout
                | ErrorKind::ResourceExhausted
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Throttled => "throttled",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Closed => "closed",
            ErrorKind::AlreadySettled => "already settled",
            ErrorKind::LeaseExpired => "lease expired",
            ErrorKind::Malformed => "malformed message",
            ErrorKind::OrderingKeyPaused => "ordering key paused",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal error",
        };
        f.write_str(s)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// The source as kept: shared, so that a clone (one batch failure handed to each of
/// its events) keeps it too.
type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The cloudbus error: a portable kind, a message, and the provider error as `source`.
///
/// Messages never carry secrets: providers must not put keys, connection strings or
/// tokens in them.
///
/// A clone keeps the kind, the message and the source (shared):
///
/// ```
/// use cloudbus_driver::{Error, ErrorKind};
/// let e = Error::with_source(ErrorKind::Unavailable, "send", std::io::Error::other("reset"));
/// let each = e.clone();
/// assert_eq!(each.message(), "send");
/// assert!(each.source_as::<std::io::Error>().is_some());
/// ```
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<SharedError>,
}

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error of `kind` that keeps the underlying provider error as its source.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(SharedError::from(source.into())),
        }
    }

    /// The portable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying again may succeed (throttling, unavailability, timeouts, full buffers).
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// Shorthand constructors for the common kinds.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// An [`ErrorKind::InvalidArgument`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    /// An [`ErrorKind::Closed`] error.
    pub fn closed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Closed, message)
    }
    /// An [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Downcast the provider error kept as the source, if it is an `E`.
    pub fn source_as<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.source.as_deref().and_then(|s| s.downcast_ref::<E>())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::with_source(ErrorKind::InvalidArgument, "JSON error", e)
    }
}

/// Reads the answer of a call that fails with [`ErrorKind::NotFound`] when what it
/// asks for is missing (a describe, a lookup): missing is `Ok(None)`, any other
/// failure stays an error.
///
/// ```
/// use cloudbus_driver::{Error, Missing, Result};
/// let missing: Result<u32> = Err(Error::not_found("no such topic"));
/// assert_eq!(missing.missing_as_none().unwrap(), None);
/// let refused: Result<u32> = Err(Error::invalid("bad name"));
/// assert!(refused.missing_as_none().is_err());
/// ```
pub trait Missing<T> {
    /// `Ok(Some(value))`, `Ok(None)` for `NotFound`, else the error.
    fn missing_as_none(self) -> Result<Option<T>>;
}

impl<T> Missing<T> for Result<T> {
    fn missing_as_none(self) -> Result<Option<T>> {
        match self {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_kinds() {
        assert!(Error::new(ErrorKind::Unavailable, "x").is_retryable());
        assert!(!Error::not_found("x").is_retryable());
        assert!(!Error::new(ErrorKind::TooLarge, "x").is_retryable());
    }

    #[test]
    fn source_is_kept_and_downcastable() {
        let io = std::io::Error::other("boom");
        let e = Error::with_source(ErrorKind::Unavailable, "send failed", io);
        assert!(e.source_as::<std::io::Error>().is_some());
        assert_eq!(e.to_string(), "unavailable: send failed");
        // Issue 14: a clone flattened the source into its message and lost it.
        let clone = e.clone();
        assert_eq!(clone.message(), "send failed");
        assert_eq!(
            clone.source_as::<std::io::Error>().map(|s| s.to_string()),
            Some("boom".to_owned())
        );
        assert!(std::error::Error::source(&clone).is_some());
    }
}
