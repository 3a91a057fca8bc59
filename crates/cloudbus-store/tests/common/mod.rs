//! What the store test binaries share: the stores' conformance harnesses on real
//! servers (PostgreSQL, Redis) and SQLite in a temp file, and the server lookup that
//! skips loudly, or fails under CI=true.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_conformance::StoreHarness;
use cloudbus_conformance::emulator::required_env;
use cloudbus_core::{CheckpointStore, DedupStore, Result};
use cloudbus_store::{postgres, redis, sqlite};

/// The value of `var`, or `None` after a loud message when the tests may skip.
pub fn server(var: &str, script: &str) -> Option<String> {
    required_env(
        var,
        "this store test",
        &format!("scripts/test.sh starts the server with {script}"),
    )
}

pub struct PostgresStores {
    pub url: String,
}

impl PostgresStores {
    pub async fn pool(&self) -> Result<sqlx::PgPool> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .map_err(|e| {
                cloudbus_core::Error::new(cloudbus_core::ErrorKind::Unavailable, e.to_string())
            })?;
        postgres::migrate(&pool).await?;
        Ok(pool)
    }
}

#[async_trait]
impl StoreHarness for PostgresStores {
    async fn dedup_store(&self) -> Result<Option<Arc<dyn DedupStore>>> {
        Ok(Some(Arc::new(postgres::PostgresDedupStore::new(
            self.pool().await?,
        ))))
    }
    async fn checkpoint_store(&self) -> Result<Option<Arc<dyn CheckpointStore>>> {
        Ok(Some(Arc::new(postgres::PostgresCheckpointStore::new(
            self.pool().await?,
        ))))
    }
}

/// One SQLite file per test, opened by a pool per handle (WAL, busy timeout), as two
/// processes on one machine would.
pub struct SqliteStores {
    path: std::path::PathBuf,
}

impl SqliteStores {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "cloudbus-store-test-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        SqliteStores { path }
    }

    pub async fn pool(&self) -> Result<sqlx::SqlitePool> {
        let pool = self.connect().await?;
        sqlite::migrate(&pool).await?;
        Ok(pool)
    }

    /// A pool on the file, not migrated.
    pub async fn connect(&self) -> Result<sqlx::SqlitePool> {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| {
                cloudbus_core::Error::new(cloudbus_core::ErrorKind::Unavailable, e.to_string())
            })?;
        Ok(pool)
    }
}

impl Drop for SqliteStores {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait]
impl StoreHarness for SqliteStores {
    async fn dedup_store(&self) -> Result<Option<Arc<dyn DedupStore>>> {
        Ok(Some(Arc::new(sqlite::SqliteDedupStore::new(
            self.pool().await?,
        ))))
    }
    async fn checkpoint_store(&self) -> Result<Option<Arc<dyn CheckpointStore>>> {
        Ok(Some(Arc::new(sqlite::SqliteCheckpointStore::new(
            self.pool().await?,
        ))))
    }
}

pub struct RedisStores {
    pub url: String,
}

#[async_trait]
impl StoreHarness for RedisStores {
    async fn dedup_store(&self) -> Result<Option<Arc<dyn DedupStore>>> {
        Ok(Some(Arc::new(
            redis::RedisDedupStore::connect(&self.url).await?,
        )))
    }
    async fn checkpoint_store(&self) -> Result<Option<Arc<dyn CheckpointStore>>> {
        Ok(Some(Arc::new(
            redis::RedisCheckpointStore::connect(&self.url).await?,
        )))
    }
}
