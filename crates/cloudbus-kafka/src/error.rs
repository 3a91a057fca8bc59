//! librdkafka's errors as cloudbus errors: every client call's error mapped onto the
//! portable kinds once (the client error kept as the source), so that a retry layer
//! in core decides from the kind alone.

use cloudbus_driver::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The portable kind of a librdkafka error code.
pub(crate) fn kind_of_code(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => ErrorKind::NotFound,
        C::TopicAlreadyExists => ErrorKind::AlreadyExists,
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => ErrorKind::TooLarge,
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::DelegationTokenAuthorizationFailed => ErrorKind::PermissionDenied,
        C::QueueFull => ErrorKind::ResourceExhausted,
        C::ThrottlingQuotaExceeded => ErrorKind::Throttled,
        C::RequestTimedOut | C::MessageTimedOut | C::OperationTimedOut => ErrorKind::Timeout,
        C::InvalidTopic
        | C::InvalidArgument
        | C::InvalidConfig
        | C::InvalidRequest
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::PolicyViolation
        | C::InvalidRecord
        | C::InvalidMessageSize
        | C::InvalidMessage => ErrorKind::InvalidArgument,
        // A call the broker does not have: asking again does not help.
        C::UnsupportedFeature | C::UnsupportedVersion => ErrorKind::Unsupported,
        C::Fatal | C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch => ErrorKind::Internal,
        // Leaders moving, brokers down, coordinators loading, rebalances, transport
        // errors: what librdkafka reports as retriable, and what the idempotent
        // producer already retried until its delivery timeout.
        _ => ErrorKind::Unavailable,
    }
}

/// Maps an rdkafka error onto the portable kinds, keeping it as the source; `what`
/// says which call failed (it never holds a credential: settings are not in it).
pub(crate) fn kafka_error(e: KafkaError, what: &str) -> Error {
    // librdkafka's refusal of a setting quotes its value: never a secret's.
    if let KafkaError::ClientConfig(_, _, key, _) = &e
        && crate::config::is_secret_setting(key)
    {
        return Error::invalid(format!(
            "{what}: librdkafka refused the value of {key} (not shown: it is a secret)"
        ));
    }
    let kind = match &e {
        KafkaError::ClientConfig(..) => ErrorKind::InvalidArgument,
        KafkaError::ClientCreation(_) => ErrorKind::InvalidArgument,
        KafkaError::Canceled => ErrorKind::Closed,
        KafkaError::Nul(_) => ErrorKind::InvalidArgument,
        KafkaError::Subscription(_) | KafkaError::Seek(_) | KafkaError::PauseResume(_) => {
            ErrorKind::Unavailable
        }
        KafkaError::AdminOpCreation(_) => ErrorKind::InvalidArgument,
        KafkaError::NoMessageReceived | KafkaError::PartitionEOF(_) => ErrorKind::Unavailable,
        other => other
            .rdkafka_error_code()
            .map(kind_of_code)
            .unwrap_or(ErrorKind::Internal),
    };
    Error::with_source(kind, format!("{what}: {e}"), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_secret_setting_is_not_quoted() {
        let refused = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"hunter2\" for configuration property".into(),
            "sasl.oauthbearer.client.secret".into(),
            "hunter2".into(),
        );
        let e = kafka_error(refused, "create the Kafka producer");
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let plain = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value".into(),
            "linger.ms".into(),
            "x".into(),
        );
        assert!(
            kafka_error(plain, "create")
                .to_string()
                .contains("linger.ms")
        );
    }

    #[test]
    fn codes_map_onto_portable_kinds() {
        let cases = [
            (
                RDKafkaErrorCode::UnknownTopicOrPartition,
                ErrorKind::NotFound,
            ),
            (RDKafkaErrorCode::MessageSizeTooLarge, ErrorKind::TooLarge),
            (
                RDKafkaErrorCode::NotLeaderForPartition,
                ErrorKind::Unavailable,
            ),
            (RDKafkaErrorCode::RequestTimedOut, ErrorKind::Timeout),
            (RDKafkaErrorCode::MessageTimedOut, ErrorKind::Timeout),
            (
                RDKafkaErrorCode::TopicAuthorizationFailed,
                ErrorKind::PermissionDenied,
            ),
            (
                RDKafkaErrorCode::SaslAuthenticationFailed,
                ErrorKind::PermissionDenied,
            ),
            (
                RDKafkaErrorCode::BrokerTransportFailure,
                ErrorKind::Unavailable,
            ),
            (RDKafkaErrorCode::QueueFull, ErrorKind::ResourceExhausted),
        ];
        for (code, kind) in cases {
            assert_eq!(kind_of_code(code), kind, "{code:?}");
        }
        let e = kafka_error(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "send to orders",
        );
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert!(!e.is_retryable());
        assert!(e.message().starts_with("send to orders: "), "{e}");
        let e = kafka_error(
            KafkaError::MessageProduction(RDKafkaErrorCode::NotLeaderForPartition),
            "send",
        );
        assert!(e.is_retryable(), "{e}");
    }
}
