//! Service Bus errors as portable kinds, read from what fe2o3-amqp reports: the AMQP
//! error condition symbols the service sends (`amqp:not-found`,
//! `com.microsoft:message-lock-lost`, …), the management API's status codes, and
//! fe2o3's own [`ErrorRecovery`] for the state of a link, session or connection. No
//! error text is read; a condition this module does not know is not retryable.

use fe2o3_amqp::link::{
    ErrorRecovery, LinkStateError, ReceiverAttachError, RecvError, SendError, SenderAttachError,
    SessionStopReason,
};
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp_management::error::Error as ManagementError;

use cloudbus_driver::{Error, ErrorKind};

/// What a failed operation means for the AMQP objects under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Only the operation (or the one message) failed; the link is usable.
    Operation,
    /// The link is gone: open a new one.
    Link,
    /// The connection (or its session) is gone: open a new connection.
    Connection,
}

impl From<ErrorRecovery> for Scope {
    fn from(recovery: ErrorRecovery) -> Self {
        match recovery {
            ErrorRecovery::UseLink => Scope::Operation,
            ErrorRecovery::ReconnectSession | ErrorRecovery::ReconnectConnection => {
                Scope::Connection
            }
            // ReattachLink, NewLink and any later variant: a new link.
            _ => Scope::Link,
        }
    }
}

/// A portable error and what it leaves usable.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: Error,
    pub scope: Scope,
}

impl Failure {
    fn new(kind: ErrorKind, scope: Scope, message: String, source: impl Into<Source>) -> Self {
        let error = match source.into() {
            Source::Error(e) => Error::with_source(kind, message, e),
            Source::None => Error::new(kind, message),
        };
        Failure { error, scope }
    }
}

