//! Google API errors as cloudbus errors: a call's gRPC status (or its transport
//! failure) mapped onto the portable kinds and kept as the source, and the errors of
//! the client's publisher and of confirmed acks.

use std::sync::Arc;

use cloudbus_driver::{Error, ErrorKind};
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::error::{AckError, PublishError};

/// The portable kind of a Google API error.
pub(crate) fn error_kind(err: &google_cloud_pubsub::Error) -> ErrorKind {
    if let Some(status) = err.status() {
        match status.code {
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::PermissionDenied | Code::Unauthenticated => ErrorKind::PermissionDenied,
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                ErrorKind::InvalidArgument
            }
            Code::ResourceExhausted => ErrorKind::Throttled,
            // Google's client libraries retry these (with DEADLINE_EXCEEDED and
            // RESOURCE_EXHAUSTED): INTERNAL and UNKNOWN are transient server faults.
            Code::Unavailable
            | Code::Aborted
            | Code::Cancelled
            | Code::Internal
            | Code::Unknown => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Unimplemented => ErrorKind::Unsupported,
            _ => ErrorKind::Internal,
        }
    } else if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_authentication() {
        ErrorKind::PermissionDenied
    } else if err.is_connect() || err.is_io() || err.is_transport() || err.is_exhausted() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    }
}

/// The message of a Google API error: the service's status message when there is one.
pub(crate) fn error_detail(err: &google_cloud_pubsub::Error) -> String {
    err.status()
        .map(|s| s.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| err.to_string())
}

/// Maps a Google API error onto the portable kinds, keeping it as the source.
pub(crate) fn map_error(err: google_cloud_pubsub::Error, what: &str) -> Error {
    Error::with_source(
        error_kind(&err),
        format!("{what}: {}", error_detail(&err)),
        err,
    )
}

/// Maps an error of the client's publisher (one publish of a batch).
pub(crate) fn publish_error(e: PublishError, what: &str) -> Error {
    match e {
        // The crate shares one error among the messages of a failed request.
        PublishError::Rpc(inner) => match Arc::try_unwrap(inner) {
            Ok(owned) => map_error(owned, what),
            Err(shared) => Error::new(
                error_kind(&shared),
                format!("{what}: {}", error_detail(&shared)),
            ),
        },
        PublishError::OrderingKeyPaused => Error::new(
            ErrorKind::OrderingKeyPaused,
            format!("{what}: publishing is paused for the ordering key"),
        ),
        PublishError::Shutdown => Error::closed(format!("{what}: the publisher has shut down")),
        other => Error::with_source(ErrorKind::Internal, what.to_owned(), other),
    }
}

/// Maps an error of a confirmed ack (exactly-once subscriptions).
pub(crate) fn ack_error(e: AckError) -> Error {
    match e {
        AckError::LeaseExpired => Error::new(
            ErrorKind::LeaseExpired,
            "the lease expired before the ack; the message will be redelivered",
        ),
        AckError::ShutdownBeforeAck => {
            Error::closed("the subscriber shut down before the ack was sent")
        }
        other => Error::with_source(ErrorKind::Unavailable, "the ack was not confirmed", other),
    }
}
