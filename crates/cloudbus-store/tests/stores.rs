//! Every durable store against the store conformance suite, on real servers:
//! PostgreSQL at DATABASE_URL, Redis at REDIS_URL (scripts/postgres.sh and
//! scripts/redis.sh start throwaway ones; scripts/test.sh does it for the suite) and
//! SQLite in a temp file. A missing server makes its tests print SKIPPED, or fail
//! under CI=true.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::conformance::StoreHarness;
use cloudbus_core::conformance::emulator::required_env;
use cloudbus_core::{CheckpointStore, DedupStore, Result};
use cloudbus_store::{postgres, redis, sqlite};

/// The value of `var`, or `None` after a loud message when the tests may skip.
fn server(var: &str, script: &str) -> Option<String> {
    required_env(
        var,
        "this store test",
        &format!("scripts/test.sh starts the server with {script}"),
    )
}

struct PostgresStores {
    url: String,
}

impl PostgresStores {
    async fn pool(&self) -> Result<sqlx::PgPool> {
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
struct SqliteStores {
    path: std::path::PathBuf,
}

impl SqliteStores {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "cloudbus-store-test-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        SqliteStores { path }
    }

    async fn pool(&self) -> Result<sqlx::SqlitePool> {
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
        sqlite::migrate(&pool).await?;
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

struct RedisStores {
    url: String,
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

mod on_postgres {
    use super::*;
    cloudbus_core::store_conformance_suite!(match server("DATABASE_URL", "scripts/postgres.sh") {
        Some(url) => PostgresStores { url },
        None => return,
    });
}

mod on_sqlite {
    use super::*;
    cloudbus_core::store_conformance_suite!(SqliteStores::new());
}

mod on_redis {
    use super::*;
    cloudbus_core::store_conformance_suite!(match server("REDIS_URL", "scripts/redis.sh") {
        Some(url) => RedisStores { url },
        None => return,
    });
}

/// The SQL dedup stores are bounded by expiry: `purge_expired` deletes the keys whose
/// TTL or lease ran out, and no other.
mod expiry_sweep {
    use super::*;
    use cloudbus_core::Claim;

    const SHORT: Duration = Duration::from_millis(300);

    fn unique(what: &str) -> String {
        format!("{what}-{}", uuid::Uuid::new_v4().simple())
    }

    #[tokio::test]
    async fn sqlite_purges_only_expired_keys() {
        let stores = SqliteStores::new();
        let store = sqlite::SqliteDedupStore::new(stores.pool().await.unwrap());
        let (done, claimed, kept) = (unique("done"), unique("claimed"), unique("kept"));
        store.claim(&done, SHORT).await.unwrap();
        store.complete(&done, SHORT).await.unwrap();
        store.claim(&claimed, SHORT).await.unwrap();
        store.claim(&kept, Duration::from_secs(60)).await.unwrap();
        store
            .complete(&kept, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            store.purge_expired().await.unwrap(),
            0,
            "nothing had expired yet"
        );
        tokio::time::sleep(SHORT * 3).await;
        assert_eq!(store.purge_expired().await.unwrap(), 2);
        assert_eq!(store.claim(&kept, SHORT).await.unwrap(), Claim::Done);
    }

    #[tokio::test]
    async fn postgres_purges_only_expired_keys() {
        let Some(url) = server("DATABASE_URL", "scripts/postgres.sh") else {
            return;
        };
        let stores = PostgresStores { url };
        let store = postgres::PostgresDedupStore::new(stores.pool().await.unwrap());
        let (done, claimed, kept) = (unique("done"), unique("claimed"), unique("kept"));
        store.claim(&done, SHORT).await.unwrap();
        store.complete(&done, SHORT).await.unwrap();
        store.claim(&claimed, SHORT).await.unwrap();
        store.claim(&kept, Duration::from_secs(60)).await.unwrap();
        store
            .complete(&kept, Duration::from_secs(3600))
            .await
            .unwrap();
        tokio::time::sleep(SHORT * 3).await;
        // Other tests share the database: at least these two went.
        assert!(store.purge_expired().await.unwrap() >= 2);
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM cloudbus_dedup WHERE key = ANY($1)")
                .bind(vec![done.clone(), claimed.clone(), kept.clone()])
                .fetch_one(&stores.pool().await.unwrap())
                .await
                .unwrap();
        assert_eq!(left, 1, "only the unexpired key stays");
        assert_eq!(store.claim(&kept, SHORT).await.unwrap(), Claim::Done);
    }
}
