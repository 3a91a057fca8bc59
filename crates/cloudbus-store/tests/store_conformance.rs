//! Every durable store against the store conformance suite, on real servers:
//! PostgreSQL at DATABASE_URL, Redis at REDIS_URL (scripts/postgres.sh and
//! scripts/redis.sh start throwaway ones; scripts/test.sh does it for the suite) and
//! SQLite in a temp file. A missing server makes its tests pass after a loud
//! message, or fail under CI=true. A test target with `harness = false`: the cases
//! come from the suite's registry (`cloudbus_conformance::Suite`).

mod common;

use common::{PostgresStores, RedisStores, SqliteStores, server};

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .store("on_postgres", || async {
            server("DATABASE_URL", "scripts/postgres.sh").map(|url| PostgresStores { url })
        })
        .store("on_sqlite", || async { Some(SqliteStores::new()) })
        .store("on_redis", || async {
            server("REDIS_URL", "scripts/redis.sh").map(|url| RedisStores { url })
        })
        .run()
}
