//! Calls into a provider's driver from the portable layer: a panic inside the driver
//! becomes an `Internal` error of that one call instead of unwinding through a
//! settlement queue or a publisher lane.

use cloudbus_driver::error::Result;

/// The source of the error [`panic_safe`] makes of a driver's panic.
#[derive(Debug)]
pub(crate) struct DriverPanicked;

impl std::fmt::Display for DriverPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the provider driver panicked")
    }
}

impl std::error::Error for DriverPanicked {}

/// Whether `error` is a driver's panic caught by [`panic_safe`].
pub(crate) fn panicked(error: &cloudbus_driver::error::Error) -> bool {
    error.source_as::<DriverPanicked>().is_some()
}

/// Runs one driver call so that a panic inside the driver becomes an
/// [`ErrorKind::Internal`](cloudbus_driver::ErrorKind::Internal) error of that call instead of
/// unwinding through the portable layer (where it would strand a settlement queue or
/// end a publisher lane). `call` names the driver method for the message.
pub(crate) async fn panic_safe<T>(
    call: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text payload".to_owned());
            tracing::error!(call, panic = %what, "the provider driver panicked");
            Err(cloudbus_driver::error::Error::with_source(
                cloudbus_driver::error::ErrorKind::Internal,
                format!("the provider driver panicked in {call}: {what}"),
                DriverPanicked,
            ))
        }
    }
}
