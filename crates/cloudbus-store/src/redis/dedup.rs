//! [`DedupStore`] on Redis: one key per event, holding `claimed:<owner>` or `done`,
//! with Redis's own expiry (`PX`) as the lease and the TTL (Redis's clock, so
//! instances whose clocks disagree still agree on leases). Claiming is one Lua script
//! (read, then set if absent or ours: a compare-or-set), and so is releasing (delete
//! only if ours: a compare-and-delete), so that a stale owner never frees a claim
//! another delivery holds now.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::{Claim, DedupStore};
use cloudbus_driver::{Error, ErrorKind, Result};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::clock::millis;
use crate::error::from_redis;

/// Claims `KEYS[1]` as `ARGV[2]` (the owner's claim value) for `ARGV[1]` ms unless it
/// is done or another owner's: 0 claimed (or renewed), 1 in progress, 2 done. A
/// `claimed` value written before claims had owners is nobody's: in progress until
/// its expiry.
const CLAIM: &str = r"
local state = redis.call('GET', KEYS[1])
if state == 'done' then return 2 end
if state and state ~= ARGV[2] then return 1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 0
";

/// Deletes `KEYS[1]` only while it is the claim `ARGV[1]` (a completed key, and a
/// claim another owner took over, stay).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// The value of `owner`'s claim: never `done`, whatever the owner.
fn claim_value(owner: &str) -> String {
    format!("claimed:{owner}")
}

/// Idempotent consumers' memory on Redis, shared by every instance of a service, and
/// bounded by Redis's expiry: a completed key vanishes after its TTL.
///
/// ```no_run
/// # async fn demo() -> cloudbus_driver::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::{HandlerContext, HandlerError, Idempotent};
/// use cloudbus_driver::Event;
/// use cloudbus_store::redis::RedisDedupStore;
/// let store = RedisDedupStore::connect("redis://127.0.0.1:6379/").await?;
/// let handler = Idempotent::new(
///     |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) },
///     Arc::new(store),
/// );
/// # let _ = handler; Ok(()) }
/// ```
pub struct RedisDedupStore {
    connection: ConnectionManager,
    prefix: String,
    claim: Script,
    release: Script,
}

impl RedisDedupStore {
    /// A store over `connection`, its keys under `cloudbus:dedup:`.
    pub fn new(connection: ConnectionManager) -> Self {
        RedisDedupStore {
            connection,
            prefix: "cloudbus:dedup:".into(),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
        }
    }

    /// Connects to the Redis at `url` (`redis://host:port/db`; `rediss://` for TLS).
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::with_source(ErrorKind::InvalidArgument, "dedup store: the Redis URL", e)
        })?;
        let connection = ConnectionManager::new(client)
            .await
            .map_err(|e| from_redis("dedup store: connect", e))?;
        Ok(Self::new(connection))
    }

    /// Puts the keys under `prefix` instead of `cloudbus:dedup:`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// A positive duration in ms (Redis refuses `PX 0`).
fn px(d: Duration) -> i64 {
    millis(d).max(1)
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim> {
        let mut connection = self.connection.clone();
        let state: i64 = self
            .claim
            .key(self.key(key))
            .arg(px(lease))
            .arg(claim_value(owner))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| from_redis("dedup store: claim", e))?;
        Ok(match state {
            0 => Claim::Claimed,
            2 => Claim::Done,
            _ => Claim::InProgress,
        })
    }

    async fn complete(&self, key: &str, ttl: Duration) -> Result<()> {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(self.key(key))
            .arg("done")
            .arg("PX")
            .arg(px(ttl))
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| from_redis("dedup store: complete", e))
    }

    async fn release(&self, key: &str, owner: &str) -> Result<()> {
        let mut connection = self.connection.clone();
        self.release
            .key(self.key(key))
            .arg(claim_value(owner))
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(|e| from_redis("dedup store: release", e))?;
        Ok(())
    }
}
