//! AWS errors as cloudbus errors: any SDK call's error mapped onto the portable kinds
//! (kept as the source), and the one table of the error codes every AWS service
//! shares, which each service's own table consults first.

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use cloudbus_driver::{Error, ErrorKind};

/// Maps an error of any AWS SDK call onto the portable kinds, keeping it as the
/// source; `kind_of_code` reads the service's error code (each service names its
/// errors its own way).
#[allow(dead_code)]
pub(crate) fn sdk_error<E, R>(
    e: SdkError<E, R>,
    kind_of_code: fn(&str) -> ErrorKind,
    what: &str,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let (kind, detail) = match &e {
        SdkError::TimeoutError(_) => (ErrorKind::Timeout, "timed out".to_owned()),
        SdkError::DispatchFailure(_) => (
            ErrorKind::Unavailable,
            "could not reach the endpoint".to_owned(),
        ),
        SdkError::ResponseError(_) => (ErrorKind::Unavailable, "bad response".to_owned()),
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("unknown");
            (
                kind_of_code(code),
                format!("{code}: {}", err.message().unwrap_or_default()),
            )
        }
        // A request that could not be built: trying again does not help.
        _ => (ErrorKind::Internal, e.to_string()),
    };
    Error::with_source(kind, format!("{what}: {detail}"), e)
}

/// The kind of the error codes every AWS service shares (the common errors of the AWS
/// API reference: credentials, signing, throttling, server faults), so that one
/// credential error is one kind whichever service said it. `None` for a
/// service-specific code. Checked before each service's own table.
#[allow(dead_code)]
pub(crate) fn common_kind(code: &str) -> Option<ErrorKind> {
    Some(match code {
        "AccessDenied"
        | "AccessDeniedException"
        | "AuthorizationError"
        | "IncompleteSignature"
        | "InvalidClientTokenId"
        | "InvalidSecurity"
        | "MissingAuthenticationToken"
        | "NotAuthorized"
        | "OptInRequired"
        | "SignatureDoesNotMatch"
        | "UnrecognizedClientException" => ErrorKind::PermissionDenied,
        // A token or a signed request that expired: the credential chain refreshes
        // and a new request succeeds.
        "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => ErrorKind::Unavailable,
        "InternalFailure"
        | "InternalError"
        | "InternalErrorException"
        | "InternalException"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => ErrorKind::Unavailable,
        "Throttling"
        | "ThrottlingException"
        | "ThrottledException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "RequestThrottled"
        | "KMSThrottlingException"
        | "KMS.ThrottlingException" => ErrorKind::Throttled,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12 item 16: one credential error mapped to three kinds in three services.
    #[cfg(all(
        feature = "sqs",
        feature = "sns",
        feature = "eventbridge",
        feature = "kinesis"
    ))]
    #[test]
    fn common_codes_have_one_kind_in_every_service() {
        for kind_of in [
            crate::sqs::kind_of_code,
            crate::sns::kind_of_code,
            crate::eventbridge::kind_of_code,
            crate::kinesis::kind_of_code,
        ] {
            assert_eq!(kind_of("InvalidClientTokenId"), ErrorKind::PermissionDenied);
            assert_eq!(
                kind_of("UnrecognizedClientException"),
                ErrorKind::PermissionDenied
            );
            assert!(kind_of("InternalFailure").is_retryable());
            assert!(kind_of("ExpiredToken").is_retryable());
            assert_eq!(kind_of("SomethingNobodyKnows"), ErrorKind::Internal);
        }
    }
}
