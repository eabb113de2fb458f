"""Domain metrics of the stock ledger (no SKU or location labels)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MOVEMENTS = Counter(
    "omni_ledger_movements_total",
    "Movements recorded, by kind (replays are not counted again).",
    ["kind"],
)
MOVEMENT_UNITS = Counter(
    "omni_ledger_movement_units_total",
    "Units moved by recorded movements, by kind (absolute quantity of the main posting).",
    ["kind"],
)
REPLAYED = Counter(
    "omni_ledger_movements_replayed_total",
    "Movements posted again under a key already recorded (answered, not counted).",
)
REJECTED_BATCHES = Counter(
    "omni_ledger_batches_rejected_total",
    "Batches rejected whole, by reason.",
    ["reason"],
)
BATCH_SIZE = Histogram(
    "omni_ledger_batch_movements",
    "Movements per PostMovements batch.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
