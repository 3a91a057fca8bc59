//! The stores' errors in cloudbus terms: a database or Redis that is away, busy or
//! restarting is `Unavailable` (retryable: the worker and the stream reader back off
//! and try again); anything else is `Internal`, with the driver's error as the source.
//! Classified by the drivers' error types and the databases' error codes, never by
//! message text.

use cloudbus_driver::{Error, ErrorKind};

/// A sqlx error from `what` (an operation, named in the message).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn from_sqlx(what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => ErrorKind::Unavailable,
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::Database(db) => database_kind(db.code().as_deref()),
        _ => ErrorKind::Internal,
    };
    Error::with_source(kind, format!("{what}: {e}"), e)
}

/// The kind of a database error by its code: PostgreSQL's SQLSTATE, SQLite's
/// (extended) result code.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn database_kind(code: Option<&str>) -> ErrorKind {
    let Some(code) = code else {
        return ErrorKind::Internal;
    };
    match code {
        // PostgreSQL: serialization failure, deadlock, lock not available.
        "40001" | "40P01" | "55P03" => ErrorKind::Unavailable,
        // PostgreSQL: operator intervention (admin shutdown, crash shutdown, cannot
        // connect now), e.g. a server restarting.
        c if c.starts_with("57P") => ErrorKind::Unavailable,
        // PostgreSQL class 08: connection exception.
        c if c.starts_with("08") => ErrorKind::Unavailable,
        // PostgreSQL class 53: insufficient resources (too many connections, disk full).
        c if c.starts_with("53") => ErrorKind::ResourceExhausted,
        // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes
        // (the low byte is the primary code).
        c => match c.parse::<u32>() {
            Ok(n) if matches!(n & 0xff, 5 | 6) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        },
    }
}

/// A Redis error from `what`.
#[cfg(feature = "redis")]
pub(crate) fn from_redis(what: &str, e: redis::RedisError) -> Error {
    let kind = if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
    {
        ErrorKind::Unavailable
    } else {
        match e.kind() {
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
            | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
            | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown) => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        }
    };
    Error::with_source(kind, format!("{what}: {e}"), e)
}

#[cfg(all(test, any(feature = "postgres", feature = "sqlite")))]
mod tests {
    use super::database_kind;
    use cloudbus_driver::ErrorKind;

    #[test]
    fn database_codes_are_classified() {
        assert_eq!(database_kind(Some("40001")), ErrorKind::Unavailable);
        assert_eq!(database_kind(Some("57P01")), ErrorKind::Unavailable);
        assert_eq!(database_kind(Some("08006")), ErrorKind::Unavailable);
        assert_eq!(database_kind(Some("53300")), ErrorKind::ResourceExhausted);
        assert_eq!(database_kind(Some("23505")), ErrorKind::Internal);
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT (517), SQLITE_LOCKED.
        assert_eq!(database_kind(Some("5")), ErrorKind::Unavailable);
        assert_eq!(database_kind(Some("517")), ErrorKind::Unavailable);
        assert_eq!(database_kind(Some("6")), ErrorKind::Unavailable);
        assert_eq!(database_kind(Some("19")), ErrorKind::Internal);
        assert_eq!(database_kind(None), ErrorKind::Internal);
    }
}
