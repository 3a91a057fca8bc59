//! AWS for cloudbus, on the official `aws-sdk-*` crates and `aws-config`: the standard
//! credential chain and region, and `AWS_ENDPOINT_URL` honoured (LocalStack).
//!
//! Today: Amazon SQS, standard and FIFO queues (feature `sqs`), and SNS with SQS
//! subscriptions (feature `sns`), EventBridge with SQS-targeted rules (feature
//! `eventbridge`), and Kinesis Data Streams (feature `kinesis`).
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::{EventBuilder, SubscriptionSpec};
//! let bus = cloudbus_aws::connect("sqs://").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "orders").max_delivery_attempts(5)).await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "eventbridge")]
pub mod eventbridge;
#[cfg(feature = "kinesis")]
pub mod kinesis;
#[cfg(feature = "sns")]
pub mod sns;
#[cfg(feature = "sqs")]
pub mod sqs;

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use cloudbus_core::{BatchResults, Bus, Error, ErrorKind, Result};

/// The environment variable of the AWS SDKs that points every service at one
/// endpoint (LocalStack: `http://127.0.0.1:4566`).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL";

/// Loads the shared AWS configuration: credentials chain, region (`?region=` wins),
/// and endpoint (`?endpoint=` wins over `AWS_ENDPOINT_URL`). `service_params` are
/// the other parameters the scheme knows (read by its caller); any other parameter is
/// an `InvalidArgument`.
pub(crate) async fn load_config(
    url: &url::Url,
    service_params: &[&str],
) -> Result<aws_config::SdkConfig> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "region" => loader = loader.region(aws_config::Region::new(v.into_owned())),
            "endpoint" => loader = loader.endpoint_url(v.into_owned()),
            known if service_params.contains(&known) => {}
            other => {
                return Err(Error::invalid(format!(
                    "unknown {}:// URL parameter {other:?} (known: region, endpoint{})",
                    url.scheme(),
                    service_params
                        .iter()
                        .map(|p| format!(", {p}"))
                        .collect::<String>()
                )));
            }
        }
    }
    Ok(loader.load().await)
}

/// The value of URL parameter `name`, if given.
#[allow(dead_code)]
pub(crate) fn url_param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// How a portable filter becomes an AWS content pattern: the grammar EventBridge event
/// patterns and SNS filter policies (both scopes) share (`prefix`, `exists`,
/// `anything-but`, `numeric`, `$or`).
#[cfg(any(feature = "sns", feature = "eventbridge"))]
pub(crate) struct PatternRules<'a> {
    /// The target, named in errors ("an EventBridge pattern").
    pub what: &'a str,
    /// Put before each attribute name (`ce-` for SNS message attributes).
    pub key_prefix: &'a str,
    /// Whether the values compare as numbers; when not, a numeric range is
    /// `Unsupported`.
    pub numeric: bool,
}

/// Compiles a portable filter to an AWS content pattern by `rules`. Two conditions on
/// one attribute inside an AND have no pattern form: a typed `Unsupported` error.
#[cfg(any(feature = "sns", feature = "eventbridge"))]
pub(crate) fn content_pattern(
    filter: &cloudbus_core::Filter,
    rules: &PatternRules<'_>,
) -> Result<serde_json::Value> {
    use cloudbus_core::Filter;
    use serde_json::{Map, Value, json};
    let key = |a: &str| format!("{}{a}", rules.key_prefix);
    Ok(match filter {
        Filter::Equals { attribute, values } => json!({ key(attribute): values }),
        Filter::Prefix { attribute, prefix } => {
            json!({ key(attribute): [{ "prefix": prefix }] })
        }
        Filter::Exists { attribute, present } => {
            json!({ key(attribute): [{ "exists": present }] })
        }
        Filter::AnythingBut { attribute, values } => {
            json!({ key(attribute): [{ "anything-but": values }] })
        }
        Filter::Range { attribute, .. } if !rules.numeric => {
            return Err(Error::unsupported(format!(
                "{} cannot compare the String attribute {attribute:?} numerically; filter it \
                 in the consumer (ConsumerOptions::filter)",
                rules.what
            )));
        }
        Filter::Range {
            attribute,
            min,
            max,
        } => {
            let mut bounds = Vec::new();
            if let Some(m) = min {
                bounds.push(json!(">="));
                bounds.push(json!(m));
            }
            if let Some(m) = max {
                bounds.push(json!("<="));
                bounds.push(json!(m));
            }
            if bounds.is_empty() {
                json!({ key(attribute): [{ "exists": true }] })
            } else {
                json!({ key(attribute): [{ "numeric": bounds }] })
            }
        }
        Filter::And(fs) => {
            let mut all = Map::new();
            for f in fs {
                let Value::Object(part) = content_pattern(f, rules)? else {
                    continue;
                };
                for (k, v) in part {
                    if all.contains_key(&k) {
                        return Err(Error::unsupported(format!(
                            "{} cannot AND two conditions on {k:?}",
                            rules.what
                        )));
                    }
                    all.insert(k, v);
                }
            }
            Value::Object(all)
        }
        Filter::Or(fs) => json!({
            "$or": fs.iter().map(|f| content_pattern(f, rules)).collect::<Result<Vec<_>>>()?
        }),
    })
}

