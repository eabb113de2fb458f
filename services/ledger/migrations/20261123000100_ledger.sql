-- The stock ledger's schema: master data, append-only movements and postings,
-- balances derived from them, and open transfers.

-- Indexes here are built on tables this migration creates, so nothing waits on them.
-- squawk-ignore-file require-concurrent-index-creation

-- migrate:up
SELECT omni_runtime.install_messaging('ledger');

CREATE TABLE ledger.locations (
    location_id        text PRIMARY KEY,
    kind               text NOT NULL CHECK (kind IN ('store', 'distribution_centre')),
    name               text NOT NULL,
    city               text NOT NULL DEFAULT '',
    latitude           double precision NOT NULL,
    longitude          double precision NOT NULL,
    ship_from_store    boolean NOT NULL DEFAULT false,
    click_and_collect  boolean NOT NULL DEFAULT false,
    accepts_returns    boolean NOT NULL DEFAULT false,
    -- Tasks per day: int32 on the wire too, far below its limit.
    -- squawk-ignore prefer-bigint-over-int
    daily_capacity     integer NOT NULL DEFAULT 0 CHECK (daily_capacity >= 0),
    active             boolean NOT NULL DEFAULT true,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger.skus (
    sku         text PRIMARY KEY,
    product_id  text NOT NULL,
    name        text NOT NULL,
    colour      text NOT NULL DEFAULT '',
    size        text NOT NULL DEFAULT '',
    barcode     text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX skus_product_idx ON ledger.skus (product_id, sku);

-- One row per movement a device posted; (device_id, device_sequence) is its
-- idempotency key and content_digest detects a key reused for other content.
CREATE TABLE ledger.movements (
    movement_id              uuid PRIMARY KEY,
    device_id                text NOT NULL,
    device_sequence          bigint NOT NULL CHECK (device_sequence > 0),
    content_digest           text NOT NULL,
    kind                     text NOT NULL,
    sku                      text NOT NULL REFERENCES ledger.skus (sku),
    location_id              text NOT NULL REFERENCES ledger.locations (location_id),
    reason_code              text NOT NULL DEFAULT '',
    transfer_id              text NOT NULL DEFAULT '',
    counterpart_location_id  text NOT NULL DEFAULT '',
    reference                text NOT NULL DEFAULT '',
    counted_quantity         bigint NOT NULL DEFAULT 0,
    occurred_at              timestamptz NOT NULL,
    recorded_at              timestamptz NOT NULL,
    UNIQUE (device_id, device_sequence)
);

-- Every change of on-hand. balance_version counts the postings of one
-- (sku, location, state) from 1 without gaps; on_hand_after is the running balance.
CREATE TABLE ledger.postings (
    ledger_sequence  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    movement_id      uuid NOT NULL REFERENCES ledger.movements (movement_id),
    sku              text NOT NULL,
    location_id      text NOT NULL,
    state            text NOT NULL CHECK (state IN ('sellable', 'damaged', 'quarantine', 'in_transit')),
    quantity_delta   bigint NOT NULL,
    on_hand_after    bigint NOT NULL CHECK (on_hand_after >= 0),
    balance_version  bigint NOT NULL CHECK (balance_version > 0),
    recorded_at      timestamptz NOT NULL,
    UNIQUE (sku, location_id, state, balance_version)
);
CREATE INDEX postings_movement_idx ON ledger.postings (movement_id);
CREATE INDEX postings_sku_idx ON ledger.postings (sku, ledger_sequence);
CREATE INDEX postings_location_idx ON ledger.postings (location_id, ledger_sequence);
CREATE INDEX postings_recorded_at_idx ON ledger.postings (recorded_at);

-- Current on-hand per (sku, location, state): derived from postings, kept in the
-- same transaction, locked (in key order) by writers.
CREATE TABLE ledger.balances (
    sku          text NOT NULL,
    location_id  text NOT NULL,
    state        text NOT NULL,
    on_hand      bigint NOT NULL DEFAULT 0 CHECK (on_hand >= 0),
    version      bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, location_id, state)
);
CREATE INDEX balances_location_idx ON ledger.balances (location_id, sku);

CREATE TABLE ledger.transfers (
    transfer_id              text NOT NULL,
    sku                      text NOT NULL,
    source_location_id       text NOT NULL,
    destination_location_id  text NOT NULL,
    quantity_sent            bigint NOT NULL CHECK (quantity_sent >= 0),
    quantity_received        bigint NOT NULL CHECK (quantity_received >= 0),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transfer_id, sku),
    CHECK (quantity_received <= quantity_sent)
);

-- Movements and postings are facts: refuse any UPDATE, DELETE or TRUNCATE.
CREATE FUNCTION ledger.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger.% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER movements_append_only BEFORE UPDATE OR DELETE ON ledger.movements
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER movements_no_truncate BEFORE TRUNCATE ON ledger.movements
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON ledger.postings
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON ledger.postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change();

-- migrate:down
-- squawk-ignore ban-drop-table
DROP TABLE ledger.transfers, ledger.balances, ledger.postings, ledger.movements,
    ledger.skus, ledger.locations, ledger.outbox, ledger.inbox, ledger.idempotency_keys;
-- squawk-ignore ban-drop-function
DROP FUNCTION ledger.refuse_change();
