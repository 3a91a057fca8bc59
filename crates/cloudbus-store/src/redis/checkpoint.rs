//! [`CheckpointStore`] on Redis: per (group, partition) a checkpoint key and an owner
//! key whose Redis expiry is the lease; taking, renewing, saving and releasing are Lua
//! scripts that read the owner and write in one step.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::CheckpointStore;
use cloudbus_driver::{Error, ErrorKind, Result};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::clock::millis;
use crate::error::from_redis;

/// Takes or renews the owner key `KEYS[1]` for `ARGV[1]` for `ARGV[2]` ms.
const ACQUIRE: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Saves `ARGV[2]` into `KEYS[2]` unless another owner than `ARGV[1]` holds `KEYS[1]`.
const SAVE: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

/// Deletes the owner key `KEYS[1]` when `ARGV[1]` holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// Stream readers' checkpoints and partition leases on Redis.
///
/// ```no_run
/// # async fn demo(driver: std::sync::Arc<dyn cloudbus_driver::StreamDriver>) -> cloudbus_driver::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::StreamConsumer;
/// use cloudbus_store::redis::RedisCheckpointStore;
/// let store = RedisCheckpointStore::connect("redis://127.0.0.1:6379/").await?;
/// let reader = StreamConsumer::new(driver, "analytics").checkpoints(Arc::new(store));
/// # let _ = reader; Ok(()) }
/// ```
pub struct RedisCheckpointStore {
    connection: ConnectionManager,
    prefix: String,
    acquire: Script,
    save: Script,
    release: Script,
}

impl RedisCheckpointStore {
    /// A store over `connection`, its keys under `cloudbus:checkpoint:`.
    pub fn new(connection: ConnectionManager) -> Self {
        RedisCheckpointStore {
            connection,
            prefix: "cloudbus:checkpoint:".into(),
            acquire: Script::new(ACQUIRE),
            save: Script::new(SAVE),
            release: Script::new(RELEASE),
        }
    }

    /// Connects to the Redis at `url` (`redis://host:port/db`; `rediss://` for TLS).
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                "checkpoint store: the Redis URL",
                e,
            )
        })?;
        let connection = ConnectionManager::new(client)
            .await
            .map_err(|e| from_redis("checkpoint store: connect", e))?;
        Ok(Self::new(connection))
    }

    /// Puts the keys under `prefix` instead of `cloudbus:checkpoint:`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The owner key and the checkpoint key of a partition, one hash tag for both.
    fn keys(&self, group: &str, partition: &str) -> [String; 2] {
        let tag = format!("{}{{{group}\u{1f}{partition}}}", self.prefix);
        [format!("{tag}:owner"), format!("{tag}:sequence")]
    }
}

#[async_trait]
impl CheckpointStore for RedisCheckpointStore {
    async fn load(&self, group: &str, partition: &str) -> Result<Option<String>> {
        let [_, sequence] = self.keys(group, partition);
        let mut connection = self.connection.clone();
        redis::cmd("GET")
            .arg(sequence)
            .query_async(&mut connection)
            .await
            .map_err(|e| from_redis("checkpoint store: load", e))
    }

    async fn save(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        sequence: &str,
    ) -> Result<bool> {
        let [owner_key, sequence_key] = self.keys(group, partition);
        let mut connection = self.connection.clone();
        let saved: i64 = self
            .save
            .key(owner_key)
            .key(sequence_key)
            .arg(owner)
            .arg(sequence)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| from_redis("checkpoint store: save", e))?;
        Ok(saved == 1)
    }

    async fn acquire(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool> {
        let [owner_key, _] = self.keys(group, partition);
        let mut connection = self.connection.clone();
        let taken: i64 = self
            .acquire
            .key(owner_key)
            .arg(owner)
            .arg(millis(lease).max(1))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| from_redis("checkpoint store: acquire", e))?;
        Ok(taken == 1)
    }

    async fn release(&self, group: &str, partition: &str, owner: &str) -> Result<()> {
        let [owner_key, _] = self.keys(group, partition);
        let mut connection = self.connection.clone();
        self.release
            .key(owner_key)
            .arg(owner)
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(|e| from_redis("checkpoint store: release", e))?;
        Ok(())
    }
}
