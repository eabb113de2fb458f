"""The gRPC face of the stock ledger: proto → command → handler → proto, nothing more."""

from __future__ import annotations

from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import ledger_service_pb2_grpc as pb_grpc
from omni.ledger.v1 import resources_pb2
from omnistock import wire
from omnistock.auth.policy import authorize
from omnistock.grpc import Context
from omnistock.grpc.server import ServiceBinding
from services.ledger import convert
from services.ledger.handlers import LedgerHandlers


class StockLedgerServicer(pb_grpc.StockLedgerServiceServicer):
    """Implements omni.ledger.v1.StockLedgerService."""

    def __init__(self, handlers: LedgerHandlers) -> None:
        self._handlers = handlers

    async def PostMovements(
        self, request: pb.PostMovementsRequest, context: Context
    ) -> pb.PostMovementsResponse:
        # A scanner may post at its own locations only: the whole batch is refused
        # if one movement is elsewhere.
        authorize(locations=[m.location_id for m in request.movements])
        results = await self._handlers.post_movements(
            [convert.movement_in(m, i) for i, m in enumerate(request.movements)]
        )
        return pb.PostMovementsResponse(
            results=[
                pb.PostedMovement(movement=convert.movement_out(r.movement), replayed=r.replayed)
                for r in results
            ]
        )

    async def GetStockLevels(
        self, request: pb.GetStockLevelsRequest, context: Context
    ) -> pb.GetStockLevelsResponse:
        authorize(locations=list(request.location_ids))
        as_of = wire.timestamp_in(request.as_of, request.HasField("as_of"), "as_of")
        states = convert.states_filter(request.states, "states")
        levels = await self._handlers.stock_levels(
            skus=list(request.skus),
            locations=list(request.location_ids),
            states=states,
            as_of=as_of,
            include_zero=request.include_zero,
        )
        response = pb.GetStockLevelsResponse(
            levels=[
                resources_pb2.StockLevel(
                    stock=convert.stock_key_out(key),
                    on_hand=on_hand,
                    balance_version=version,
                    updated_at=wire.timestamp_out(updated_at),
                )
                for key, on_hand, version, updated_at in levels
            ]
        )
        if as_of is not None:
            response.as_of.CopyFrom(request.as_of)
        else:
            response.as_of.GetCurrentTime()
        return response

    async def ListMovements(
        self, request: pb.ListMovementsRequest, context: Context
    ) -> pb.ListMovementsResponse:
        authorize(locations=[request.location_id])
        rows, next_token = await self._handlers.history(
            sku=request.sku,
            location_id=request.location_id,
            recorded_from=wire.timestamp_in(
                request.recorded_from, request.HasField("recorded_from"), "recorded_from"
            ),
            recorded_to=wire.timestamp_in(
                request.recorded_to, request.HasField("recorded_to"), "recorded_to"
            ),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListMovementsResponse(
            rows=[
                pb.MovementHistoryRow(
                    posting=convert.posting_out(posting),
                    movement_id=movement.movement_id,
                    kind=convert.kind_out(movement.kind),
                    key=convert.key_out(movement.key),
                    occurred_at=wire.timestamp_out(movement.occurred_at),
                    recorded_at=wire.timestamp_out(movement.recorded_at),
                    reason_code=movement.reason_code,
                    reference=movement.reference,
                )
                for posting, movement in rows
            ],
            next_page_token=next_token,
        )

    async def UpsertLocations(
        self, request: pb.UpsertLocationsRequest, context: Context
    ) -> pb.UpsertLocationsResponse:
        stored = await self._handlers.upsert_locations(
            request.request_id, [convert.location_in(loc) for loc in request.locations]
        )
        return pb.UpsertLocationsResponse(locations=[convert.location_out(loc) for loc in stored])

    async def ListLocations(
        self, request: pb.ListLocationsRequest, context: Context
    ) -> pb.ListLocationsResponse:
        found = await self._handlers.locations(convert.location_kind_filter(request.kind))
        return pb.ListLocationsResponse(locations=[convert.location_out(loc) for loc in found])

    async def UpsertSkus(
        self, request: pb.UpsertSkusRequest, context: Context
    ) -> pb.UpsertSkusResponse:
        stored = await self._handlers.upsert_skus(
            request.request_id, [convert.sku_in(s) for s in request.skus]
        )
        return pb.UpsertSkusResponse(skus=[convert.sku_out(s) for s in stored])

    async def ListSkus(self, request: pb.ListSkusRequest, context: Context) -> pb.ListSkusResponse:
        skus, next_token = await self._handlers.skus(
            product_id=request.product_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSkusResponse(
            skus=[convert.sku_out(s) for s in skus], next_page_token=next_token
        )


def binding(handlers: LedgerHandlers) -> ServiceBinding:
    """The servicer, ready for the shared gRPC bootstrap."""
    return ServiceBinding(
        full_name=pb.DESCRIPTOR.services_by_name["StockLedgerService"].full_name,
        servicer=StockLedgerServicer(handlers),
        register=pb_grpc.add_StockLedgerServiceServicer_to_server,
    )
