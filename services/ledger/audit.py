"""The ledger audit: proves on-hand equals the sum of postings, everywhere.

Three independent checks over the whole database, each naming offending rows:
1. every balance equals the sum of its postings (and every key with postings
   has a balance);
2. every posting's running balance equals the previous one plus its delta, and
   balance versions count 1, 2, 3, ... without gaps;
3. every balance's version is the version of its last posting.
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
    return AuditReport(int(balances), int(postings), findings)
