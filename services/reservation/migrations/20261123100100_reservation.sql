-- The reservation service's schema: what it knows of the ledger (SKUs,
-- locations, sellable on-hand), the holds placed on it, and the channel rules
-- availability is computed by.
--
-- Lock order, the same for every writer so that none can deadlock another:
--   skus (by sku) -> stock (by sku, location_id) -> reservations (by id).

-- Indexes here are built on tables this migration creates, so nothing waits on them.
-- squawk-ignore-file require-concurrent-index-creation

-- migrate:up
SELECT omni_runtime.install_messaging('reservation');

-- SKUs the ledger announced. availability_version increases with every change
-- of the SKU's availability anywhere; writers lock the row first, which also
-- serialises network-wide figures of one SKU.
CREATE TABLE reservation.skus (
    sku                   text PRIMARY KEY,
    availability_version  bigint NOT NULL DEFAULT 0
);

-- Locations the ledger announced; closed ones promise nothing.
CREATE TABLE reservation.locations (
    location_id  text PRIMARY KEY,
    closed       boolean NOT NULL DEFAULT false
);

-- Sellable on-hand per (sku, location) as projected from StockMoved, and the
-- units held on it. ledger_version is the balance_version of the last posting
-- applied; a posting that skips a version triggers a resync from the ledger.
-- short_since is set while on-hand is below what is held.
CREATE TABLE reservation.stock (
    sku             text NOT NULL REFERENCES reservation.skus (sku),
    location_id     text NOT NULL REFERENCES reservation.locations (location_id),
    on_hand         bigint NOT NULL DEFAULT 0 CHECK (on_hand >= 0),
    held            bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    ledger_version  bigint NOT NULL DEFAULT 0,
    short_since     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, location_id)
);
CREATE INDEX stock_location_idx ON reservation.stock (location_id, sku);
CREATE INDEX stock_short_idx ON reservation.stock (short_since) WHERE short_since IS NOT NULL;

CREATE TABLE reservation.channels (
    channel              text PRIMARY KEY,
    cart_ttl_seconds     bigint NOT NULL CHECK (cart_ttl_seconds BETWEEN 60 AND 604800),
    safety_stock         bigint NOT NULL DEFAULT 0 CHECK (safety_stock >= 0),
    low_stock_threshold  bigint NOT NULL DEFAULT 0 CHECK (low_stock_threshold >= 0),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservation.channel_locations (
    channel      text NOT NULL REFERENCES reservation.channels (channel) ON DELETE CASCADE,
    location_id  text NOT NULL REFERENCES reservation.locations (location_id),
    PRIMARY KEY (channel, location_id)
);
CREATE INDEX channel_locations_location_idx ON reservation.channel_locations (location_id);

CREATE TABLE reservation.location_safety_stock (
    location_id   text PRIMARY KEY REFERENCES reservation.locations (location_id),
    safety_stock  bigint NOT NULL CHECK (safety_stock > 0)
);

-- One row; bumped by every change of channel rules, safety stock or a
-- location's closed flag, so replicas know when their cached rules are stale.
CREATE TABLE reservation.rules_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL
);
INSERT INTO reservation.rules_version (version) VALUES (0);

CREATE TABLE reservation.reservations (
    reservation_id  uuid PRIMARY KEY,
    channel         text NOT NULL,
    reference       text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('cart', 'order')),
    status          text NOT NULL
                    CHECK (status IN ('active', 'released', 'expired', 'consumed', 'short')),
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    CHECK ((kind = 'cart') = (expires_at IS NOT NULL))
);
-- The sweeper's queue: active cart holds by expiry.
CREATE INDEX reservations_expiry_idx ON reservation.reservations (expires_at)
    WHERE status = 'active' AND kind = 'cart';
CREATE INDEX reservations_reference_idx ON reservation.reservations (channel, reference);

-- held = quantity - consumed while active; 0 once the line ended.
CREATE TABLE reservation.reservation_lines (
    reservation_id     uuid NOT NULL REFERENCES reservation.reservations (reservation_id),
    -- Lines per reservation: int32 on the wire too, at most 100.
    -- squawk-ignore prefer-bigint-over-int
    line_number        integer NOT NULL CHECK (line_number > 0),
    sku                text NOT NULL,
    location_id        text NOT NULL,
    quantity           bigint NOT NULL CHECK (quantity > 0),
    consumed_quantity  bigint NOT NULL DEFAULT 0 CHECK (consumed_quantity BETWEEN 0 AND quantity),
    status             text NOT NULL
                       CHECK (status IN ('active', 'released', 'expired', 'consumed', 'short')),
    PRIMARY KEY (reservation_id, line_number),
    UNIQUE (reservation_id, sku, location_id)
);
-- Shrinkage picks the newest active lines of one (sku, location).
CREATE INDEX reservation_lines_active_idx ON reservation.reservation_lines (sku, location_id)
    WHERE status = 'active';

-- Units of order holds consumed per fulfilment, so a shipment or collection
-- event applies once however often it arrives.
CREATE TABLE reservation.consumptions (
    fulfilment_id   text NOT NULL,
    reservation_id  uuid NOT NULL REFERENCES reservation.reservations (reservation_id),
    -- squawk-ignore prefer-bigint-over-int
    line_number     integer NOT NULL,
    quantity        bigint NOT NULL CHECK (quantity > 0),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fulfilment_id, reservation_id, line_number)
);

-- migrate:down
-- squawk-ignore ban-drop-table
DROP TABLE reservation.consumptions, reservation.reservation_lines, reservation.reservations,
    reservation.rules_version, reservation.location_safety_stock, reservation.channel_locations,
    reservation.channels, reservation.stock, reservation.locations, reservation.skus,
    reservation.outbox, reservation.inbox, reservation.idempotency_keys,
    reservation.consumer_failures;
