-- Part of an order hold's line can be let go while the rest stays held: a
-- short pick releases the units the store could not find, and the picked ones
-- stay held until they ship. released_quantity counts those units; a line
-- holds quantity - consumed_quantity - released_quantity while active.

-- migrate:up
ALTER TABLE reservation.reservation_lines
    ADD COLUMN released_quantity bigint NOT NULL DEFAULT 0;
-- NOT VALID still checks every row written from now on; the rows already there
-- have released_quantity 0 and consumed_quantity <= quantity by the older
-- check, so validating them would only hold a lock for nothing.
ALTER TABLE reservation.reservation_lines
    ADD CONSTRAINT reservation_lines_units_check
    CHECK (released_quantity >= 0 AND consumed_quantity + released_quantity <= quantity)
    NOT VALID;

-- migrate:down
-- squawk-ignore ban-drop-constraint
ALTER TABLE reservation.reservation_lines DROP CONSTRAINT reservation_lines_units_check;
-- squawk-ignore ban-drop-column
ALTER TABLE reservation.reservation_lines DROP COLUMN released_quantity;
