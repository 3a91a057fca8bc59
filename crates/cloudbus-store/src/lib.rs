//! Durable stores for cloudbus: what must outlive a process.
//!
//! - The transactional outbox ([`outbox`]): stage events in the same database
//!   transaction as the rows they announce; relays publish them after the commit
//!   (PostgreSQL and SQLite).
//! - Dedup stores, for idempotent consumers ([`cloudbus_core::Idempotent`]): a key
//!   claimed by one instance of a service is in progress for every instance, and done
//!   for every instance once completed, until its TTL ends. A claim belongs to its
//!   owner: only the owner renews or releases it, and a claim whose lease passed is
//!   taken over by the next claimant.
//! - Checkpoint stores, for stream readers ([`cloudbus_core::StreamConsumer`]): a
//!   restarted reader resumes where the group's last one saved, and the readers of a
//!   group lease the partitions so that no two own one at once.
//!
//! On PostgreSQL (feature `postgres`) and SQLite (feature `sqlite`), both through sqlx
//! pools the application owns, and on Redis (feature `redis`). They pass the same
//! store conformance suite as the in-memory stores of `cloudbus-core`
//! (`cloudbus_conformance::STORE_CASES`).
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
//! let lease = Duration::from_secs(30);
//! assert_eq!(store.claim("order-42", "delivery-1", lease).await.unwrap(), Claim::Claimed);
//! assert_eq!(store.claim("order-42", "delivery-2", lease).await.unwrap(), Claim::InProgress);
//! store.complete("order-42", Duration::from_secs(3600)).await.unwrap();
//! assert_eq!(store.claim("order-42", "delivery-2", lease).await.unwrap(), Claim::Done);
//! # });
//! ```

/// The sqlx this crate is built on: the pools and transactions the stores take are its
/// types, so an application that names them through this re-export cannot get a
/// mismatched version.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use sqlx;

/// The redis crate this crate is built on (its `ConnectionManager` is what the Redis
/// stores take).
#[cfg(feature = "redis")]
pub use redis as redis_client;

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "redis"))]
mod clock;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "redis"))]
mod error;
pub mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sweep;
