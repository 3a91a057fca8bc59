//! The stores on Redis (feature `redis`), over a `redis::aio::ConnectionManager` (it
//! reconnects by itself). Every operation is one command or one Lua script, so each is
//! atomic; the keys of one partition share a hash tag, so the scripts also run on
//! Redis Cluster. Nothing needs creating first.

mod checkpoint;
mod dedup;

pub use checkpoint::RedisCheckpointStore;
pub use dedup::RedisDedupStore;
