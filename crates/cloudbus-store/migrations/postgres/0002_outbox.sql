-- cloudbus-store, PostgreSQL, migration 2: the transactional outbox. One row per
-- staged event (its structured CloudEvents JSON), relayed in id order per ordering key.
CREATE TABLE IF NOT EXISTS cloudbus_outbox (
    id            BIGSERIAL PRIMARY KEY,
    topic         TEXT NOT NULL,
    ordering_key  TEXT,
    dedup_id      TEXT,
    deliver_at    TIMESTAMPTZ,
    event         BYTEA NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    available_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    claimed_by    TEXT,
    claimed_until TIMESTAMPTZ,
    sent_at       TIMESTAMPTZ,
    dead_reason   TEXT
);
-- What the relays scan: the unsent rows of a topic in id order, and per ordering key.
CREATE INDEX IF NOT EXISTS cloudbus_outbox_unsent
    ON cloudbus_outbox (topic, id) WHERE sent_at IS NULL AND dead_reason IS NULL;
CREATE INDEX IF NOT EXISTS cloudbus_outbox_unsent_by_key
    ON cloudbus_outbox (topic, ordering_key, id) WHERE sent_at IS NULL AND dead_reason IS NULL;
-- What retention deletes.
CREATE INDEX IF NOT EXISTS cloudbus_outbox_sent
    ON cloudbus_outbox (sent_at) WHERE sent_at IS NOT NULL;
