//! Operations examples of cloudbus, in a package of their own so that the README's
//! first command (the order saga) builds no metrics exporter, HTTP server or OTLP
//! client:
//!
//! - `cargo run -p cloudbus-telemetry-examples --example metrics_server`: `/metrics`
//!   for Prometheus and `/health/live`, `/health/ready` for probes.
//! - `cargo run -p cloudbus-telemetry-examples --example otel_export`: the order
//!   saga's spans over OTLP/HTTP (`OTEL_EXPORTER_OTLP_ENDPOINT`), or as a tree.
