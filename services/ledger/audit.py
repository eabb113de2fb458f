"""The ledger audit: proves on-hand equals the sum of postings, everywhere.

Three independent checks over the whole database, each naming offending rows:
1. every balance equals the sum of its postings (and every key with postings
   has a balance), and its version is the version of its last posting;
2. every posting's running balance equals the previous one plus its delta, and
   balance versions count 1, 2, 3, ... without gaps;
3. every movement has the postings its kind prescribes: their number, their
   SKU and location, a zero sum for transfers and state changes, and for a cycle
   count a running balance equal to the counted quantity;
4. stock in transit at each location equals what open transfers sent there and
   it has not received.
"""

from __future__ import annotations

from dataclasses import dataclass

from omnistock.db import Connection


@dataclass(frozen=True)
class AuditFinding:
    """One row that breaks an invariant."""

    check: str
    sku: str
    location_id: str
    state: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.sku}@{self.location_id}/{self.state}: {self.detail}"


@dataclass(frozen=True)
class AuditReport:
    """The outcome of an audit."""

    balances_checked: int
    postings_checked: int
    findings: list[AuditFinding]

    @property
    def ok(self) -> bool:
        """True when the ledger balances."""
        return not self.findings


_SUM_CHECK = """
WITH sums AS (
    SELECT sku, location_id, state, sum(quantity_delta) AS total, max(balance_version) AS version
    FROM ledger.postings GROUP BY sku, location_id, state
)
SELECT coalesce(b.sku, s.sku) AS sku, coalesce(b.location_id, s.location_id) AS location_id,
       coalesce(b.state, s.state) AS state, b.on_hand, s.total, b.version, s.version AS last_version
FROM ledger.balances b
FULL OUTER JOIN sums s USING (sku, location_id, state)
WHERE b.on_hand IS DISTINCT FROM coalesce(s.total, 0)
   OR b.version IS DISTINCT FROM coalesce(s.version, 0)
ORDER BY 1, 2, 3
"""

_CHAIN_CHECK = """
SELECT sku, location_id, state, ledger_sequence, balance_version, quantity_delta,
       on_hand_after, expected_after, expected_version
FROM (
    SELECT p.*,
           coalesce(lag(on_hand_after) OVER w, 0) + quantity_delta AS expected_after,
           row_number() OVER w AS expected_version
    FROM ledger.postings p
    WINDOW w AS (PARTITION BY sku, location_id, state ORDER BY balance_version)
) chained
WHERE on_hand_after <> expected_after OR balance_version <> expected_version
ORDER BY sku, location_id, state, balance_version
"""


_MOVEMENT_CHECK = """
WITH shape AS (
    SELECT m.movement_id, m.kind, m.sku, m.location_id, m.counterpart_location_id,
           m.counted_quantity,
           count(p.*) AS postings,
           coalesce(sum(p.quantity_delta), 0) AS net,
           bool_and(p.sku = m.sku) AS same_sku,
           bool_and(p.location_id IN (m.location_id, m.counterpart_location_id)) AS same_places,
           max(p.on_hand_after) FILTER (WHERE m.kind = 'cycle_count') AS counted_after,
           min(p.state) AS state
    FROM ledger.movements m LEFT JOIN ledger.postings p USING (movement_id)
    GROUP BY m.movement_id
)
SELECT * FROM shape
WHERE postings <> CASE WHEN kind IN ('transfer_out', 'transfer_in', 'state_change')
                       THEN 2 ELSE 1 END
   OR NOT coalesce(same_sku, false) OR NOT coalesce(same_places, false)
   OR (kind IN ('transfer_out', 'transfer_in', 'state_change') AND net <> 0)
   OR (kind = 'cycle_count' AND counted_after IS DISTINCT FROM counted_quantity)
ORDER BY sku, location_id, movement_id
"""

_TRANSIT_CHECK = """
WITH open_transfers AS (
    SELECT sku, destination_location_id AS location_id,
           sum(quantity_sent - quantity_received) AS open
    FROM ledger.transfers GROUP BY 1, 2
), transit AS (
    SELECT sku, location_id, on_hand FROM ledger.balances WHERE state = 'in_transit'
)
SELECT coalesce(t.sku, o.sku) AS sku, coalesce(t.location_id, o.location_id) AS location_id,
       coalesce(t.on_hand, 0) AS on_hand, coalesce(o.open, 0) AS open
FROM transit t FULL OUTER JOIN open_transfers o USING (sku, location_id)
WHERE coalesce(t.on_hand, 0) <> coalesce(o.open, 0)
ORDER BY 1, 2
"""


async def audit(conn: Connection) -> AuditReport:
    """Run every check in one snapshot (REPEATABLE READ), so concurrent writes cannot
    produce false findings."""
    findings: list[AuditFinding] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        balances = await conn.fetchval("SELECT count(*) FROM ledger.balances")
        postings = await conn.fetchval("SELECT count(*) FROM ledger.postings")
        for row in await conn.fetch(_SUM_CHECK):
            if row["on_hand"] is None:
                detail = f"postings sum to {row['total']} but there is no balance row"
            elif row["on_hand"] != (row["total"] or 0):
                detail = f"balance says {row['on_hand']}, postings sum to {row['total'] or 0}"
            else:
                detail = (
                    f"balance version {row['version']} but last posting is version "
                    f"{row['last_version'] or 0}"
                )
            findings.append(
                AuditFinding("sum", row["sku"], row["location_id"], row["state"], detail)
            )
        for row in await conn.fetch(_CHAIN_CHECK):
            findings.append(
                AuditFinding(
                    "running-balance",
                    row["sku"],
                    row["location_id"],
                    row["state"],
                    f"posting #{row['ledger_sequence']} (version {row['balance_version']}, "
                    f"delta {row['quantity_delta']}) says on hand {row['on_hand_after']}, "
                    f"expected {row['expected_after']} at version {row['expected_version']}",
                )
            )
        for row in await conn.fetch(_MOVEMENT_CHECK):
            findings.append(
                AuditFinding(
                    "movement",
                    row["sku"],
                    row["location_id"],
                    row["state"] or "-",
                    f"{row['kind']} {row['movement_id']} has {row['postings']} posting(s) "
                    f"netting {row['net']}"
                    + (
                        f", count {row['counted_quantity']} but on hand after "
                        f"{row['counted_after']}"
                        if row["kind"] == "cycle_count"
                        else ""
                    ),
                )
            )
        for row in await conn.fetch(_TRANSIT_CHECK):
            findings.append(
                AuditFinding(
                    "in-transit",
                    row["sku"],
                    row["location_id"],
                    "in_transit",
                    f"{row['on_hand']} in transit but open transfers sent {row['open']}",
                )
            )
    return AuditReport(int(balances), int(postings), findings)
