//! Durable stores for cloudbus: what must outlive a process.
//!
//! - Dedup stores, for idempotent consumers ([`cloudbus_core::Idempotent`]): a key
//!   claimed by one instance of a service is in progress for every instance, and done
//!   for every instance once completed, until its TTL ends.
//! - Checkpoint stores, for stream readers ([`cloudbus_core::StreamConsumer`]): a
//!   restarted reader resumes where the group's last one saved, and the readers of a
//!   group lease the partitions so that no two own one at once.
//!
//! On PostgreSQL (feature `postgres`) and SQLite (feature `sqlite`), both through sqlx
//! pools the application owns, and on Redis (feature `redis`). They pass the same
//! store conformance suite as the in-memory stores of `cloudbus-core`
//! (`cloudbus_core::conformance::store_cases`).
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use cloudbus_core::{Claim, DedupStore};
//! use cloudbus_store::sqlite::{SqliteDedupStore, migrate};
//! let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
//! migrate(&pool).await.unwrap();
//! let store = SqliteDedupStore::new(pool);
//! assert_eq!(store.claim("order-42", Duration::from_secs(30)).await.unwrap(), Claim::Claimed);
//! store.complete("order-42", Duration::from_secs(3600)).await.unwrap();
//! assert_eq!(store.claim("order-42", Duration::from_secs(30)).await.unwrap(), Claim::Done);
//! # });
//! ```

mod clock;
mod error;
pub mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
