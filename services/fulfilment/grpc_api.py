"""The gRPC face of the fulfilment service: proto → handler → proto."""

from __future__ import annotations

import secrets
from typing import TypeAlias

from omni.fulfilment.v1 import fulfilment_service_pb2 as pb
from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as pb_grpc
from omni.fulfilment.v1 import resources_pb2
from omnistock.auth.policy import authorize, scoped
from omnistock.grpc import Context
from omnistock.grpc.server import ServiceBinding
from services.fulfilment import convert, domain
from services.fulfilment.handlers import FulfilmentHandlers, Step

# Every step's request carries a request id and the task's id.
StepRequest: TypeAlias = (
    pb.AcceptFulfilmentRequest
    | pb.RejectFulfilmentRequest
    | pb.ConfirmPickRequest
    | pb.PackFulfilmentRequest
    | pb.ShipFulfilmentRequest
    | pb.ReceiveTransferRequest
    | pb.MarkReadyForPickupRequest
    | pb.CollectFulfilmentRequest
    | pb.CancelFulfilmentRequest
)


class FulfilmentServicer(pb_grpc.FulfilmentServiceServicer):
    """Implements omni.fulfilment.v1.FulfilmentService."""

    def __init__(self, handlers: FulfilmentHandlers) -> None:
        self._handlers = handlers

    async def ListFulfilments(
        self, request: pb.ListFulfilmentsRequest, context: Context
    ) -> pb.ListFulfilmentsResponse:
        authorize(locations=[request.location_id])
        page, token = await self._handlers.queue(
            request.location_id, list(request.statuses), request.page_size, request.page_token
        )
        return pb.ListFulfilmentsResponse(
            fulfilments=[convert.fulfilment_out(f) for f in page], next_page_token=token
        )

    async def GetFulfilment(
        self, request: pb.GetFulfilmentRequest, context: Context
    ) -> pb.GetFulfilmentResponse:
        found = await self._handlers.get(request.fulfilment_id)
        authorize(any_of_locations=domain.working_locations(found))
        return pb.GetFulfilmentResponse(fulfilment=convert.fulfilment_out(found))

    async def AcceptFulfilment(
        self, request: pb.AcceptFulfilmentRequest, context: Context
    ) -> pb.AcceptFulfilmentResponse:
        done = await self._step("AcceptFulfilment", request, self._handlers.accept)
        return pb.AcceptFulfilmentResponse(fulfilment=done)

    async def RejectFulfilment(
        self, request: pb.RejectFulfilmentRequest, context: Context
    ) -> pb.RejectFulfilmentResponse:
        step = self._handlers.reject(request.reason_code)
        done = await self._step("RejectFulfilment", request, step)
        return pb.RejectFulfilmentResponse(fulfilment=done)

    async def ConfirmPick(
        self, request: pb.ConfirmPickRequest, context: Context
    ) -> pb.ConfirmPickResponse:
        picked: dict[str, int] = {}
        for line in request.lines:
            picked[line.sku] = picked.get(line.sku, 0) + line.picked_quantity
        step = self._handlers.confirm_pick(picked, request.reason_code)
        return pb.ConfirmPickResponse(fulfilment=await self._step("ConfirmPick", request, step))

    async def PackFulfilment(
        self, request: pb.PackFulfilmentRequest, context: Context
    ) -> pb.PackFulfilmentResponse:
        step = self._handlers.pack
        return pb.PackFulfilmentResponse(
            fulfilment=await self._step("PackFulfilment", request, step)
        )

    async def ShipFulfilment(
        self, request: pb.ShipFulfilmentRequest, context: Context
    ) -> pb.ShipFulfilmentResponse:
        step = self._handlers.ship(request.carrier, request.tracking_number)
        return pb.ShipFulfilmentResponse(
            fulfilment=await self._step("ShipFulfilment", request, step)
        )

    async def ReceiveTransfer(
        self, request: pb.ReceiveTransferRequest, context: Context
    ) -> pb.ReceiveTransferResponse:
        step = self._handlers.receive
        return pb.ReceiveTransferResponse(
            fulfilment=await self._step("ReceiveTransfer", request, step)
        )

    async def MarkReadyForPickup(
        self, request: pb.MarkReadyForPickupRequest, context: Context
    ) -> pb.MarkReadyForPickupResponse:
        step = self._handlers.mark_ready(domain.pickup_code(secrets.randbelow(10**9)))
        done = await self._step("MarkReadyForPickup", request, step)
        return pb.MarkReadyForPickupResponse(fulfilment=done)

    async def CollectFulfilment(
        self, request: pb.CollectFulfilmentRequest, context: Context
    ) -> pb.CollectFulfilmentResponse:
        step = self._handlers.collect(request.pickup_code)
        done = await self._step("CollectFulfilment", request, step)
        return pb.CollectFulfilmentResponse(fulfilment=done)

    async def CancelFulfilment(
        self, request: pb.CancelFulfilmentRequest, context: Context
    ) -> pb.CancelFulfilmentResponse:
        step = self._handlers.cancel(request.reason_code)
        done = await self._step("CancelFulfilment", request, step)
        return pb.CancelFulfilmentResponse(fulfilment=done)

    async def _step(
        self, method: str, request: StepRequest, step: Step
    ) -> resources_pb2.Fulfilment:
        if scoped():
            # A store may work on its own tasks only: load the task to know whose it is.
            task = await self._handlers.get(request.fulfilment_id)
            authorize(any_of_locations=domain.working_locations(task))
        return await self._handlers.step(
            method,
            request.request_id,
            request.fulfilment_id,
            request.SerializeToString(deterministic=True),
            step,
        )


def binding(handlers: FulfilmentHandlers) -> ServiceBinding:
    """The servicer, ready for the shared gRPC bootstrap."""
    return ServiceBinding(
        full_name=pb.DESCRIPTOR.services_by_name["FulfilmentService"].full_name,
        servicer=FulfilmentServicer(handlers),
        register=pb_grpc.add_FulfilmentServiceServicer_to_server,
    )
