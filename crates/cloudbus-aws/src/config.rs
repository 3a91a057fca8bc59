//! The shared AWS configuration a URL opens: the SDKs' credential chain and region,
//! `?region=` and `?endpoint=` (or `AWS_ENDPOINT_URL`), and the URL's own parameters.

use cloudbus_core::{Error, Result};

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
