"""Prometheus metrics shared by every service, and the per-process endpoint.

Names follow Prometheus conventions: base units, ``_total`` on counters, and no
SKU, order or reservation ids as labels (they would explode cardinality).
gRPC metrics use the conventional ``grpc_server_*`` names so existing dashboards
and alerts work unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Latency buckets from 0.5 ms to 10 s: most calls here are sub-millisecond to tens of ms.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC until the server finished it.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total",
    "Stream messages sent by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)

OUTBOX_PUBLISHED = Counter(
    "omni_outbox_published_total",
    "Events the outbox relay published to JetStream (acknowledged).",
    ["service"],
)
OUTBOX_DUPLICATES = Counter(
    "omni_outbox_duplicates_total",
    "Publishes JetStream acknowledged as duplicates (an earlier publish was not marked).",
    ["service"],
)
OUTBOX_PUBLISH_ERRORS = Counter(
    "omni_outbox_publish_errors_total",
    "Relay cycles that failed and will be retried.",
    ["service"],
)
OUTBOX_BACKLOG = Gauge(
    "omni_outbox_backlog_events",
    "Events written to the outbox and not yet published.",
    ["service"],
)
OUTBOX_OLDEST_AGE = Gauge(
    "omni_outbox_oldest_unpublished_age_seconds",
    "Age of the oldest unpublished outbox event; 0 when the backlog is empty.",
    ["service"],
)
OUTBOX_PUBLISH_LAG = Histogram(
    "omni_outbox_publish_lag_seconds",
    "Time from commit of an event to its acknowledged publish.",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
OUTBOX_CYCLE_SECONDS = Histogram(
    "omni_outbox_relay_cycle_seconds",
    "Duration of one relay cycle (claim, publish, mark).",
    ["service"],
    buckets=LATENCY_BUCKETS,
)

CONSUMER_MESSAGES = Counter(
    "omni_consumer_messages_total",
    "Messages a consumer finished with, by outcome "
    "(processed, duplicate, ignored, retried, dead_lettered).",
    ["consumer", "outcome"],
)
CONSUMER_HANDLING_SECONDS = Histogram(
    "omni_consumer_handling_seconds",
    "Time to handle one message, transaction included.",
    ["consumer"],
    buckets=LATENCY_BUCKETS,
)
CONSUMER_REDELIVERIES = Counter(
    "omni_consumer_redeliveries_total",
    "Messages received again after an earlier delivery was not acknowledged.",
    ["consumer"],
)
CONSUMER_DEAD_LETTERS = Counter(
    "omni_consumer_dead_letters_total",
    "Messages moved to the dead-letter stream after the last allowed attempt.",
    ["consumer"],
)
CONSUMER_ERRORS = Counter(
    "omni_consumer_errors_total",
    "Fetches or acknowledgements that failed on the NATS side (retried; messages redelivered).",
    ["consumer"],
)
CONSUMER_PENDING = Gauge(
    "omni_consumer_pending_messages",
    "Messages in the stream not yet delivered to the consumer (its lag).",
    ["consumer"],
)
CONSUMER_EVENT_AGE = Histogram(
    "omni_consumer_event_age_seconds",
    "Time from an event's occurrence to its handling by the consumer.",
    ["consumer"],
    buckets=LATENCY_BUCKETS,
)


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port the endpoint listens on."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsEndpoint:
    """Serve the default registry on ``http://host:port/metrics`` in a thread."""
    server, thread = start_http_server(port, addr=host)
    return MetricsEndpoint(server=server, thread=thread)


# -- group commit ---------------------------------------------------------------
GROUP_COMMIT_BATCH_SIZE = Histogram(
    "omni_group_commit_batch_size",
    "Commands committed together in one transaction.",
    ["committer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
GROUP_COMMIT_QUEUE_SECONDS = Histogram(
    "omni_group_commit_queue_seconds",
    "Time a command waited for its batch to start.",
    ["committer"],
)
GROUP_COMMIT_SECONDS = Histogram(
    "omni_group_commit_batch_seconds",
    "Duration of one batch's transaction, retries included.",
    ["committer"],
)

# -- sweepers -------------------------------------------------------------------
SWEEPER_RUNS = Counter(
    "omni_sweeper_runs_total",
    "Sweeper cycles, by outcome (ok, failed).",
    ["sweeper", "outcome"],
)
SWEEPER_SECONDS = Histogram(
    "omni_sweeper_run_seconds",
    "Duration of one sweeper cycle.",
    ["sweeper"],
)
SWEEPER_ITEMS = Counter(
    "omni_sweeper_items_total",
    "Items a sweeper acted on (holds expired, tasks timed out).",
    ["sweeper"],
)
SWEEPER_LAST_SUCCESS = Gauge(
    "omni_sweeper_last_success_timestamp_seconds",
    "Unix time of the sweeper's last successful cycle.",
    ["sweeper"],
)
