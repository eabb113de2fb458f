-- The gauges count open tasks by kind and status every few seconds; ended
-- tasks (and ship tasks once shipped) pile up for ever, so the count reads a
-- partial index of the open ones instead of the whole table.

-- migrate:up
-- Migrations run in a transaction before the services start (see .squawk.toml),
-- so the index cannot be built CONCURRENTLY and nothing waits on it.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX fulfilments_open_idx ON fulfilment.fulfilments (kind, status, created_at)
    WHERE status IN ('created', 'accepted', 'picked', 'packed', 'received', 'ready_for_pickup')
       OR (status = 'shipped' AND kind = 'transfer_to_store');

-- migrate:down
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX fulfilment.fulfilments_open_idx;
