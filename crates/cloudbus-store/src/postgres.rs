//! The transactional outbox and the stores on PostgreSQL (feature `postgres`), over a `sqlx::PgPool` the
//! application owns. Run [`migrate`] once at start-up (it is idempotent and safe to
//! run from several processes at once); the SQL is also in `migrations/postgres/`
//! for applications that run their migrations with their own tool.

mod checkpoint;
mod dedup;
mod migrate;
mod outbox;

pub use checkpoint::PostgresCheckpointStore;
pub use dedup::PostgresDedupStore;
pub use migrate::{MIGRATIONS, migrate};
pub use outbox::PostgresOutbox;
