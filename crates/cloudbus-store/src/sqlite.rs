//! The transactional outbox and the stores on SQLite (feature `sqlite`), over a `sqlx::SqlitePool` the application
//! owns: the default of the examples, no server needed. Open the pool in WAL mode
//! with a busy timeout when several connections write. Run [`migrate`] once at
//! start-up; the SQL is also in `migrations/sqlite/`.

mod checkpoint;
mod dedup;
mod migrate;
mod outbox;

pub use checkpoint::SqliteCheckpointStore;
pub use dedup::SqliteDedupStore;
pub use migrate::{MIGRATIONS, migrate};
pub use outbox::SqliteOutbox;
