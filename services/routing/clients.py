"""Routing's calls to the reservation service and the ledger, as domain answers.

A failed call becomes a domain error: stock that moved is :class:`StockMoved`
(the caller plans again), a service that is away is UNAVAILABLE-like
``Aborted`` (the caller retries later), anything else is a bug and raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.reservation.v1 import reservation_service_pb2 as res_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as res_grpc
from omni.reservation.v1 import resources_pb2 as res_resources
from omnistock.errors import Aborted, FieldViolation, InvalidArgument
from omnistock.grpc.client import ChannelFactory
from omnistock.grpc.errors import bad_request, error_info

S = TypeVar("S")
CALL_TIMEOUT_SECONDS = 5.0
# Channel rules change rarely; they only label locations in a plan's reasons
# (planning itself follows the availability answer), so a short cache does.
RULES_CACHE_SECONDS = 5.0


class StockMoved(Exception):
    """A hold failed because stock moved since the plan; names the short (sku, location)s."""

    def __init__(self, short: Sequence[tuple[str, str]]) -> None:
        super().__init__(f"stock moved at {short}")
        self.short = list(short)


@dataclass(frozen=True)
class Availability:
    """Available-to-promise for one channel: per (sku, location), and where it sells."""

    units: dict[tuple[str, str], int]
    sellable: frozenset[str]


@dataclass(frozen=True)
class HeldLine:
    """One active line of a reservation."""

    line_number: int
    sku: str
    location_id: str
    held: int


@dataclass(frozen=True)
class Hold:
    """A reservation as routing needs to know it."""

    reservation_id: str
    channel: str
    kind: int
    status: int
    lines: tuple[HeldLine, ...]

    @property
    def active(self) -> bool:
        """Still holding something."""
        return self.status == res_resources.RESERVATION_STATUS_ACTIVE


def _hold(r: res_resources.Reservation) -> Hold:
    return Hold(
        r.reservation_id,
        r.channel,
        r.kind,
        r.status,
        tuple(
            HeldLine(line.line_number, line.sku, line.location_id, line.held_quantity)
            for line in r.lines
            if line.status == res_resources.LINE_STATUS_ACTIVE and line.held_quantity > 0
        ),
    )


def _unavailable(what: str, error: grpc.aio.AioRpcError) -> Aborted:
    return Aborted(
        "DEPENDENCY_UNAVAILABLE",
        f"{what} did not answer ({error.code().name}); retry shortly.",
        {"dependency": what},
    )


_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


class _Channel:
    """A channel to another service, opened on first use (inside the running loop)."""

    def __init__(self, target: str, channels: ChannelFactory) -> None:
        self._target = target
        self._channels_factory = channels
        self._channel: grpc.aio.Channel | None = None
        self._stub: object = None

    def _stub_of(self, make: Callable[[grpc.aio.Channel], S]) -> S:
        """The stub ``make`` builds on the open channel, built once per channel."""
        if self._channel is None:
            self._channel = self._channels_factory.open(self._target)
            self._stub = make(self._channel)
        return cast(S, self._stub)

    async def close(self) -> None:
        """Close the channel; the next call opens a new one."""
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None


class ReservationClient(_Channel):
    """The reservation service, from routing's side."""

    def __init__(self, target: str, channels: ChannelFactory) -> None:
        super().__init__(target, channels)
        self._channels: dict[str, frozenset[str]] = {}
        self._rules_read_at = -math.inf

    @property
    def stub(self) -> res_grpc.ReservationServiceAsyncStub:
        """The service's stub."""
        return self._stub_of(res_grpc.ReservationServiceStub)

    async def availability(self, channel: str, skus: Sequence[str]) -> Availability:
        """ATP of ``skus`` at every location ``channel`` sells from.

        An unknown SKU or channel is the caller's mistake: INVALID_ARGUMENT
        naming the order's line.
        """
        request = res_pb.GetAvailabilityRequest(
            channel=channel, skus=skus, include_locations=True, available_only=True
        )
        try:
            response = await self.stub.GetAvailability(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise self._refused(error, skus) from error
        units: dict[tuple[str, str], int] = {}
        for sku in response.availability:
            for figure in sku.locations:
                units[(sku.sku, figure.location_id)] = figure.available
        # Where the channel sells, for the plan's reasons; a location with units
        # available is one it sells from whatever the cache says.
        sellable = await self._channel_locations(channel)
        return Availability(units, sellable | {loc for _, loc in units})

    async def _channel_locations(self, channel: str) -> frozenset[str]:
        """The locations ``channel`` sells from, cached for a few seconds."""
        now = time.monotonic()
        if channel not in self._channels or now - self._rules_read_at > RULES_CACHE_SECONDS:
            try:
                response = await self.stub.ListRules(
                    res_pb.ListRulesRequest(), timeout=CALL_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in _TRANSIENT:
                    raise _unavailable("the reservation service", error) from error
                raise
            self._channels = {c.channel: frozenset(c.location_ids) for c in response.channels}
            self._rules_read_at = now
        return self._channels.get(channel, frozenset())

    def _refused(self, error: grpc.aio.AioRpcError, skus: Sequence[str]) -> Exception:
        if error.code() in _TRANSIENT:
            return _unavailable("the reservation service", error)
        info = error_info(error)
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            detail = bad_request(error)
            problems = []
            for violation in detail.field_violations if detail else ():
                path = violation.field
                if path.startswith("skus["):
                    index = int(path[5 : path.index("]")])
                    path = f"lines[{index}].sku"
                problems.append(FieldViolation(path, violation.description))
            return InvalidArgument(problems or [FieldViolation("", error.details() or "")])
        if info is not None and info.reason == "CHANNEL_NOT_FOUND":
            return InvalidArgument(
                [FieldViolation("channel", error.details() or "unknown channel")]
            )
        return error

    async def reserve(
        self, request_id: str, channel: str, order_id: str, lines: Mapping[tuple[str, str], int]
    ) -> Hold:
        """Hold ``lines`` ((sku, location) → units) for the order, all or nothing."""
        request = res_pb.ReserveRequest(
            request_id=request_id,
            channel=channel,
            reference=order_id,
            kind=res_resources.RESERVATION_KIND_ORDER,
            lines=[
                res_pb.ReserveLine(sku=sku, location_id=loc, quantity=q)
                for (sku, loc), q in sorted(lines.items())
            ],
        )
        try:
            response = await self.stub.Reserve(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if info is not None and info.reason == "INSUFFICIENT_STOCK":
                short = sorted(
                    (info.metadata[key], info.metadata[key.replace("_sku", "_location_id")])
                    for key in info.metadata
                    if key.startswith("line_") and key.endswith("_sku")
                )
                raise StockMoved(short) from error
            if error.code() in _TRANSIENT:
                raise _unavailable("the reservation service", error) from error
            raise
        return _hold(response.reservation)

    async def release(
        self, request_id: str, reservation_id: str, line_numbers: Sequence[int], reason: str
    ) -> None:
        """Let go of lines of a reservation; lines that already ended are fine."""
        request = res_pb.ReleaseReservationRequest(
            request_id=request_id,
            reservation_id=reservation_id,
            line_numbers=sorted(line_numbers),
            reason_code=reason,
        )
        try:
            await self.stub.ReleaseReservation(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if info is not None and info.reason == "RESERVATION_ENDED":
                return
            if info is not None and info.reason == "LINE_ENDED":
                # Some lines ended meanwhile (consumed, expired): release the rest.
                hold = await self.get(reservation_id)
                active = {line.line_number for line in hold.lines} if hold else set()
                rest = [n for n in line_numbers if n in active]
                if rest and len(rest) < len(line_numbers):
                    await self.release(f"{request_id}:rest", reservation_id, rest, reason)
                return
            if error.code() in _TRANSIENT:
                raise _unavailable("the reservation service", error) from error
            raise

    async def convert(self, request_id: str, reservation_id: str, order_id: str) -> Hold | None:
        """Turn a cart hold into the order's hold; None when it ended meanwhile."""
        request = res_pb.ConvertReservationRequest(
            request_id=request_id, reservation_id=reservation_id, reference=order_id
        )
        try:
            response = await self.stub.ConvertReservation(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if info is not None and info.reason == "RESERVATION_ENDED":
                return None
            if error.code() in _TRANSIENT:
                raise _unavailable("the reservation service", error) from error
            raise
        return _hold(response.reservation)

    async def get(self, reservation_id: str) -> Hold | None:
        """One reservation; None when there is none with that id."""
        request = res_pb.GetReservationRequest(reservation_id=reservation_id)
        try:
            response = await self.stub.GetReservation(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            if error.code() in _TRANSIENT:
                raise _unavailable("the reservation service", error) from error
            raise
        return _hold(response.reservation)

    async def active_for(self, channel: str, order_id: str) -> list[Hold]:
        """The order's reservations that still hold something."""
        request = res_pb.ListReservationsRequest(
            channel=channel,
            reference=order_id,
            statuses=[res_resources.RESERVATION_STATUS_ACTIVE],
        )
        try:
            response = await self.stub.ListReservations(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() in _TRANSIENT:
                raise _unavailable("the reservation service", error) from error
            raise
        return [_hold(r) for r in response.reservations]


class LedgerClient(_Channel):
    """The stock ledger, from routing's side (what a store carries)."""

    @property
    def stub(self) -> ledger_grpc.StockLedgerServiceAsyncStub:
        """The service's stub."""
        return self._stub_of(ledger_grpc.StockLedgerServiceStub)

    async def carried(self, location_id: str, skus: Sequence[str]) -> set[str]:
        """The ones of ``skus`` the location has stocked (a sellable level exists, even zero)."""
        request = ledger_pb.GetStockLevelsRequest(
            skus=skus,
            location_ids=[location_id],
            states=[types_pb2.STOCK_STATE_SELLABLE],
            include_zero=True,
        )
        try:
            response = await self.stub.GetStockLevels(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() in _TRANSIENT:
                raise _unavailable("the stock ledger", error) from error
            raise
        return {level.stock.sku for level in response.levels}