/// The source an error keeps, when there is one.
pub(crate) enum Source {
    Error(Box<dyn std::error::Error + Send + Sync + 'static>),
    None,
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Source {
    fn from(e: E) -> Self {
        Source::Error(Box::new(e))
    }
}

/// The symbol of an AMQP error condition, as it is on the wire.
pub(crate) fn condition_symbol(condition: &ErrorCondition) -> String {
    match serde_amqp::to_value(condition) {
        Ok(Value::Symbol(s)) => s.0,
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The portable kind of an AMQP error condition that Service Bus (or AMQP itself)
/// defines; `Internal` (not retryable) for any other.
pub(crate) fn kind_of_condition(symbol: &str) -> ErrorKind {
    match symbol {
        "amqp:not-found"
        | "com.microsoft:message-not-found"
        | "com.microsoft:session-not-found" => ErrorKind::NotFound,
        "amqp:unauthorized-access" | "com.microsoft:publisher-revoked" => {
            ErrorKind::PermissionDenied
        }
        "com.microsoft:message-lock-lost" | "com.microsoft:session-lock-lost" => {
            ErrorKind::LeaseExpired
        }
        "amqp:link:message-size-exceeded" => ErrorKind::TooLarge,
        "com.microsoft:server-busy" => ErrorKind::Throttled,
        "amqp:resource-limit-exceeded" => ErrorKind::ResourceExhausted,
        "com.microsoft:timeout" | "com.microsoft:operation-cancelled" => ErrorKind::Timeout,
        "amqp:internal-error"
        | "amqp:connection:forced"
        | "amqp:connection:framing-error"
        | "amqp:connection:redirect"
        | "amqp:link:detach-forced"
        | "amqp:link:stolen"
        | "amqp:link:redirect"
        | "amqp:link:transfer-limit-exceeded"
        | "amqp:session:window-violation"
        | "amqp:session:errant-link"
        | "amqp:session:handle-in-use"
        | "amqp:session:unattached-handle"
        | "com.microsoft:store-lock-lost"
        | "com.microsoft:session-cannot-be-locked"
        | "com.microsoft:partition-not-owned" => ErrorKind::Unavailable,
        "amqp:not-allowed"
        | "amqp:invalid-field"
        | "amqp:decode-error"
        | "amqp:precondition-failed"
        | "amqp:not-implemented"
        | "com.microsoft:argument-error"
        | "com.microsoft:argument-out-of-range" => ErrorKind::InvalidArgument,
        "com.microsoft:message-already-settled" => ErrorKind::AlreadySettled,
        "com.microsoft:entity-already-exists" => ErrorKind::AlreadyExists,
        _ => ErrorKind::Internal,
    }
}

/// A failure from an AMQP error the peer sent.
fn from_amqp(e: &definitions::Error, scope: Scope, what: &str) -> Failure {
    let symbol = condition_symbol(&e.condition);
    let description = e.description.as_deref().unwrap_or("");
    Failure::new(
        kind_of_condition(&symbol),
        scope,
        format!("{what}: {symbol}: {description}"),
        Source::None,
    )
}

/// A session or connection that stopped: with the peer's error when it sent one,
/// else unavailable (a dropped connection).
fn from_stop(reason: &SessionStopReason, what: &str) -> Failure {
    use fe2o3_amqp::connection::ConnectionStopReason as C;
    let error = match reason {
        SessionStopReason::EndedWithError(e) | SessionStopReason::RemoteEndedWithError(e) => {
            Some(e)
        }
        SessionStopReason::ConnectionStopped(C::ClosedWithError(e))
        | SessionStopReason::ConnectionStopped(C::RemoteClosedWithError(e)) => Some(e),
        _ => None,
    };
    match error {
        Some(e) => {
            let mut f = from_amqp(e, Scope::Connection, what);
            // Whatever the peer said, the connection is gone: trying again on a new
            // one may succeed, unless the peer refused us.
            if !matches!(
                f.error.kind(),
                ErrorKind::PermissionDenied | ErrorKind::NotFound
            ) {
                f.error = Error::new(ErrorKind::Unavailable, f.error.message());
            }
            f
        }
        None => Failure::new(
            ErrorKind::Unavailable,
            Scope::Connection,
            format!("{what}: the AMQP connection ended ({reason:?})"),
            Source::None,
        ),
    }
}

fn from_link_state(e: LinkStateError, what: &str) -> Failure {
    let scope = Scope::from(e.recovery());
    match &e {
        LinkStateError::SessionStopped(reason) => from_stop(reason, what),
        LinkStateError::RemoteDetachedWithError(err)
        | LinkStateError::RemoteClosedWithError(err) => from_amqp(err, scope, what),
        _ => Failure::new(
            ErrorKind::Unavailable,
            scope,
            format!("{what}: the link ended"),
            e,
        ),
    }
}

/// A failed send.
pub(crate) fn from_send(e: SendError, what: &str) -> Failure {
    let scope = Scope::from(e.recovery());
    match e {
        SendError::LinkStateError(e) => from_link_state(e, what),
        SendError::Detached(e) => from_link_state(e.into(), what),
        SendError::MessageSizeExceeded(e) => Failure::new(
            ErrorKind::TooLarge,
            scope,
            format!("{what}: {e}"),
            Source::None,
        ),
        SendError::MessageEncodeError => Failure::new(
            ErrorKind::InvalidArgument,
            scope,
            format!("{what}: the message cannot be encoded as AMQP"),
            Source::None,
        ),
        other => unknown(other, scope, what),
    }
}

/// An error this module does not know: not retryable, its source kept.
fn unknown(e: impl std::error::Error + Send + Sync + 'static, scope: Scope, what: &str) -> Failure {
    Failure::new(ErrorKind::Internal, scope, format!("{what}: {e}"), e)
}

/// A failed receive.
pub(crate) fn from_recv(e: RecvError, what: &str) -> Failure {
    let scope = Scope::from(e.recovery());
    match e {
        RecvError::LinkStateError(e) => from_link_state(e, what),
        RecvError::MessageSizeExceeded(e) => Failure::new(
            ErrorKind::TooLarge,
            scope,
            format!("{what}: {e}"),
            Source::None,
        ),
        other => unknown(other, scope, what),
    }
}

/// A refused or failed link attach.
pub(crate) fn from_sender_attach(e: SenderAttachError, what: &str) -> Failure {
    match &e {
        SenderAttachError::RemoteClosedWithError(err) => from_amqp(err, Scope::Link, what),
        SenderAttachError::SessionStopped(reason) => from_stop(reason, what),
        _ => Failure::new(
            ErrorKind::Unavailable,
            Scope::Link,
            format!("{what}: {e}"),
            e,
        ),
    }
}

/// A refused or failed link attach.
pub(crate) fn from_receiver_attach(e: ReceiverAttachError, what: &str) -> Failure {
    match &e {
        ReceiverAttachError::RemoteClosedWithError(err) => from_amqp(err, Scope::Link, what),
        ReceiverAttachError::SessionStopped(reason) => from_stop(reason, what),
        _ => Failure::new(
            ErrorKind::Unavailable,
            Scope::Link,
            format!("{what}: {e}"),
            e,
        ),
    }
}

/// The portable kind of a management API status code.
pub(crate) fn kind_of_status(code: u16) -> ErrorKind {
    match code {
        400 => ErrorKind::InvalidArgument,
        401 | 403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::Timeout,
        409 => ErrorKind::AlreadyExists,
        // Gone: the lock (or the session's lock) is lost.
        410 => ErrorKind::LeaseExpired,
        413 => ErrorKind::TooLarge,
        429 => ErrorKind::Throttled,
        500 | 502 | 503 | 504 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// A failed management request (on `$management` or `$cbs`).
pub(crate) fn from_management(e: ManagementError, what: &str) -> Failure {
    match e {
        ManagementError::Send(e) => from_send(e, what),
        ManagementError::Recv(e) => from_recv(e, what),
        ManagementError::Status(status) => {
            let code = status.code.0.get();
            Failure::new(
                kind_of_status(code),
                Scope::Operation,
                format!(
                    "{what}: status {code}: {}",
                    status.description.as_deref().unwrap_or("")
                ),
                Source::None,
            )
        }
        ManagementError::Disposition(e) => Failure::new(
            ErrorKind::Unavailable,
            Scope::Link,
            format!("{what}: {e}"),
            e,
        ),
        other => unknown(other, Scope::Link, what),
    }
}

/// An operation that took longer than it may: the link is in an unknown state.
pub(crate) fn timed_out(what: &str, limit: std::time::Duration) -> Failure {
    Failure::new(
        ErrorKind::Timeout,
        Scope::Link,
        format!("{what} took longer than {limit:?}"),
        Source::None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::{AmqpError, LinkError};
    use fe2o3_amqp::types::primitives::Symbol;

    fn error(condition: ErrorCondition) -> definitions::Error {
        definitions::Error::new(condition, Some("x".to_owned()), None)
    }

    /// The condition symbols Service Bus sends map to the portable kinds; an unknown
    /// one is not retryable.
    #[test]
    fn conditions_are_classified_by_symbol() {
        for (condition, kind) in [
            (
                ErrorCondition::AmqpError(AmqpError::NotFound),
                ErrorKind::NotFound,
            ),
            (
                ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                ErrorKind::PermissionDenied,
            ),
            (
                ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded),
                ErrorKind::ResourceExhausted,
            ),
            (
                ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
                ErrorKind::TooLarge,
            ),
            (
                ErrorCondition::Custom(Symbol::from("com.microsoft:message-lock-lost")),
                ErrorKind::LeaseExpired,
            ),
            (
                ErrorCondition::Custom(Symbol::from("com.microsoft:session-lock-lost")),
                ErrorKind::LeaseExpired,
            ),
            (
                ErrorCondition::Custom(Symbol::from("com.microsoft:server-busy")),
                ErrorKind::Throttled,
            ),
            (
                ErrorCondition::Custom(Symbol::from("com.microsoft:something-new")),
                ErrorKind::Internal,
            ),
        ] {
            let symbol = condition_symbol(&condition);
            let f = from_amqp(&error(condition), Scope::Link, "test");
            assert_eq!(f.error.kind(), kind, "{symbol}");
        }
        assert!(!kind_of_condition("com.microsoft:something-new").is_retryable());
        assert_eq!(
            condition_symbol(&ErrorCondition::AmqpError(AmqpError::NotFound)),
            "amqp:not-found"
        );
    }

    /// A connection the peer closed is retryable on a new connection; one it closed
    /// because the credentials were refused is not.
    #[test]
    fn stopped_connections_are_retryable_unless_refused() {
        use fe2o3_amqp::connection::ConnectionStopReason as C;
        let forced = SessionStopReason::ConnectionStopped(C::RemoteClosedWithError(error(
            ErrorCondition::ConnectionError(definitions::ConnectionError::ConnectionForced),
        )));
        let f = from_stop(&forced, "test");
        assert_eq!(f.error.kind(), ErrorKind::Unavailable);
        assert_eq!(f.scope, Scope::Connection);
        let refused = SessionStopReason::RemoteEndedWithError(error(ErrorCondition::AmqpError(
            AmqpError::UnauthorizedAccess,
        )));
        assert_eq!(
            from_stop(&refused, "test").error.kind(),
            ErrorKind::PermissionDenied
        );
        let dropped = SessionStopReason::ConnectionStopped(C::Closed);
        assert_eq!(
            from_stop(&dropped, "test").error.kind(),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn management_statuses_are_classified() {
        assert_eq!(kind_of_status(410), ErrorKind::LeaseExpired);
        assert_eq!(kind_of_status(401), ErrorKind::PermissionDenied);
        assert_eq!(kind_of_status(503), ErrorKind::Unavailable);
        assert_eq!(kind_of_status(299), ErrorKind::Internal);
    }
}
