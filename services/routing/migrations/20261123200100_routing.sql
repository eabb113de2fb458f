-- The routing service's schema: what it knows of the network (locations the
-- ledger announced), its rules, the orders it keeps with their allocations
-- and plans, returns, and the daily capacity each source has given away.
--
-- Lock order, the same for every writer: orders (by id) -> capacity_usage.

-- Indexes here are built on tables this migration creates, so nothing waits on them.
-- squawk-ignore-file require-concurrent-index-creation

-- migrate:up
SELECT omni_runtime.install_messaging('routing');

-- Locations as the ledger announced them (LocationUpserted).
CREATE TABLE routing.locations (
    location_id        text PRIMARY KEY,
    kind               text NOT NULL CHECK (kind IN ('store', 'distribution_centre')),
    name               text NOT NULL,
    latitude           double precision NOT NULL,
    longitude          double precision NOT NULL,
    ship_from_store    boolean NOT NULL,
    click_and_collect  boolean NOT NULL,
    accepts_returns    boolean NOT NULL,
    daily_capacity     bigint NOT NULL CHECK (daily_capacity >= 0),
    closed             boolean NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Bumped with every change of locations, so each replica reloads its cache
-- only when something changed (one cheap read per request).
CREATE TABLE routing.network_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL DEFAULT 0
);
INSERT INTO routing.network_version DEFAULT VALUES;

-- Every version of the routing rules ever in force; the newest applies. A plan
-- names the version that made it, so old versions are kept.
CREATE TABLE routing.rules (
    version     bigint PRIMARY KEY,
    body        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Orders. request holds the RouteOrder request (serialized protobuf) so an
-- interrupted routing can be resumed; plan holds the current Plan. A routing
-- pass takes a lease (lease_token, lease_until) so one worker at a time talks
-- to the reservation service about an order; work_due_at says when the
-- routing worker must (re)route it: an interrupted first routing, or units a
-- source failed.
CREATE TABLE routing.orders (
    order_id             text PRIMARY KEY,
    channel              text NOT NULL,
    delivery_method      text NOT NULL CHECK (delivery_method IN ('ship_to_home', 'click_and_collect')),
    request              bytea NOT NULL,
    request_id           text NOT NULL,
    status               text NOT NULL CHECK (status IN ('routing', 'routed', 'needs_attention', 'fulfilled', 'cancelled')),
    plan_number          bigint NOT NULL DEFAULT 0,
    plan                 bytea,
    failed_location_ids  text[] NOT NULL DEFAULT '{}',
    attention_reason     text NOT NULL DEFAULT '',
    reroute_cause        text NOT NULL DEFAULT '',
    work_due_at          timestamptz,
    lease_token          uuid,
    lease_until          timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_work_due_idx ON routing.orders (work_due_at) WHERE work_due_at IS NOT NULL;
CREATE INDEX orders_attention_idx ON routing.orders (updated_at) WHERE status = 'needs_attention';

CREATE TABLE routing.order_lines (
    order_id            text NOT NULL REFERENCES routing.orders (order_id),
    line_number         bigint NOT NULL CHECK (line_number >= 1),
    sku                 text NOT NULL,
    quantity            bigint NOT NULL CHECK (quantity >= 1),
    cancelled_quantity  bigint NOT NULL DEFAULT 0 CHECK (cancelled_quantity >= 0),
    fulfilled_quantity  bigint NOT NULL DEFAULT 0 CHECK (fulfilled_quantity >= 0),
    returned_quantity   bigint NOT NULL DEFAULT 0 CHECK (returned_quantity >= 0),
    PRIMARY KEY (order_id, line_number),
    CHECK (cancelled_quantity + fulfilled_quantity <= quantity),
    CHECK (returned_quantity <= fulfilled_quantity)
);

-- Units of one line at one source, held by one reservation line.
CREATE TABLE routing.allocations (
    allocation_id       uuid PRIMARY KEY,
    order_id            text NOT NULL REFERENCES routing.orders (order_id),
    line_number         bigint NOT NULL,
    sku                 text NOT NULL,
    location_id         text NOT NULL,
    quantity            bigint NOT NULL CHECK (quantity >= 1),
    fulfilled_quantity  bigint NOT NULL DEFAULT 0 CHECK (fulfilled_quantity >= 0),
    type                text NOT NULL,
    pickup_location_id  text NOT NULL DEFAULT '',
    reservation_id      uuid NOT NULL,
    reservation_line    bigint NOT NULL,
    status              text NOT NULL CHECK (status IN ('held', 'shipped', 'collected', 'failed', 'cancelled', 'expired')),
    plan_number         bigint NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (order_id, line_number) REFERENCES routing.order_lines (order_id, line_number)
);
CREATE INDEX allocations_order_idx ON routing.allocations (order_id);

-- Orders each source took per calendar day (in the rules' time zone); an
-- order counts once per source however often it is rerouted.
CREATE TABLE routing.capacity_usage (
    location_id  text NOT NULL,
    day          date NOT NULL,
    used         bigint NOT NULL CHECK (used >= 0),
    PRIMARY KEY (location_id, day)
);
CREATE TABLE routing.order_sources (
    order_id     text NOT NULL REFERENCES routing.orders (order_id),
    location_id  text NOT NULL,
    day          date NOT NULL,
    PRIMARY KEY (order_id, location_id)
);

-- Returns of orders at stores (the OrderReturn, serialized protobuf).
CREATE TABLE routing.returns (
    return_id   text PRIMARY KEY,
    order_id    text NOT NULL REFERENCES routing.orders (order_id),
    location_id text NOT NULL,
    body        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX returns_order_idx ON routing.returns (order_id);

-- migrate:down
-- squawk-ignore ban-drop-table
DROP TABLE routing.returns, routing.order_sources, routing.capacity_usage,
    routing.allocations, routing.order_lines, routing.orders, routing.rules,
    routing.network_version, routing.locations,
    routing.outbox, routing.inbox, routing.idempotency_keys, routing.consumer_failures;
