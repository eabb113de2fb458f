-- Units on their way out: a fulfilment's shipment or collection used their
-- order hold, but the ledger's movement for it has not been projected yet.
-- They stay counted against availability (stock.departing) until it is, so
-- that the moment between the two events never offers them for sale again.
-- departures matches the two sides per (fulfilment, sku, location), whichever
-- arrives first; a row is deleted once both sides agree.

-- migrate:up
ALTER TABLE reservation.stock ADD COLUMN departing bigint NOT NULL DEFAULT 0;
-- NOT VALID still checks every row written from now on; the rows already
-- there are 0 by the column's default.
ALTER TABLE reservation.stock
    ADD CONSTRAINT stock_departing_check CHECK (departing >= 0) NOT VALID;

CREATE TABLE reservation.departures (
    fulfilment_id  text NOT NULL,
    sku            text NOT NULL,
    location_id    text NOT NULL,
    -- Units of order holds the fulfilment used here.
    consumed       bigint NOT NULL DEFAULT 0 CHECK (consumed >= 0),
    -- Units the ledger counted leaving here for the fulfilment.
    departed       bigint NOT NULL DEFAULT 0 CHECK (departed >= 0),
    PRIMARY KEY (fulfilment_id, sku, location_id)
);

-- migrate:down
-- squawk-ignore ban-drop-table
DROP TABLE reservation.departures;
-- squawk-ignore ban-drop-constraint
ALTER TABLE reservation.stock DROP CONSTRAINT stock_departing_check;
-- squawk-ignore ban-drop-column
ALTER TABLE reservation.stock DROP COLUMN departing;
