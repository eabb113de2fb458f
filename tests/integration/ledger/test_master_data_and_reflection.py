"""Master data RPCs, request-id idempotency, and a reflection client (buf curl)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import resources_pb2 as res
from omnistock.auth.tokens import Role
from omnistock.service import RunningService
from tests.conftest import LedgerStub, Network, harness_auth
from tests.integration.helpers import failure


def location(location_id: str, name: str) -> res.Location:
    return res.Location(
        location_id=location_id,
        kind=types_pb2.LOCATION_KIND_STORE,
        name=name,
        city="Utrecht",
        position=types_pb2.GeoPoint(latitude=52.09, longitude=5.12),
        capabilities=res.LocationCapabilities(click_and_collect=True, daily_capacity=40),
    )


async def test_upserting_locations_is_idempotent_per_request_id(
    ledger: LedgerStub, network: Network
) -> None:
    request = pb.UpsertLocationsRequest(
        request_id=f"req-{network.tag}", locations=[location(f"loc-{network.tag}", "Utrecht")]
    )
    first = await ledger.UpsertLocations(request)
    again = await ledger.UpsertLocations(request)
    renamed = pb.UpsertLocationsRequest(
        request_id=f"req-{network.tag}",
        locations=[location(f"loc-{network.tag}", "Utrecht Centraal")],
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.UpsertLocations(renamed)

    assert again == first
    rejected = failure(caught.value)
    assert rejected.code == grpc.StatusCode.ALREADY_EXISTS
    assert rejected.info is not None and rejected.info.reason == "REQUEST_ID_REUSED"
    stored = await ledger.ListLocations(pb.ListLocationsRequest())
    names = {loc.location_id: loc.name for loc in stored.locations}
    assert names[f"loc-{network.tag}"] == "Utrecht"


async def test_invalid_master_data_is_rejected_with_every_field_named(ledger: LedgerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.UpsertSkus(
            pb.UpsertSkusRequest(
                request_id="bad-skus",
                skus=[res.Sku(sku="A B", product_id="P", name=""), res.Sku(sku="OK-1", name="x")],
            )
        )
    rejected = failure(caught.value)
    assert rejected.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"skus[0].sku", "skus[0].name", "skus[1].product_id"} <= {
        field for field, _ in rejected.violations
    }
    with pytest.raises(grpc.aio.AioRpcError) as missing_id:
        await ledger.UpsertSkus(
            pb.UpsertSkusRequest(skus=[res.Sku(sku="X", product_id="P", name="n")])
        )
    assert failure(missing_id.value).violations[0][0] == "request_id"


async def test_skus_page_in_id_order(ledger: LedgerStub, network: Network) -> None:
    created = await network.skus(5)
    product = f"P-{network.tag}"
    first = await ledger.ListSkus(pb.ListSkusRequest(product_id=product, page_size=3))
    second = await ledger.ListSkus(
        pb.ListSkusRequest(product_id=product, page_size=3, page_token=first.next_page_token)
    )
    assert [s.sku for s in first.skus] + [s.sku for s in second.skus] == sorted(created)
    assert second.next_page_token == ""


async def buf_curl(*args: str) -> tuple[int, str, str]:
    """Run buf curl without blocking the event loop that serves the in-process server."""
    process = await asyncio.create_subprocess_exec(
        buf_binary(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def buf_binary() -> str:
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.exists() else shutil.which("buf")
    assert found, "buf is a dev dependency (buf-bin) and must be installed"
    return found


async def test_a_reflection_client_gets_an_answer(
    ledger_service: RunningService, ledger: LedgerStub, network: Network
) -> None:
    [store] = await network.locations(1)
    [sku] = await network.skus(1)
    body = {
        "movements": [
            {
                "key": {"deviceId": network.device, "sequence": "1"},
                "sku": sku,
                "locationId": store,
                "receipt": {"quantity": "3"},
            }
        ]
    }
    address = f"http://127.0.0.1:{ledger_service.grpc_port}"
    # A scanner of that store, as the README's examples call it.
    scanner = harness_auth().mint(Role.SCANNER, locations=[store])
    # buf curl knows nothing about our protos: it asks the server by reflection.
    code, out, err = await buf_curl(
        "-H", f"Authorization: Bearer {scanner}",
        "-d", json.dumps(body), f"{address}/omni.ledger.v1.StockLedgerService/PostMovements",
    )  # fmt: skip
    assert code == 0, err
    answer = json.loads(out)
    assert answer["results"][0]["movement"]["postings"][0]["onHandAfter"] == "3"

    code, out, err = await buf_curl(f"{address}/grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
