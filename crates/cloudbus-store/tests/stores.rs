//! The durable stores' own cases, on real servers (their conformance suite runs from
//! tests/store_conformance.rs):
//! PostgreSQL at DATABASE_URL, Redis at REDIS_URL (scripts/postgres.sh and
//! scripts/redis.sh start throwaway ones; scripts/test.sh does it for the suite) and
//! SQLite in a temp file. A missing server makes its tests print SKIPPED, or fail
//! under CI=true.

mod common;

use std::time::Duration;

use cloudbus_core::DedupStore;
use cloudbus_store::{postgres, sqlite};
use common::*;

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
