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
        let pool = self.connect().await?;
        sqlite::migrate(&pool).await?;
        Ok(pool)
    }

    /// A pool on the file, not migrated.
    async fn connect(&self) -> Result<sqlx::SqlitePool> {
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
        store.claim(&done, "owner", SHORT).await.unwrap();
        store.complete(&done, SHORT).await.unwrap();
        store.claim(&claimed, "owner", SHORT).await.unwrap();
        store
            .claim(&kept, "owner", Duration::from_secs(60))
            .await
            .unwrap();
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
        assert_eq!(
            store.claim(&kept, "owner", SHORT).await.unwrap(),
            Claim::Done
        );
    }

    #[tokio::test]
    async fn postgres_purges_only_expired_keys() {
        let Some(url) = server("DATABASE_URL", "scripts/postgres.sh") else {
            return;
        };
        let stores = PostgresStores { url };
        let store = postgres::PostgresDedupStore::new(stores.pool().await.unwrap());
        let (done, claimed, kept) = (unique("done"), unique("claimed"), unique("kept"));
        store.claim(&done, "owner", SHORT).await.unwrap();
        store.complete(&done, SHORT).await.unwrap();
        store.claim(&claimed, "owner", SHORT).await.unwrap();
        store
            .claim(&kept, "owner", Duration::from_secs(60))
            .await
            .unwrap();
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
        assert_eq!(
            store.claim(&kept, "owner", SHORT).await.unwrap(),
            Claim::Done
        );
    }
}

/// Issue 28 item 20: a dedup claim belongs to its owner (the rules are the store
/// conformance case `dedup_release_and_renewal_are_by_owner`, run above on every
/// store). Here: a database that migration 2 made is upgraded, and its claims keep
/// their meaning.
mod owner_tokens {
    use super::*;
    use cloudbus_core::Claim;
    use sqlx::Executor as _;

    const LONG: Duration = Duration::from_secs(60);

    fn unique(what: &str) -> String {
        format!("{what}-{}", uuid::Uuid::new_v4().simple())
    }

    /// After the upgrade of a database of the previous release: its running claim
    /// (no owner) is in progress for everyone and nobody's to release; then the
    /// owners' rules hold.
    async fn expect_upgraded(store: &dyn DedupStore, old_claim: &str) {
        assert_eq!(
            store.claim(old_claim, "A", LONG).await.unwrap(),
            Claim::InProgress,
            "the previous release's running claim was taken"
        );
        store.release(old_claim, "A").await.unwrap();
        assert_eq!(
            store.claim(old_claim, "B", LONG).await.unwrap(),
            Claim::InProgress,
            "a release freed a claim without an owner"
        );
        // A new claim after the upgrade is its owner's.
        let key = unique("after-upgrade");
        assert_eq!(store.claim(&key, "A", LONG).await.unwrap(), Claim::Claimed);
        store.release(&key, "B").await.unwrap();
        assert_eq!(
            store.claim(&key, "B", LONG).await.unwrap(),
            Claim::InProgress
        );
        store.release(&key, "A").await.unwrap();
        assert_eq!(store.claim(&key, "B", LONG).await.unwrap(), Claim::Claimed);
    }

    /// Migration 3 (the owner column) upgrades a SQLite database that migrations 1
    /// and 2 made, and `migrate` stays idempotent.
    #[tokio::test]
    async fn sqlite_migration_3_upgrades_a_database_of_migration_2() {
        let stores = SqliteStores::new();
        let pool = stores.connect().await.unwrap();
        pool.execute(
            "CREATE TABLE cloudbus_migrations (
                 version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )
        .await
        .unwrap();
        for (version, sql) in &sqlite::MIGRATIONS[..2] {
            pool.execute(sqlx::raw_sql(sql)).await.unwrap();
            sqlx::query("INSERT INTO cloudbus_migrations (version, applied_at) VALUES (?1, 0)")
                .bind(version)
                .execute(&pool)
                .await
                .unwrap();
        }
        let old_claim = unique("old-claim");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        sqlx::query("INSERT INTO cloudbus_dedup (key, done, expires_at) VALUES (?1, 0, ?2)")
            .bind(&old_claim)
            .bind(now_ms + 60_000)
            .execute(&pool)
            .await
            .unwrap();
        sqlite::migrate(&pool).await.unwrap();
        sqlite::migrate(&pool).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM cloudbus_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(versions, vec![1, 2, 3]);
        expect_upgraded(&sqlite::SqliteDedupStore::new(pool), &old_claim).await;
    }

