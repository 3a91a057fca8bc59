//! Reading a provider URL's parameters and environment, the one way every provider
//! does it: the parameters a scheme knows are named once, an unknown one is the same
//! `InvalidArgument` everywhere (naming the known ones), and environment variables
//! count only when set and not blank.

use std::str::FromStr;

use crate::error::{Error, Result};

/// The query parameters of a provider URL, checked against the ones its scheme
/// knows.
///
/// ```
/// use cloudbus_driver::config::UrlParams;
/// let url = url::Url::parse("pubsub://demo?mode=structured&limit=5").unwrap();
/// let params = UrlParams::parse(&url, &["mode", "limit", "endpoint"]).unwrap();
/// assert_eq!(params.get("mode"), Some("structured"));
/// assert_eq!(params.parsed::<u32>("limit").unwrap(), Some(5));
/// assert_eq!(params.get("endpoint"), None);
///
/// let url = url::Url::parse("pubsub://demo?colour=red").unwrap();
/// let e = UrlParams::parse(&url, &["mode"]).unwrap_err();
/// assert_eq!(e.to_string(), r#"invalid argument: unknown pubsub:// URL parameter "colour" (known: mode)"#);
/// ```
#[derive(Clone, Debug)]
pub struct UrlParams {
    scheme: String,
    values: Vec<(String, String)>,
}

impl UrlParams {
    /// The parameters of `url`; one not in `known` (or given twice) is
    /// `InvalidArgument`.
    pub fn parse(url: &url::Url, known: &[&str]) -> Result<Self> {
        let scheme = url.scheme().to_owned();
        let mut values: Vec<(String, String)> = Vec::new();
        for (name, value) in url.query_pairs() {
            if !known.contains(&name.as_ref()) {
                return Err(Error::invalid(format!(
                    "unknown {scheme}:// URL parameter {:?} (known: {})",
                    name.as_ref(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            if values.iter().any(|(n, _)| n == name.as_ref()) {
                return Err(Error::invalid(format!(
                    "{scheme}:// URL parameter {:?} is given twice",
                    name.as_ref()
                )));
            }
            values.push((name.into_owned(), value.into_owned()));
        }
        Ok(UrlParams { scheme, values })
    }

    /// The value of parameter `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of parameter `name` parsed as `T`; a value that does not parse is
    /// `InvalidArgument`, naming the parameter and the value.
    pub fn parsed<T: FromStr>(&self, name: &str) -> Result<Option<T>> {
        match self.get(name) {
            None => Ok(None),
            Some(text) => text.parse::<T>().map(Some).map_err(|_| {
                Error::invalid(format!(
                    "{}:// URL parameter {name}={text:?} is not a valid {}",
                    self.scheme,
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// The value of parameter `name`, which must be one of `choices`.
    ///
    /// ```
    /// use cloudbus_driver::config::UrlParams;
    /// let url = url::Url::parse("sns://?mode=fancy").unwrap();
    /// let params = UrlParams::parse(&url, &["mode"]).unwrap();
    /// assert!(params.choice("mode", &["binary", "structured"]).is_err());
    /// ```
    pub fn choice(&self, name: &str, choices: &[&'static str]) -> Result<Option<&'static str>> {
        match self.get(name) {
            None => Ok(None),
            Some(text) => choices
                .iter()
                .find(|c| **c == text)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "{}:// URL parameter {name} must be one of {}, not {text:?}",
                        self.scheme,
                        choices.join(", ")
                    ))
                }),
        }
    }

    /// The value of `true`/`false` parameter `name`.
    pub fn flag(&self, name: &str) -> Result<Option<bool>> {
        Ok(self
            .choice(name, &["true", "false"])?
            .map(|value| value == "true"))
    }
}

/// The value of environment variable `name` when it is set and not blank.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str, known: &[&str]) -> Result<UrlParams> {
        UrlParams::parse(&url::Url::parse(url).unwrap(), known)
    }

    #[test]
    fn unknown_and_repeated_parameters_are_invalid() {
        let e = params("sqs://?x=1", &[]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        assert!(e.message().contains("(known: none)"), "{e}");
        let e = params("sqs://?region=a&region=b", &["region"]).unwrap_err();
        assert!(e.message().contains("given twice"), "{e}");
    }

    #[test]
    fn values_parse_or_say_which_parameter_is_wrong() {
        let p = params(
            "eventbridge://?archive_days=x&sessions=yes",
            &["archive_days", "sessions"],
        )
        .unwrap();
        let e = p.parsed::<u32>("archive_days").unwrap_err();
        assert!(e.message().contains("archive_days=\"x\""), "{e}");
        assert!(p.flag("sessions").is_err());
        let p = params("servicebus://?sessions=true", &["sessions"]).unwrap();
        assert_eq!(p.flag("sessions").unwrap(), Some(true));
        assert_eq!(p.flag("absent").unwrap(), None);
    }
}
