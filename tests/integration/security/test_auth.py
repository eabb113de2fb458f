"""Authentication and roles through real gRPC: who may call what, and nothing written."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as fulfilment_grpc
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omnistock.auth.tokens import Role
from omnistock.db import Pool
from omnistock.grpc.client import ChannelFactory
from omnistock.grpc.health import health_check
from omnistock.service import RunningService
from tests.conftest import Network, harness_auth
from tests.integration.conftest import FulfilmentStub, eventually
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import ORDER, Shop, reserve_request
from tests.integration.routing.conftest import AMSTERDAM, NIEUWEGEIN, UTRECHT, World
from tests.integration.security.conftest import Caller

LEDGER = "omni.ledger.v1.StockLedgerService"
RESERVATION = "omni.reservation.v1.ReservationService"
FULFILMENT = "omni.fulfilment.v1.FulfilmentService"


def denials(service: str, method: str, code: str, reason: str) -> float:
    labels = {"service": service, "method": method, "code": code, "reason": reason}
    return REGISTRY.get_sample_value("omni_auth_denied_total", labels) or 0.0


def address(service: RunningService) -> str:
    return f"127.0.0.1:{service.grpc_port}"


async def test_no_or_an_invalid_token_is_unauthenticated_and_counted(
    ledger_service: RunningService, channels: ChannelFactory
) -> None:
    missing = denials(LEDGER, "ListLocations", "UNAUTHENTICATED", "missing_token")
    expired_before = denials(LEDGER, "ListLocations", "UNAUTHENTICATED", "expired_token")
    expired = harness_auth().key.mint(
        subject="old", role=Role.ADMIN, issuer="omnistock", audience="omnistock",
        ttl_seconds=60, now=time.time() - 3600,
    )  # fmt: skip
    for token, reason in ((None, "MISSING_TOKEN"), ("nonsense", "MALFORMED_TOKEN"),
                          (expired, "EXPIRED_TOKEN")):  # fmt: skip
        async with channels.with_token(token).open(address(ledger_service)) as channel:
            ledger: ledger_grpc.StockLedgerServiceAsyncStub = ledger_grpc.StockLedgerServiceStub(
                channel
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ledger.ListLocations(ledger_pb.ListLocationsRequest())
            seen = failure(caught.value)
            assert seen.code == grpc.StatusCode.UNAUTHENTICATED
            assert seen.info is not None and seen.info.reason == reason
            # Health checks stay open (load balancers and orchestrators probe them).
            reply = await health_check(channel)(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    assert denials(LEDGER, "ListLocations", "UNAUTHENTICATED", "missing_token") == missing + 1
    assert (
        denials(LEDGER, "ListLocations", "UNAUTHENTICATED", "expired_token") == expired_before + 1
    )


async def test_a_role_the_rpc_does_not_allow_is_permission_denied(
    ledger_service: RunningService, reservation_service: RunningService, as_caller: Caller
) -> None:
    before = denials(LEDGER, "UpsertSkus", "PERMISSION_DENIED", "role_not_allowed")
    async with as_caller(address(ledger_service), Role.CHANNEL, ["web"], ()) as channel:
        ledger: ledger_grpc.StockLedgerServiceAsyncStub = ledger_grpc.StockLedgerServiceStub(
            channel
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger.UpsertSkus(
                ledger_pb.UpsertSkusRequest(
                    request_id=f"skus-{uuid.uuid4().hex[:8]}",
                    skus=[ledger_res.Sku(sku=f"SKU-{uuid.uuid4().hex[:8]}", name="x")],
                )
            )
        seen = failure(caught.value)
        assert seen.code == grpc.StatusCode.PERMISSION_DENIED
        assert "channel role may not call" in seen.message
        # Reference data is open to every role.
        await ledger.ListLocations(ledger_pb.ListLocationsRequest())
    assert denials(LEDGER, "UpsertSkus", "PERMISSION_DENIED", "role_not_allowed") == before + 1

    async with as_caller(address(reservation_service), Role.SCANNER, (), ["x"]) as channel:
        reservations: reservation_grpc.ReservationServiceAsyncStub = (
            reservation_grpc.ReservationServiceStub(channel)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reservations.ListRules(reservation_pb.ListRulesRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_channel_cannot_read_or_reserve_for_another_channel(
    shop: Shop, reservation_service: RunningService, as_caller: Caller, pool: Pool
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5)
    intruder = f"app-{uuid.uuid4().hex[:6]}"
    before = denials(RESERVATION, "Reserve", "PERMISSION_DENIED", "channel_not_allowed")
    async with as_caller(address(reservation_service), Role.CHANNEL, [intruder], ()) as channel:
        stub: reservation_grpc.ReservationServiceAsyncStub = (
            reservation_grpc.ReservationServiceStub(channel)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetAvailability(
                reservation_pb.GetAvailabilityRequest(channel=shop.channel, skus=[sku])
            )
        seen = failure(caught.value)
        assert seen.code == grpc.StatusCode.PERMISSION_DENIED
        assert f"may not act for channel '{shop.channel}'" in seen.message
        assert seen.info is not None and seen.info.reason == "CHANNEL_NOT_ALLOWED"
        assert seen.info.metadata["channel"] == shop.channel

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Reserve(reserve_request(shop.channel, [(sku, store, 1)]))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denials(RESERVATION, "Reserve", "PERMISSION_DENIED", "channel_not_allowed") == (
        before + 1
    )
    held = await pool.fetchval(
        "SELECT count(*) FROM reservation.reservations WHERE channel = $1", shop.channel
    )
    assert held == 0  # nothing was written

    # The channel's own token holds stock; the intruder cannot see or release it.
    async with as_caller(address(reservation_service), Role.CHANNEL, [shop.channel], ()) as own:
        mine: reservation_grpc.ReservationServiceAsyncStub = (
            reservation_grpc.ReservationServiceStub(own)
        )
        hold = (
            await mine.Reserve(reserve_request(shop.channel, [(sku, store, 2)], kind=ORDER))
        ).reservation
    async with as_caller(address(reservation_service), Role.CHANNEL, [intruder], ()) as channel:
        stub = reservation_grpc.ReservationServiceStub(channel)
        for call in (
            stub.GetReservation(
                reservation_pb.GetReservationRequest(reservation_id=hold.reservation_id)
            ),
            stub.ReleaseReservation(
                reservation_pb.ReleaseReservationRequest(
                    request_id=f"release-{uuid.uuid4().hex[:8]}",
                    reservation_id=hold.reservation_id,
                    reason_code="NOT_MINE",
                )
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await shop.figure(sku, store)).reserved == 2  # still held


async def test_a_scanner_cannot_post_a_batch_with_one_movement_elsewhere(
    ledger_service: RunningService, network: Network, as_caller: Caller, pool: Pool
) -> None:
    here, there = await network.locations(2)
    [sku] = await network.skus(1)

    def receipt(location: str) -> ledger_res.MovementInput:
        return ledger_res.MovementInput(
            key=network.next_key(), sku=sku, location_id=location,
            receipt=ledger_res.Receipt(quantity=3),
        )  # fmt: skip

    async with as_caller(address(ledger_service), Role.SCANNER, (), [here]) as channel:
        ledger: ledger_grpc.StockLedgerServiceAsyncStub = ledger_grpc.StockLedgerServiceStub(
            channel
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger.PostMovements(
                ledger_pb.PostMovementsRequest(movements=[receipt(here), receipt(there)])
            )
        seen = failure(caught.value)
        assert seen.code == grpc.StatusCode.PERMISSION_DENIED
        assert f"may not act at {there}" in seen.message
        movements = await pool.fetchval("SELECT count(*) FROM ledger.movements WHERE sku = $1", sku)
        assert movements == 0  # the whole batch was refused, the allowed one too

        for locations in ([there], []):  # another location, or all of them
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ledger.GetStockLevels(
                    ledger_pb.GetStockLevelsRequest(skus=[sku], location_ids=locations)
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        posted = await ledger.PostMovements(
            ledger_pb.PostMovementsRequest(movements=[receipt(here)])
        )
        assert posted.results[0].movement.postings[0].on_hand_after == 3
        levels = await ledger.GetStockLevels(
            ledger_pb.GetStockLevelsRequest(skus=[sku], location_ids=[here])
        )
        assert [level.on_hand for level in levels.levels] == [3]


async def test_a_store_works_its_own_queue_and_tasks_only(
    world: World,
    fulfilment: FulfilmentStub,
    fulfilment_service: RunningService,
    as_caller: Caller,
) -> None:
    await world.build({"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM)})
    (sku,) = world.skus
    await world.stock(sku, "utrecht", 2)
    await world.known_to_routing()
    await world.route([(sku, 1)], to=NIEUWEGEIN)
    utrecht, amsterdam = world.id("utrecht"), world.id("amsterdam")

    async def utrecht_queue() -> list[fulfilment_res.Fulfilment]:
        found = await fulfilment.ListFulfilments(
            fulfilment_pb.ListFulfilmentsRequest(location_id=utrecht)
        )
        return list(found.fulfilments)

    (task,) = await eventually(utrecht_queue, lambda q: len(q) == 1)
    before = denials(FULFILMENT, "AcceptFulfilment", "PERMISSION_DENIED", "location_not_allowed")

    async with as_caller(address(fulfilment_service), Role.STORE, (), [amsterdam]) as channel:
        other: fulfilment_grpc.FulfilmentServiceAsyncStub = fulfilment_grpc.FulfilmentServiceStub(
            channel
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await other.ListFulfilments(fulfilment_pb.ListFulfilmentsRequest(location_id=utrecht))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for call in (
            other.AcceptFulfilment(
                fulfilment_pb.AcceptFulfilmentRequest(
                    request_id=f"tablet-{uuid.uuid4().hex[:8]}", fulfilment_id=task.fulfilment_id
                )
            ),
            other.GetFulfilment(
                fulfilment_pb.GetFulfilmentRequest(fulfilment_id=task.fulfilment_id)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            seen = failure(caught.value)
            assert seen.code == grpc.StatusCode.PERMISSION_DENIED
            assert utrecht in seen.message
        assert (await other.ListFulfilments(
            fulfilment_pb.ListFulfilmentsRequest(location_id=amsterdam)
        )).fulfilments == []  # fmt: skip

    assert denials(FULFILMENT, "AcceptFulfilment", "PERMISSION_DENIED", "location_not_allowed") == (
        before + 1
    )
    (unchanged,) = await utrecht_queue()
    assert unchanged.status == fulfilment_res.FULFILMENT_STATUS_CREATED

    async with as_caller(address(fulfilment_service), Role.STORE, (), [utrecht]) as channel:
        own: fulfilment_grpc.FulfilmentServiceAsyncStub = fulfilment_grpc.FulfilmentServiceStub(
            channel
        )
        accepted = await own.AcceptFulfilment(
            fulfilment_pb.AcceptFulfilmentRequest(
                request_id=f"tablet-{uuid.uuid4().hex[:8]}", fulfilment_id=task.fulfilment_id
            )
        )
        assert accepted.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_ACCEPTED
