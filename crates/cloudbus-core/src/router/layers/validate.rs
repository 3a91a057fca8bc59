//! [`SchemaValidationLayer`]: the event's data is checked against its schema before
//! the handler runs; an event that does not match is dead-lettered with the
//! validation error as the reason (a registry that cannot be reached: retried).

use std::sync::Arc;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};
use crate::validation::{Checked, EventValidator};
use cloudbus_driver::error::ErrorKind;
use cloudbus_driver::event::AttributesReader;

/// Validates each event with `validator` before handling it.
///
/// ```
/// # #[cfg(feature = "schema")] {
/// use std::sync::Arc;
/// use cloudbus_core::Router;
/// use cloudbus_core::router::layers::SchemaValidationLayer;
/// use cloudbus_core::schema::{DirectorySchemaRegistry, SchemaValidator};
/// let dir = std::env::temp_dir().join("cloudbus-doc-schemas-layer");
/// std::fs::create_dir_all(&dir).unwrap();
/// let registry = DirectorySchemaRegistry::open(&dir).unwrap();
/// let validator = Arc::new(SchemaValidator::new(Arc::new(registry)));
/// let router = Router::new().layer(SchemaValidationLayer::new(validator));
/// # let _ = router;
/// # }
/// ```
#[derive(Clone)]
pub struct SchemaValidationLayer {
    validator: Arc<dyn EventValidator>,
    require_schema: bool,
}

impl std::fmt::Debug for SchemaValidationLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaValidationLayer")
            .field("require_schema", &self.require_schema)
            .finish_non_exhaustive()
    }
}

impl SchemaValidationLayer {
    /// Checks events with `validator`; events with no registered schema pass.
    pub fn new(validator: Arc<dyn EventValidator>) -> Self {
        SchemaValidationLayer {
            validator,
            require_schema: false,
        }
    }
    /// Dead-letters events whose type and version have no registered schema.
    pub fn require_schema(mut self, require: bool) -> Self {
        self.require_schema = require;
        self
    }
}

impl Middleware for SchemaValidationLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let layer = self.clone();
        Box::pin(async move {
            match layer.validator.validate(ctx.event()).await {
                Ok(Checked::Valid) => {}
                Ok(Checked::NoSchema | Checked::NotLoaded) if layer.require_schema => {
                    return Err(HandlerError::reject(format!(
                        "no schema is registered for {} version {}",
                        ctx.event().ty(),
                        ctx.version()
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::InvalidArgument => {
                    return Err(HandlerError::reject(e));
                }
                Err(e) => return Err(HandlerError::retry(e)),
            }
            next.run(ctx).await
        })
    }
}

middleware_layer!(SchemaValidationLayer, SchemaValidation);
