-- cloudbus-store, PostgreSQL, migration 3: a dedup claim belongs to an owner (a token
-- of the delivery handling the event), so that only its owner renews or releases it: a
-- stale owner whose lease passed and whose claim another delivery took over no longer
-- frees the new claim. Rows claimed before this migration have no owner; nobody
-- renews or releases them, and they lapse with their lease. Adding a nullable column
-- without a default only changes the catalog: no table rewrite.
ALTER TABLE cloudbus_dedup ADD COLUMN IF NOT EXISTS owner TEXT;
