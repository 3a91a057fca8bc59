//! placeholder
pub use cloudbus_core::*;
