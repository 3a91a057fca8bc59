//! The tables of the SQLite stores, created by numbered migrations recorded in
//! `cloudbus_migrations` (its own table, so that it never meets the application's
//! migration tool), each in one write transaction taken at its start (`BEGIN
//! IMMEDIATE`), so that processes migrating at once take turns and a migration that
//! is not idempotent by itself (`ALTER TABLE ... ADD COLUMN`) runs once.

use cloudbus_driver::Result;
// Executor::execute rather than RawSql::execute: the latter's future is not provably
// `Send` for callers in generic contexts (async_trait, spawned tasks).
use sqlx::Executor as _;
use sqlx::SqlitePool;

use crate::error::from_sqlx;

/// The migrations, in order: (version, SQL).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_stores.sql")),
    (2, include_str!("../../migrations/sqlite/0002_outbox.sql")),
    (
        3,
        include_str!("../../migrations/sqlite/0003_dedup_owner.sql"),
    ),
];

/// Creates or updates the stores' tables. Idempotent.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
/// cloudbus_store::sqlite::migrate(&pool).await.unwrap();
/// cloudbus_store::sqlite::migrate(&pool).await.unwrap();
/// # });
/// ```
pub async fn migrate(pool: &SqlitePool) -> Result<()> {
    (pool)
        .execute(sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS cloudbus_migrations (
            version INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL)",
        ))
        .await
        .map_err(|e| from_sqlx("migrate: cloudbus_migrations", e))?;
    for (version, sql) in MIGRATIONS {
        // The write lock before the version is read: a deferred transaction would
        // read "not applied" beside another migrator and then fail to upgrade.
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| from_sqlx("migrate: begin", e))?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT version FROM cloudbus_migrations WHERE version = ?1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| from_sqlx("migrate: read versions", e))?;
        if applied.is_some() {
            continue;
        }
        (&mut *tx)
            .execute(sqlx::raw_sql(sql))
            .await
            .map_err(|e| from_sqlx(&format!("migrate: migration {version}"), e))?;
        sqlx::query(
            "INSERT OR IGNORE INTO cloudbus_migrations (version, applied_at) VALUES (?1, ?2)",
        )
        .bind(version)
        .bind(crate::clock::unix_millis_now())
        .execute(&mut *tx)
        .await
        .map_err(|e| from_sqlx("migrate: record version", e))?;
        tx.commit()
            .await
            .map_err(|e| from_sqlx("migrate: commit", e))?;
        tracing::info!(version, "cloudbus-store: SQLite migration applied");
    }
    Ok(())
}
