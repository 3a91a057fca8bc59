//! The shared AWS configuration a URL opens: the SDKs' credential chain and region,
//! `?region=` and `?endpoint=` (or `AWS_ENDPOINT_URL`).

#[cfg(any(feature = "sqs", feature = "kinesis"))]
use cloudbus_driver::config::UrlParams;

/// The environment variable of the AWS SDKs that points every service at one
/// endpoint (LocalStack: `http://127.0.0.1:4566`).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL";

/// Loads the shared AWS configuration of a URL's parameters (parsed by its scheme,
/// which names `region` and `endpoint` among those it knows): credentials chain,
/// region (`?region=` wins), and endpoint (`?endpoint=` wins over `AWS_ENDPOINT_URL`).
#[cfg(any(feature = "sqs", feature = "kinesis"))]
pub(crate) async fn load_config(params: &UrlParams) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = params.get("region") {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(endpoint) = params.get("endpoint") {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