    /// Migration 3 upgrades a PostgreSQL database that migrations 1 and 2 made (in a
    /// schema of its own, dropped at the end), and `migrate` stays idempotent.
    #[tokio::test]
    async fn postgres_migration_3_upgrades_a_database_of_migration_2() {
        let Some(url) = server("DATABASE_URL", "scripts/postgres.sh") else {
            return;
        };
        let admin = PostgresStores { url: url.clone() }.pool().await.unwrap();
        let schema = format!("cloudbus_upgrade_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options.options([("search_path", schema.as_str())]))
            .await
            .unwrap();
        pool.execute(
            "CREATE TABLE cloudbus_migrations (
                 version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
        for (version, sql) in &postgres::MIGRATIONS[..2] {
            pool.execute(sqlx::raw_sql(sql)).await.unwrap();
            sqlx::query("INSERT INTO cloudbus_migrations (version) VALUES ($1)")
                .bind(version)
                .execute(&pool)
                .await
                .unwrap();
        }
        let old_claim = unique("old-claim");
        sqlx::query(
            "INSERT INTO cloudbus_dedup (key, done, expires_at)
             VALUES ($1, false, now() + interval '60 seconds')",
        )
        .bind(&old_claim)
        .execute(&pool)
        .await
        .unwrap();
        postgres::migrate(&pool).await.unwrap();
        postgres::migrate(&pool).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM cloudbus_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(versions, vec![1, 2, 3]);
        expect_upgraded(&postgres::PostgresDedupStore::new(pool.clone()), &old_claim).await;
        pool.close().await;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await
            .unwrap();
    }

    /// Failure modes (issue 28): a key PostgreSQL could not index (longer than a
    /// B-tree entry may be) or hold (`text` refuses NUL) failed every claim, so its
    /// event was retried until it was dead-lettered, never handled. Such keys are
    /// stored as digests now, and stay distinct.
    #[tokio::test]
    async fn postgres_holds_keys_it_cannot_store_as_they_are() {
        let Some(url) = server("DATABASE_URL", "scripts/postgres.sh") else {
            return;
        };
        let store = postgres::PostgresDedupStore::new(PostgresStores { url }.pool().await.unwrap());
        // Random hex, so that PostgreSQL cannot compress the index entry under the limit.
        let noise: String = (0..125)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let long = format!("/source\u{1f}{noise}");
        let longer = format!("{long}-2");
        let with_nul = format!("/source\u{1f}{}\0tail", uuid::Uuid::new_v4().simple());
        for key in [&long, &longer, &with_nul] {
            assert_eq!(
                store.claim(key, "A", LONG).await.unwrap(),
                Claim::Claimed,
                "{} bytes",
                key.len()
            );
            assert_eq!(
                store.claim(key, "B", LONG).await.unwrap(),
                Claim::InProgress
            );
        }
        store.complete(&long, LONG).await.unwrap();
        assert_eq!(store.claim(&long, "B", LONG).await.unwrap(), Claim::Done);
        assert_eq!(
            store.claim(&longer, "B", LONG).await.unwrap(),
            Claim::InProgress,
            "two long keys became one"
        );
        store.release(&with_nul, "A").await.unwrap();
        assert_eq!(
            store.claim(&with_nul, "B", LONG).await.unwrap(),
            Claim::Claimed
        );
    }
}
