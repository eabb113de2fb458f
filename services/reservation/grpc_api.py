"""The gRPC face of the reservation service: proto → command → handler → proto."""

from __future__ import annotations

from collections.abc import AsyncIterator

from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import reservation_service_pb2_grpc as pb_grpc
from omni.reservation.v1 import resources_pb2
from omnistock import wire
from omnistock.auth.policy import authorize, current_subject, scoped
from omnistock.errors import Aborted
from omnistock.grpc import Context
from omnistock.grpc.server import ServiceBinding
from services.reservation import convert
from services.reservation.domain import Figure
from services.reservation.handlers import (
    ReservationHandlers,
    SkuFigures,
    check_availability_request,
)
from services.reservation.watch import AvailabilityHub


class ReservationServicer(pb_grpc.ReservationServiceServicer):
    """Implements omni.reservation.v1.ReservationService."""

    def __init__(self, handlers: ReservationHandlers, hub: AvailabilityHub) -> None:
        self._handlers = handlers
        self._hub = hub

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        authorize(channel=request.channel)
        result = await self._handlers.reserve(convert.reserve_in(request))
        return pb.ReserveResponse(reservation=convert.reservation_out(result.reservation))

    async def ExtendReservation(
        self, request: pb.ExtendReservationRequest, context: Context
    ) -> pb.ExtendReservationResponse:
        await self._authorize(request.reservation_id)
        reservation = await self._handlers.extend(
            request.request_id,
            request.reservation_id,
            wire.duration_in(request.ttl, request.HasField("ttl"), "ttl"),
        )
        return pb.ExtendReservationResponse(reservation=convert.reservation_out(reservation))

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: Context
    ) -> pb.ReleaseReservationResponse:
        await self._authorize(request.reservation_id)
        reservation = await self._handlers.release(
            request.request_id,
            request.reservation_id,
            list(request.line_numbers),
            request.reason_code,
        )
        return pb.ReleaseReservationResponse(reservation=convert.reservation_out(reservation))

    async def ConvertReservation(
        self, request: pb.ConvertReservationRequest, context: Context
    ) -> pb.ConvertReservationResponse:
        await self._authorize(request.reservation_id)
        reservation = await self._handlers.convert(
            request.request_id, request.reservation_id, request.reference
        )
        return pb.ConvertReservationResponse(reservation=convert.reservation_out(reservation))

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: Context
    ) -> pb.GetReservationResponse:
        reservation = await self._handlers.get(request.reservation_id)
        authorize(channel=reservation.channel)
        return pb.GetReservationResponse(reservation=convert.reservation_out(reservation))

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Context
    ) -> pb.ListReservationsResponse:
        authorize(channel=request.channel)
        found = await self._handlers.list_by_reference(convert.list_reservations_in(request))
        return pb.ListReservationsResponse(reservations=[convert.reservation_out(r) for r in found])

    async def GetAvailability(
        self, request: pb.GetAvailabilityRequest, context: Context
    ) -> pb.GetAvailabilityResponse:
        authorize(channel=request.channel)
        found = await self._handlers.availability(
            request.channel,
            list(request.skus),
            list(request.location_ids),
            request.include_locations,
            request.available_only,
        )
        response = pb.GetAvailabilityResponse(availability=[_sku_out(f) for f in found])
        response.as_of.GetCurrentTime()
        return response

    async def WatchAvailability(
        self, request: pb.WatchAvailabilityRequest, context: Context
    ) -> AsyncIterator[pb.WatchAvailabilityResponse]:
        authorize(channel=request.channel)
        skus, locations = list(request.skus), list(request.location_ids)
        check_availability_request(request.channel, skus, locations)
        # Subscribe before reading the snapshot: a change committed in between
        # is queued, and dropped at sending if the snapshot already had it.
        # Streams are counted per client: the token's subject, or the peer's address.
        client = current_subject() or context.peer()
        subscription = self._hub.subscribe(request.channel, skus, locations, client=client)
        try:
            snapshot = await self._read(request.channel, skus, locations)
            subscription.mark_sent(snapshot)
            yield pb.WatchAvailabilityResponse(
                figures=[convert.figure_out(f) for f in snapshot], snapshot=True
            )
            while True:
                await subscription.ready.wait()
                if subscription.fell_behind:
                    raise Aborted(
                        "WATCH_FELL_BEHIND",
                        "This stream fell too far behind the availability changes; "
                        "resubscribe to get the current figures.",
                    )
                if subscription.refresh:
                    subscription.refresh = False
                    subscription.refreshed(await self._read(request.channel, skus, locations))
                changed = subscription.take()
                if changed:
                    yield pb.WatchAvailabilityResponse(
                        figures=[convert.figure_out(f) for f in changed]
                    )
        finally:
            self._hub.unsubscribe(subscription)

    async def _authorize(self, reservation_id: str) -> None:
        """A channel may touch its own reservations only: load it to know whose it is."""
        if scoped():
            authorize(channel=(await self._handlers.get(reservation_id)).channel)

    async def _read(self, channel: str, skus: list[str], locations: list[str]) -> list[Figure]:
        found = await self._handlers.availability(channel, skus, locations, False)
        return [figure for sku in found for figure in (sku.network, *sku.locations)]

    async def SetChannelRules(
        self, request: pb.SetChannelRulesRequest, context: Context
    ) -> pb.SetChannelRulesResponse:
        rules = await self._handlers.set_channel_rules(
            request.request_id, convert.rules_in(request.rules)
        )
        return pb.SetChannelRulesResponse(rules=convert.rules_out(rules))

    async def SetLocationSafetyStock(
        self, request: pb.SetLocationSafetyStockRequest, context: Context
    ) -> pb.SetLocationSafetyStockResponse:
        units = await self._handlers.set_location_safety(
            request.request_id,
            request.safety_stock.location_id,
            request.safety_stock.safety_stock,
        )
        return pb.SetLocationSafetyStockResponse(
            safety_stock=resources_pb2.LocationSafetyStock(
                location_id=request.safety_stock.location_id, safety_stock=units
            )
        )

    async def ListRules(
        self, request: pb.ListRulesRequest, context: Context
    ) -> pb.ListRulesResponse:
        rules = await self._handlers.rules()
        return pb.ListRulesResponse(
            channels=[convert.rules_out(rules.channels[c]) for c in sorted(rules.channels)],
            location_safety_stock=[
                resources_pb2.LocationSafetyStock(location_id=loc, safety_stock=units)
                for loc, units in sorted(rules.location_safety.items())
            ],
        )


def _sku_out(found: SkuFigures) -> resources_pb2.SkuAvailability:
    return resources_pb2.SkuAvailability(
        sku=found.sku,
        network=convert.figure_out(found.network),
        locations=[convert.figure_out(f) for f in found.locations],
    )


def binding(handlers: ReservationHandlers, hub: AvailabilityHub) -> ServiceBinding:
    """The servicer, ready for the shared gRPC bootstrap."""
    return ServiceBinding(
        full_name=pb.DESCRIPTOR.services_by_name["ReservationService"].full_name,
        servicer=ReservationServicer(handlers, hub),
        register=pb_grpc.add_ReservationServiceServicer_to_server,
    )
