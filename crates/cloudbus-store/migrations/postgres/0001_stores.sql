-- cloudbus-store, PostgreSQL, migration 1: the dedup and checkpoint tables.
CREATE TABLE IF NOT EXISTS cloudbus_dedup (
    key        TEXT PRIMARY KEY,
    done       BOOLEAN NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS cloudbus_dedup_expires_at ON cloudbus_dedup (expires_at);

CREATE TABLE IF NOT EXISTS cloudbus_checkpoints (
    consumer_group TEXT NOT NULL,
    partition_id   TEXT NOT NULL,
    sequence       TEXT,
    owner          TEXT,
    lease_until    TIMESTAMPTZ,
    PRIMARY KEY (consumer_group, partition_id)
);
