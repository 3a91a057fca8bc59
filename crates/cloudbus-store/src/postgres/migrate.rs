//! The tables of the PostgreSQL stores, created by numbered migrations recorded in
//! `cloudbus_migrations` (its own table, so that it never meets the application's
//! migration tool), applied under an advisory lock.

use cloudbus_driver::Result;
// Executor::execute rather than RawSql::execute: the latter's future is not provably
// `Send` for callers in generic contexts (async_trait, spawned tasks).
use sqlx::Executor as _;
use sqlx::PgPool;

use crate::error::from_sqlx;

/// The migrations, in order: (version, SQL).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_stores.sql")),
    (2, include_str!("../../migrations/postgres/0002_outbox.sql")),
    (
        3,
        include_str!("../../migrations/postgres/0003_dedup_owner.sql"),
    ),
];

/// A key of `pg_advisory_xact_lock` that serializes concurrent migrators.
const MIGRATION_LOCK: i64 = 0x636c_6f75_6462_7573; // "cloudbus"

/// Creates or updates the stores' tables. Idempotent; concurrent callers wait for
/// each other.
///
/// ```no_run
/// # async fn demo() -> cloudbus_driver::Result<()> {
/// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/app").await.unwrap();
/// cloudbus_store::postgres::migrate(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| from_sqlx("migrate: begin", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(|e| from_sqlx("migrate: lock", e))?;
    (&mut *tx)
        .execute(sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS cloudbus_migrations (
            version BIGINT PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        ))
        .await
        .map_err(|e| from_sqlx("migrate: cloudbus_migrations", e))?;
    for (version, sql) in MIGRATIONS {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT version FROM cloudbus_migrations WHERE version = $1")
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
        sqlx::query("INSERT INTO cloudbus_migrations (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| from_sqlx("migrate: record version", e))?;
        tracing::info!(version, "cloudbus-store: PostgreSQL migration applied");
    }
    tx.commit()
        .await
        .map_err(|e| from_sqlx("migrate: commit", e))
}
