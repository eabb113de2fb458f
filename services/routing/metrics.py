"""Domain metrics of the routing service (``omni_routing_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from omnistock.metrics import LATENCY_BUCKETS

ROUTE_OUTCOMES = Counter(
    "omni_routing_orders_total",
    "RouteOrder calls by outcome: routed, partial (some units unsourced), unsourced, "
    "replayed, invalid, conflict.",
    ["outcome"],
)
QUOTES = Counter(
    "omni_routing_quotes_total",
    "QuoteOrder calls by outcome: sourced, partial, unsourced, invalid.",
    ["outcome"],
)
REPLANS = Counter(
    "omni_routing_replans_total",
    "Plans redone because stock moved between plan and hold, or a source's capacity filled.",
    ["cause"],
)
# Every cause is exported from the start, at 0, so that the first replan is
# seen by increase() and rate() instead of creating its series.
for _cause in ("capacity", "stock_moved"):
    REPLANS.labels(_cause)

REROUTES = Counter(
    "omni_routing_reroutes_total",
    "Orders routed again after a source failed them, by cause.",
    ["cause"],
)
NEEDS_ATTENTION = Counter(
    "omni_routing_orders_needing_attention_total",
    "Orders marked as needing attention because units could not be sourced anywhere.",
)
ORDERS_NEEDING_ATTENTION = Gauge(
    "omni_routing_orders_awaiting_attention",
    "Orders needing attention now (refreshed by the gauge sweeper).",
)
PLAN_SECONDS = Histogram(
    "omni_routing_plan_duration_seconds",
    "Time the planner took for one plan (pure computation, no I/O).",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
SEARCH_TRUNCATED = Counter(
    "omni_routing_search_truncated_total",
    "Plans whose search hit its node budget and kept the best plan found so far.",
)
PLANNED_SHIPMENTS = Histogram(
    "omni_routing_plan_shipments",
    "Shipments (or pickup sources) per plan.",
    buckets=(0, 1, 2, 3, 4, 6, 10),
)
CANCELLED_LINES = Counter(
    "omni_routing_cancelled_lines_total",
    "Order lines cancelled by CancelOrder.",
)
RETURNS = Counter(
    "omni_routing_returned_units_total",
    "Units returned at stores, by disposition.",
    ["disposition"],
)
