-- Count a consumer's failed attempts per event in the consumer's own schema, so
-- that only real handler failures lead to a dead letter: JetStream's delivery
-- count also grows while the database is unreachable, which is no reason to give
-- up on a good event.
-- The old install function is renamed and wrapped; only migrations call it.
-- squawk-ignore-file renaming-object, ban-drop-function

-- migrate:up
CREATE FUNCTION omni_runtime.install_consumer_failures(target_schema text) RETURNS void
LANGUAGE plpgsql AS $install$
BEGIN
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %1$I.consumer_failures (
            consumer    text        NOT NULL,
            event_id    uuid        NOT NULL,
            failures    integer     NOT NULL,
            last_error  text        NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, event_id)
        );
    $ddl$, target_schema);
END
$install$;

-- install_messaging keeps installing what it did, plus the failure counts.
ALTER FUNCTION omni_runtime.install_messaging(text) RENAME TO install_messaging_v1;
CREATE FUNCTION omni_runtime.install_messaging(target_schema text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM omni_runtime.install_messaging_v1(target_schema);
    PERFORM omni_runtime.install_consumer_failures(target_schema);
END
$$;

-- Schemas installed before this migration get the table too.
DO $$
DECLARE
    existing record;
BEGIN
    FOR existing IN SELECT schemaname FROM pg_tables WHERE tablename = 'inbox' LOOP
        PERFORM omni_runtime.install_consumer_failures(existing.schemaname);
    END LOOP;
END
$$;

-- migrate:down
DROP FUNCTION omni_runtime.install_messaging(text);
ALTER FUNCTION omni_runtime.install_messaging_v1(text) RENAME TO install_messaging;
DROP FUNCTION omni_runtime.install_consumer_failures(text);
