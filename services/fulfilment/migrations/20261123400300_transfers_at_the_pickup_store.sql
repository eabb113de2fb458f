-- Transfers at the pickup store: the store's queue shows the transfers coming
-- to it, and a transfer whose order was cancelled while it was on the road
-- ends when it arrives (cancel_on_arrival): the goods are received into the
-- store's stock and nobody holds them for the order any more.

-- migrate:up
ALTER TABLE fulfilment.fulfilments
    ADD COLUMN cancel_on_arrival boolean NOT NULL DEFAULT false;
-- Migrations run in a transaction before the services start (see .squawk.toml),
-- so the index cannot be built CONCURRENTLY and nothing waits on it.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX fulfilments_incoming_idx
    ON fulfilment.fulfilments (pickup_location_id, status, created_at)
    WHERE kind = 'transfer_to_store';

-- migrate:down
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX fulfilment.fulfilments_incoming_idx;
-- squawk-ignore ban-drop-column
ALTER TABLE fulfilment.fulfilments DROP COLUMN cancel_on_arrival;
