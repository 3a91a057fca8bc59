-- cloudbus-store, SQLite, migration 2: the transactional outbox. One row per staged
-- event (its structured CloudEvents JSON), relayed in id order per ordering key. Times
-- are Unix milliseconds.
CREATE TABLE IF NOT EXISTS cloudbus_outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    topic         TEXT NOT NULL,
    ordering_key  TEXT,
    dedup_id      TEXT,
    deliver_at    INTEGER,
    event         BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    available_at  INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    claimed_by    TEXT,
    claimed_until INTEGER,
    sent_at       INTEGER,
    dead_reason   TEXT
);
CREATE INDEX IF NOT EXISTS cloudbus_outbox_unsent
    ON cloudbus_outbox (topic, id) WHERE sent_at IS NULL AND dead_reason IS NULL;
CREATE INDEX IF NOT EXISTS cloudbus_outbox_unsent_by_key
    ON cloudbus_outbox (topic, ordering_key, id) WHERE sent_at IS NULL AND dead_reason IS NULL;
CREATE INDEX IF NOT EXISTS cloudbus_outbox_sent
    ON cloudbus_outbox (sent_at) WHERE sent_at IS NOT NULL;
