"""Unit tests of pure runtime pieces: error mapping, envelopes, declarations, settings."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from omni.common.v1 import types_pb2
from omnistock.errors import FailedPrecondition, FieldViolation, InvalidArgument
from omnistock.grpc.errors import internal_status, to_status
from omnistock.logs import correlation_scope
from omnistock.messaging.envelope import OutgoingEvent, unpack, wrap
from omnistock.messaging.streams import load_declarations, parse_duration
from omnistock.settings import Settings
from services.registry import STREAMS_FILE


def details(status: grpc.Status) -> status_pb2.Status:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no rich status")


def test_a_precondition_maps_to_failed_precondition_with_error_info() -> None:
    error = FailedPrecondition("NEGATIVE_ON_HAND", "Only 3 on hand.", {"sku": "SKU-1"})
    status = to_status(error)
    rich = details(status)
    info = error_details_pb2.ErrorInfo()
    rich.details[0].Unpack(info)

    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "Only 3 on hand."
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "NEGATIVE_ON_HAND",
        "omnistock.io",
        {"sku": "SKU-1"},
    )


def test_an_invalid_argument_lists_every_field_in_bad_request() -> None:
    error = InvalidArgument([FieldViolation("a", "is wrong"), FieldViolation("b.c", "too big")])
    rich = details(to_status(error))
    bad = error_details_pb2.BadRequest()
    rich.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("a", "is wrong"),
        ("b.c", "too big"),
    ]
    assert error.message == "a: is wrong (and 1 more problem)"


def test_unexpected_errors_do_not_leak_internals() -> None:
    status = internal_status()
    assert status.code == grpc.StatusCode.INTERNAL
    assert "Traceback" not in status.details


def test_an_envelope_carries_type_correlation_and_payload() -> None:
    payload = types_pb2.StockKey(sku="SKU-1", location_id="store-a")
    with correlation_scope("corr-1", "cause-1"):
        envelope = wrap(OutgoingEvent("omni.test.thing.happened", payload, "SKU-1"), "ledger")
    assert envelope.event_type == "omni.common.v1.StockKey"
    assert (envelope.correlation_id, envelope.causation_id, envelope.producer) == (
        "corr-1",
        "cause-1",
        "ledger",
    )
    assert len(envelope.event_id) == 36
    assert unpack(envelope, types_pb2.StockKey) == payload
    assert unpack(envelope, types_pb2.GeoPoint) is None


def test_the_declared_streams_are_file_backed_with_dedup_windows() -> None:
    declarations = {d.name: d for d in load_declarations(STREAMS_FILE)}
    assert {"OMNI_LEDGER", "OMNI_DLQ"} <= declarations.keys()
    ledger = declarations["OMNI_LEDGER"].to_config()
    assert ledger.subjects == ["omni.ledger.>"]
    assert ledger.duplicate_window == 15 * 60
    assert ledger.storage is not None and ledger.storage.value == "file"
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(30) == 30.0


def test_settings_default_to_the_documented_ports(monkeypatch: object) -> None:
    settings = Settings()
    assert [settings.grpc_port(s) for s in ("ledger", "reservation", "routing", "fulfilment")] == [
        50051,
        50052,
        50053,
        50054,
    ]
    assert [
        settings.metrics_port(s) for s in ("ledger", "reservation", "routing", "fulfilment")
    ] == [
        9101,
        9102,
        9103,
        9104,
    ]
    assert Path(settings.state_dir) == Path(".omni")
