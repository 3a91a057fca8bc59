//! Errors of the Azure HTTP APIs (Event Grid's publish API, the Service Bus management
//! API) as portable kinds: what an HTTP status means. (Service Bus's AMQP errors and
//! `$management` statuses are read in `servicebus/error.rs`.)

use cloudbus_driver::ErrorKind;

/// The error kind of an HTTP status of an Azure data-plane or management API.
pub(crate) fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        400 => ErrorKind::InvalidArgument,
        401 | 403 => ErrorKind::PermissionDenied,
        404 | 410 => ErrorKind::NotFound,
        409 => ErrorKind::AlreadyExists,
        413 => ErrorKind::TooLarge,
        429 => ErrorKind::Throttled,
        408 | 504 => ErrorKind::Timeout,
        s if s >= 500 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(kind_of_status(401), ErrorKind::PermissionDenied);
        assert_eq!(kind_of_status(403), ErrorKind::PermissionDenied);
        assert_eq!(kind_of_status(404), ErrorKind::NotFound);
        assert_eq!(kind_of_status(413), ErrorKind::TooLarge);
        assert_eq!(kind_of_status(429), ErrorKind::Throttled);
        assert_eq!(kind_of_status(503), ErrorKind::Unavailable);
        assert_eq!(kind_of_status(400), ErrorKind::InvalidArgument);
    }
}
