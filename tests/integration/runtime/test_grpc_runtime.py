"""The shared gRPC bootstrap: metrics per method and code, correlation ids, graceful stop."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import ledger_service_pb2_grpc as pb_grpc
from omnistock.db import Pool
from omnistock.grpc.health import health_check
from omnistock.logs import CORRELATION_HEADER
from omnistock.service import start_service
from omnistock.settings import Settings
from services.ledger.app import SPEC as LEDGER
from tests.conftest import LedgerStub, client_channels

SERVICE = "omni.ledger.v1.StockLedgerService"


def handled(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


async def test_every_rpc_is_counted_by_method_and_code(ledger: LedgerStub) -> None:
    ok_before = handled("ListLocations", "OK")
    bad_before = handled("ListMovements", "INVALID_ARGUMENT")
    timed_before = (
        REGISTRY.get_sample_value(
            "grpc_server_handling_seconds_count",
            {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "ListLocations"},
        )
        or 0.0
    )

    await ledger.ListLocations(pb.ListLocationsRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await ledger.ListMovements(pb.ListMovementsRequest())

    assert handled("ListLocations", "OK") == ok_before + 1
    assert handled("ListMovements", "INVALID_ARGUMENT") == bad_before + 1
    assert (
        REGISTRY.get_sample_value(
            "grpc_server_handling_seconds_count",
            {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "ListLocations"},
        )
        == timed_before + 1
    )


async def test_the_correlation_id_is_echoed_and_generated_when_missing(ledger: LedgerStub) -> None:
    call = ledger.ListLocations(
        pb.ListLocationsRequest(), metadata=((CORRELATION_HEADER, "order-4711"),)
    )
    await call
    echoed = dict(await call.initial_metadata())
    fresh_call = ledger.ListLocations(pb.ListLocationsRequest())
    await fresh_call
    fresh = dict(await fresh_call.initial_metadata())

    assert echoed[CORRELATION_HEADER] == "order-4711"
    assert len(str(fresh[CORRELATION_HEADER])) == 36


async def test_stopping_lets_in_flight_calls_finish_and_refuses_new_ones(
    settings: Settings, pool: Pool
) -> None:
    service = await start_service(LEDGER, settings, grpc_port=0, serve_metrics_endpoint=False)
    async with client_channels(settings).open(f"127.0.0.1:{service.grpc_port}") as channel:
        stub: LedgerStub = pb_grpc.StockLedgerServiceStub(channel)

        async def list_locations() -> pb.ListLocationsResponse:
            return await stub.ListLocations(pb.ListLocationsRequest())

        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            # Calls block on this lock, so they are truly in flight when the stop begins.
            await conn.execute("LOCK TABLE ledger.locations IN ACCESS EXCLUSIVE MODE")
            in_flight = [asyncio.create_task(list_locations()) for _ in range(5)]
            await asyncio.sleep(0.3)
            stopping = asyncio.create_task(service.stop())
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListLocations(pb.ListLocationsRequest(), timeout=2)
            await transaction.commit()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        await stopping

    assert all(isinstance(r, pb.ListLocationsResponse) for r in results), results
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_background_task_that_dies_turns_the_service_not_serving(
    settings: Settings,
) -> None:
    from grpc_health.v1 import health_pb2

    service = await start_service(LEDGER, settings, grpc_port=0, serve_metrics_endpoint=False)
    try:

        async def crashing_consumer() -> None:
            raise RuntimeError("lost its stream for good")

        task = asyncio.create_task(crashing_consumer(), name="test-consumer")
        with pytest.raises(RuntimeError):
            await task
        service.background_task_ended(task)
        await asyncio.sleep(0.1)

        async with client_channels(settings).open(f"127.0.0.1:{service.grpc_port}") as channel:
            reply = await health_check(channel)(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await service.stop()


async def test_a_call_past_its_deadline_is_counted_as_deadline_exceeded(
    ledger: LedgerStub, pool: Pool
) -> None:
    before = handled("ListLocations", "DEADLINE_EXCEEDED")
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE ledger.locations IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger.ListLocations(pb.ListLocationsRequest(), timeout=0.3)
        await asyncio.sleep(0.3)  # the server notices the deadline and cancels its handler
        await transaction.rollback()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = asyncio.get_running_loop().time() + 5
    while handled("ListLocations", "DEADLINE_EXCEEDED") != before + 1:
        assert asyncio.get_running_loop().time() < deadline, "not counted as DEADLINE_EXCEEDED"
        await asyncio.sleep(0.05)
