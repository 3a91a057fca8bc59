//! SQS errors as portable kinds: the service's error codes (after the codes every AWS
//! service shares), and the per-entry failures of batch calls.

use cloudbus_driver::{Error, ErrorKind};

/// The portable kind of an SQS error code.
pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    if let Some(kind) = crate::error::common_kind(code) {
        return kind;
    }
    match code {
        c if c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist") => {
            ErrorKind::NotFound
        }
        c if c.contains("QueueAlreadyExists") || c.contains("QueueNameExists") => {
            ErrorKind::AlreadyExists
        }
        c if c.contains("Throttl") || c.contains("OverLimit") || c.contains("RequestLimit") => {
            ErrorKind::Throttled
        }
        c if c.contains("PurgeQueueInProgress") => ErrorKind::Throttled,
        c if c.contains("AccessDenied")
            || c.contains("InvalidClientTokenId")
            || c.contains("UnrecognizedClient")
            || c.contains("InvalidSecurity")
            || c.contains("SignatureDoesNotMatch") =>
        {
            ErrorKind::PermissionDenied
        }
        c if c.contains("TooLong") => ErrorKind::TooLarge,
        c if c.contains("ReceiptHandleIsInvalid") || c.contains("MessageNotInflight") => {
            ErrorKind::LeaseExpired
        }
        c if c.contains("UnsupportedOperation") => ErrorKind::Unsupported,
        c if c.contains("ServiceUnavailable") || c.contains("InternalError") => {
            ErrorKind::Unavailable
        }
        c if c.contains("Invalid") || c.contains("Missing") || c.contains("Empty") => {
            ErrorKind::InvalidArgument
        }
        _ => ErrorKind::Internal,
    }
}

/// Reports the entries of one SQS batch call: the ids it accepted, and the failed
/// ones with their error codes.
pub(crate) fn report_batch<'a>(
    slots: &mut crate::batch::Slots,
    successful: impl Iterator<Item = &'a str>,
    failed: &[aws_sdk_sqs::types::BatchResultErrorEntry],
    what: &str,
) {
    for id in successful {
        crate::batch::report(slots, id, Ok(()));
    }
    for f in failed {
        let error = Error::new(
            entry_kind(f.code(), f.sender_fault()),
            format!("{what}: {}: {}", f.code(), f.message().unwrap_or_default()),
        );
        crate::batch::report(slots, f.id(), Err(error));
    }
}

/// The kind of a failed batch entry: SQS marks entries that failed through no fault of
/// the request with `SenderFault = false`; those are worth another try whatever their
/// code.
pub(crate) fn entry_kind(code: &str, sender_fault: bool) -> ErrorKind {
    let kind = kind_of_code(code);
    if !sender_fault && !kind.is_retryable() {
        ErrorKind::Unavailable
    } else {
        kind
    }
}

pub(crate) fn build_error(e: aws_sdk_sqs::error::BuildError) -> Error {
    Error::with_source(ErrorKind::InvalidArgument, "invalid SQS request", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_their_kinds() {
        assert_eq!(
            kind_of_code("AWS.SimpleQueueService.NonExistentQueue"),
            ErrorKind::NotFound
        );
        assert_eq!(kind_of_code("QueueDoesNotExist"), ErrorKind::NotFound);
        assert_eq!(kind_of_code("BatchEntryTooLong"), ErrorKind::TooLarge);
        assert_eq!(kind_of_code("ThrottlingException"), ErrorKind::Throttled);
        // Issue 12 item 16: server faults and expired tokens were permanent.
        for code in [
            "InternalFailure",
            "RequestExpired",
            "ExpiredToken",
            "ServiceUnavailable",
        ] {
            assert!(kind_of_code(code).is_retryable(), "{code}");
        }
        assert_eq!(entry_kind("SomethingNew", false), ErrorKind::Unavailable);
        assert_eq!(
            entry_kind("InvalidParameterValue", true),
            ErrorKind::InvalidArgument
        );

        assert_eq!(
            kind_of_code("ReceiptHandleIsInvalid"),
            ErrorKind::LeaseExpired
        );
    }
}
