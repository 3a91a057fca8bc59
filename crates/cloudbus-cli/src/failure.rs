//! What goes wrong in a command, as one line and an exit code, and the helpers that
//! open a URL and bound a call to the broker by the `--timeout`.

use std::future::Future;
use std::time::Duration;

use cloudbus::{Bus, ErrorKind};

/// A failed command: its message and exit code (1: the operation failed, 2: bad
/// input).
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// Bad input: usage, a malformed value, an unreadable file.
    pub fn input(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 2,
        }
    }

    /// The operation failed.
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 1,
        }
    }

    /// `what` failed with the SDK's `error`: bad input for its kinds that say so,
    /// else a failed operation.
    pub fn of(what: &str, error: &cloudbus::Error) -> Self {
        let message = format!("{what}: {error}");
        match error.kind() {
            ErrorKind::InvalidArgument | ErrorKind::Unsupported | ErrorKind::Malformed => {
                Failure::input(message)
            }
            _ => Failure::failed(message),
        }
    }

    /// The message on one line (a provider's message may hold newlines).
    pub fn one_line(&self) -> String {
        self.message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The exit code.
    pub fn code(&self) -> u8 {
        self.code
    }
}

/// Runs one call to the broker, failing when it takes longer than `timeout`.
pub async fn bounded<T>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = cloudbus::Result<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::of(what, &e)),
        Err(_) => Err(Failure::failed(format!(
            "{what}: no answer within {} s (is the endpoint reachable? --timeout sets the limit)",
            timeout.as_secs()
        ))),
    }
}

/// Opens `url`: an unknown scheme or a provider left out of the build is bad input.
pub async fn open(url: &str, timeout: Duration) -> Result<Bus, Failure> {
    bounded(
        &format!("cannot open {url}"),
        timeout,
        cloudbus::connect(url),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_and_codes() {
        let f = Failure::of(
            "send",
            &cloudbus::Error::new(ErrorKind::Unavailable, "down\n  twice"),
        );
        assert_eq!(f.code(), 1);
        assert!(!f.one_line().contains('\n'));
        let bad = Failure::of("open", &cloudbus::Error::invalid("no such scheme"));
        assert_eq!(bad.code(), 2);
    }
}
