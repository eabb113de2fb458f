-- The runtime's own schema. It holds one function that installs the messaging
-- tables (outbox, inbox, idempotency keys) into a service's schema, so every
-- service owns identical tables in its own schema without copying their DDL.

-- migrate:up
CREATE SCHEMA IF NOT EXISTS omni_runtime;

-- Wakes the outbox relay of a schema as soon as a transaction that wrote events
-- commits (NOTIFY is delivered on commit only).
CREATE FUNCTION omni_runtime.notify_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('omni_outbox_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END
$$;

CREATE FUNCTION omni_runtime.install_messaging(target_schema text) RETURNS void
LANGUAGE plpgsql AS $install$
BEGIN
    EXECUTE format($ddl$
        -- Events written in the same transaction as the state change they report.
        CREATE TABLE %1$I.outbox (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id      uuid        NOT NULL UNIQUE,
            subject       text        NOT NULL,
            envelope      bytea       NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
            published_at  timestamptz
        );
        CREATE INDEX outbox_unpublished_idx ON %1$I.outbox (id) WHERE published_at IS NULL;
        CREATE INDEX outbox_published_at_idx ON %1$I.outbox (published_at) WHERE published_at IS NOT NULL;
        CREATE TRIGGER outbox_notify AFTER INSERT ON %1$I.outbox
            FOR EACH STATEMENT EXECUTE FUNCTION omni_runtime.notify_outbox();

        -- Event ids a consumer has applied, written with the effect of the event.
        CREATE TABLE %1$I.inbox (
            consumer      text        NOT NULL,
            event_id      uuid        NOT NULL,
            processed_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, event_id)
        );

        -- First answers of idempotent requests (AIP-155 request_id).
        CREATE TABLE %1$I.idempotency_keys (
            method        text        NOT NULL,
            request_id    text        NOT NULL,
            request_hash  bytea       NOT NULL,
            response      bytea       NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT idempotency_keys_pkey PRIMARY KEY (method, request_id)
        );
    $ddl$, target_schema);
END
$install$;

-- migrate:down
-- squawk-ignore ban-drop-schema
DROP SCHEMA omni_runtime CASCADE;
