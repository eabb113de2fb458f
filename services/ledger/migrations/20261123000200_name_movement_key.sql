-- Give the idempotency key of movements a stable name: the ledger retries a
-- transaction that lost a race on exactly this constraint (two scanners posting
-- one key at once) and must recognise it by name. Only this service's code
-- refers to the name, so renaming it breaks no client.
-- squawk-ignore-file renaming-object

-- migrate:up
ALTER TABLE ledger.movements
    RENAME CONSTRAINT movements_device_id_device_sequence_key TO movements_idempotency_key;

-- migrate:down
ALTER TABLE ledger.movements
    RENAME CONSTRAINT movements_idempotency_key TO movements_device_id_device_sequence_key;
