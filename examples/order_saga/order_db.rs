//! The Order service's own database: its orders table, its transactional outbox and
//! Payment's dedup store.

use std::sync::Arc;
use std::time::Duration;

use cloudbus::store::outbox::OutboxStorage;
use cloudbus::store::sqlite::{SqliteDedupStore, SqliteOutbox};
use cloudbus::store::sqlx;
use cloudbus::{DedupStore, Event, PublishOptions, Publisher};

use crate::events::OrderCreated;

/// The Order service's own database: its orders table, its transactional outbox and
/// Payment's dedup store. A SQLite file in the temp dir by default; PostgreSQL when
/// `DATABASE_URL` is set and the example is built with `--features postgres`.
pub struct OrderDb {
    /// This run's mark on its order rows (a PostgreSQL database outlives runs).
    run: String,
    storage: Storage,
}

enum Storage {
    Sqlite {
        pool: sqlx::SqlitePool,
        path: std::path::PathBuf,
    },
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

fn db_error(what: &str, e: sqlx::Error) -> cloudbus::Error {
    cloudbus::Error::new(cloudbus::ErrorKind::Unavailable, format!("{what}: {e}"))
}

impl OrderDb {
    pub async fn open() -> cloudbus::Result<OrderDb> {
        let run = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        Ok(OrderDb {
            run,
            storage: Self::open_storage().await?,
        })
    }

    async fn open_storage() -> cloudbus::Result<Storage> {
        #[cfg(feature = "postgres")]
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let pool = sqlx::PgPool::connect(&url)
                .await
                .map_err(|e| db_error("connect to DATABASE_URL", e))?;
            cloudbus::store::postgres::migrate(&pool).await?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS saga_orders (
                     run TEXT, order_id TEXT, customer TEXT, amount_cents BIGINT, currency TEXT)",
            )
            .execute(&pool)
            .await
            .map_err(|e| db_error("create saga_orders", e))?;
            return Ok(Storage::Postgres(pool));
        }
        let path =
            std::env::temp_dir().join(format!("cloudbus-order-saga-{}.db", std::process::id()));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::SqlitePool::connect_with(options)
            .await
            .map_err(|e| db_error("open the SQLite file", e))?;
        cloudbus::store::sqlite::migrate(&pool).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS saga_orders (
                 run TEXT, order_id TEXT, customer TEXT, amount_cents INTEGER, currency TEXT)",
        )
        .execute(&pool)
        .await
        .map_err(|e| db_error("create saga_orders", e))?;
        Ok(Storage::Sqlite { pool, path })
    }

    pub fn describe(&self) -> String {
        match &self.storage {
            Storage::Sqlite { path, .. } => format!("SQLite {}", path.display()),
            #[cfg(feature = "postgres")]
            Storage::Postgres(_) => "PostgreSQL at DATABASE_URL".into(),
        }
    }

    /// The outbox of `topic`.
    pub fn outbox(&self, topic: &str) -> Arc<dyn OutboxStorage> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => Arc::new(SqliteOutbox::new(pool.clone(), topic)),
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => Arc::new(cloudbus::store::postgres::PostgresOutbox::new(
                pool.clone(),
                topic,
            )),
        }
    }

    pub fn dedup_store(&self) -> Arc<dyn DedupStore> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => Arc::new(SqliteDedupStore::new(pool.clone())),
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => Arc::new(
                cloudbus::store::postgres::PostgresDedupStore::new(pool.clone()),
            ),
        }
    }

    /// Writes the order row and stages its event for every target topic, in one
    /// transaction. Returns the rows staged.
    pub async fn place_order(
        &self,
        order: &OrderCreated,
        event: &Event,
        targets: &[(String, Publisher)],
    ) -> cloudbus::Result<usize> {
        self.write(Some(order), event, targets).await
    }

    /// Stages `event` once more (a duplicate, as at-least-once delivery makes them).
    pub async fn stage_again(
        &self,
        event: &Event,
        targets: &[(String, Publisher)],
    ) -> cloudbus::Result<usize> {
        self.write(None, event, targets).await
    }

    async fn write(
        &self,
        order: Option<&OrderCreated>,
        event: &Event,
        targets: &[(String, Publisher)],
    ) -> cloudbus::Result<usize> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await.map_err(|e| db_error("begin", e))?;
                if let Some(o) = order {
                    sqlx::query("INSERT INTO saga_orders VALUES (?1, ?2, ?3, ?4, ?5)")
                        .bind(&self.run)
                        .bind(&o.order_id)
                        .bind(&o.customer)
                        .bind(o.amount_cents as i64)
                        .bind(&o.currency)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| db_error("insert the order", e))?;
                }
                for (topic, _) in targets {
                    SqliteOutbox::new(pool.clone(), topic)
                        .stage(&mut tx, event, PublishOptions::default())
                        .await?;
                }
                tx.commit().await.map_err(|e| db_error("commit", e))?;
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(|e| db_error("begin", e))?;
                if let Some(o) = order {
                    sqlx::query("INSERT INTO saga_orders VALUES ($1, $2, $3, $4, $5)")
                        .bind(&self.run)
                        .bind(&o.order_id)
                        .bind(&o.customer)
                        .bind(o.amount_cents as i64)
                        .bind(&o.currency)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| db_error("insert the order", e))?;
                }
                for (topic, _) in targets {
                    cloudbus::store::postgres::PostgresOutbox::new(pool.clone(), topic)
                        .stage(&mut tx, event, PublishOptions::default())
                        .await?;
                }
                tx.commit().await.map_err(|e| db_error("commit", e))?;
            }
        }
        Ok(targets.len())
    }

    pub async fn order_rows(&self) -> cloudbus::Result<i64> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => {
                sqlx::query_scalar("SELECT count(*) FROM saga_orders WHERE run = ?1")
                    .bind(&self.run)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| db_error("count orders", e))
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => {
                sqlx::query_scalar("SELECT count(*) FROM saga_orders WHERE run = $1")
                    .bind(&self.run)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| db_error("count orders", e))
            }
        }
    }

    pub async fn close(&self) {
        match &self.storage {
            Storage::Sqlite { pool, path } => {
                pool.close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => pool.close().await,
        }
    }
}