/// The schemes this crate opens, those of its enabled features: `sqs://`, `sns://`
/// (`?mode=structured`), `eventbridge://` (`?archive_days=N`) and `kinesis://`.
pub fn schemes() -> Vec<cloudbus_core::scheme::Scheme> {
    use cloudbus_core::scheme::Scheme;
    let mut schemes = Vec::new();
    #[cfg(feature = "sqs")]
    schemes.push(Scheme {
        name: "sqs",
        open: |url| {
            Box::pin(async move { Ok(sqs::SqsBus::new(&load_config(&url, &[]).await?).into_bus()) })
        },
    });
    #[cfg(feature = "sns")]
    schemes.push(Scheme {
        name: "sns",
        open: |url| Box::pin(open_sns(url)),
    });
    #[cfg(feature = "kinesis")]
    schemes.push(Scheme {
        name: "kinesis",
        open: |url| {
            Box::pin(async move {
                Ok(kinesis::KinesisBus::new(&load_config(&url, &[]).await?).into_bus())
            })
        },
    });
    #[cfg(feature = "eventbridge")]
    schemes.push(Scheme {
        name: "eventbridge",
        open: |url| Box::pin(open_eventbridge(url)),
    });
    schemes
}

/// Opens an AWS URL (one of [`schemes`]) as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    cloudbus_core::scheme::open(&schemes(), url).await
}

#[cfg(feature = "sns")]
async fn open_sns(url: url::Url) -> Result<Bus> {
    let bus = sns::SnsBus::new(&load_config(&url, &["mode"]).await?);
    match url_param(&url, "mode").as_deref() {
        None | Some("binary") => Ok(bus.into_bus()),
        Some("structured") => Ok(bus.structured().into_bus()),
        Some(other) => Err(Error::invalid(format!(
            "sns:// mode must be binary or structured, not {other:?}"
        ))),
    }
}

#[cfg(feature = "eventbridge")]
async fn open_eventbridge(url: url::Url) -> Result<Bus> {
    let bus = eventbridge::EventBridgeBus::new(&load_config(&url, &["archive_days"]).await?);
    match url_param(&url, "archive_days") {
        None => Ok(bus.into_bus()),
        Some(days) => {
            let days = days.parse::<u32>().map_err(|_| {
                Error::invalid(format!(
                    "eventbridge:// archive_days must be a number of days, not {days:?}"
                ))
            })?;
            Ok(bus.with_archive(days).into_bus())
        }
    }
}

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

/// The per-entry results of one batch call, filled in as the service reports them.
pub(crate) type Slots = Vec<Option<Result<()>>>;

/// Empty slots for a batch of `n`.
#[allow(dead_code)]
pub(crate) fn slots(n: usize) -> Slots {
    (0..n).map(|_| None).collect()
}

/// Records the outcome of the entry with batch id `id` (its index in the batch).
#[allow(dead_code)]
pub(crate) fn report(slots: &mut Slots, id: &str, outcome: Result<()>) {
    if let Some(slot) = id.parse::<usize>().ok().and_then(|i| slots.get_mut(i)) {
        *slot = Some(outcome);
    }
}

/// The batch results, an entry the service did not report being an error.
#[allow(dead_code)]
pub(crate) fn finish(slots: Slots, service: &str) -> BatchResults {
    slots
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Internal,
                    format!("{service} did not report this entry"),
                ))
            })
        })
        .collect()
}

#[cfg(all(
    test,
    feature = "sqs",
    feature = "sns",
    feature = "eventbridge",
    feature = "kinesis"
))]
mod tests {
    use super::*;

    /// Issue 12 item 16: one credential error mapped to three kinds in three services.
    #[test]
    fn common_codes_have_one_kind_in_every_service() {
        for kind_of in [
            sqs::kind_of_code,
            sns::kind_of_code,
            eventbridge::kind_of_code,
            kinesis::kind_of_code,
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
