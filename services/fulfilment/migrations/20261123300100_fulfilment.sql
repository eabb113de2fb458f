-- The fulfilment service's schema: the tasks each location works on for
-- routed orders, and their items.

-- Indexes here are built on tables this migration creates, so nothing waits on them.
-- squawk-ignore-file require-concurrent-index-creation

-- migrate:up
SELECT omni_runtime.install_messaging('fulfilment');

-- One task per (order, routing plan, source location, kind). The pickup code
-- is kept only as a keyed hash. accept_by: after it an unaccepted task is
-- treated as rejected; collect_by: after it an uncollected pickup expires.
CREATE TABLE fulfilment.fulfilments (
    fulfilment_id       uuid PRIMARY KEY,
    order_id            text NOT NULL,
    plan_number         bigint NOT NULL,
    channel             text NOT NULL,
    location_id         text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('ship_from_store',
                            'ship_from_distribution_centre', 'pickup_at_store', 'transfer_to_store')),
    pickup_location_id  text NOT NULL DEFAULT '',
    status              text NOT NULL CHECK (status IN ('created', 'accepted', 'picked', 'packed',
                            'shipped', 'received', 'ready_for_pickup', 'collected', 'rejected',
                            'cancelled', 'expired')),
    carrier             text NOT NULL DEFAULT '',
    tracking_number     text NOT NULL DEFAULT '',
    reason_code         text NOT NULL DEFAULT '',
    pickup_code_hash    bytea,
    accept_by           timestamptz,
    collect_by          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, plan_number, location_id, kind)
);
-- A location's work queue, oldest first.
CREATE INDEX fulfilments_queue_idx ON fulfilment.fulfilments (location_id, status, created_at);
-- Tasks of an order (cancellations).
CREATE INDEX fulfilments_order_idx ON fulfilment.fulfilments (order_id);
-- What the sweepers look for.
CREATE INDEX fulfilments_accept_by_idx ON fulfilment.fulfilments (accept_by) WHERE status = 'created';
CREATE INDEX fulfilments_collect_by_idx ON fulfilment.fulfilments (collect_by)
    WHERE status = 'ready_for_pickup';

CREATE TABLE fulfilment.fulfilment_items (
    fulfilment_id    uuid NOT NULL REFERENCES fulfilment.fulfilments (fulfilment_id),
    line_number      bigint NOT NULL,
    sku              text NOT NULL,
    quantity         bigint NOT NULL CHECK (quantity >= 1),
    picked_quantity  bigint NOT NULL DEFAULT 0 CHECK (picked_quantity >= 0 AND picked_quantity <= quantity),
    PRIMARY KEY (fulfilment_id, sku)
);

-- migrate:down
-- squawk-ignore ban-drop-table
DROP TABLE fulfilment.fulfilment_items, fulfilment.fulfilments,
    fulfilment.outbox, fulfilment.inbox, fulfilment.idempotency_keys, fulfilment.consumer_failures;
