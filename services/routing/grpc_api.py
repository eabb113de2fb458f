"""The gRPC face of the routing service: proto → handler → proto."""

from __future__ import annotations

from omni.routing.v1 import routing_service_pb2 as pb
from omni.routing.v1 import routing_service_pb2_grpc as pb_grpc
from omnistock.auth.policy import authorize, current_caller, scoped
from omnistock.auth.tokens import Role
from omnistock.grpc import Context
from omnistock.grpc.server import ServiceBinding
from services.routing.handlers import RoutingHandlers


class OrderRoutingServicer(pb_grpc.OrderRoutingServiceServicer):
    """Implements omni.routing.v1.OrderRoutingService."""

    def __init__(self, handlers: RoutingHandlers) -> None:
        self._handlers = handlers

    async def RouteOrder(
        self, request: pb.RouteOrderRequest, context: Context
    ) -> pb.RouteOrderResponse:
        authorize(channel=request.channel)
        return pb.RouteOrderResponse(order=await self._handlers.route_order(request))

    async def QuoteOrder(
        self, request: pb.QuoteOrderRequest, context: Context
    ) -> pb.QuoteOrderResponse:
        authorize(channel=request.channel)
        return pb.QuoteOrderResponse(plan=await self._handlers.quote_order(request))

    async def GetOrder(self, request: pb.GetOrderRequest, context: Context) -> pb.GetOrderResponse:
        order = await self._handlers.get_order(request.order_id)
        authorize(channel=order.channel)
        return pb.GetOrderResponse(order=order)

    async def CancelOrder(
        self, request: pb.CancelOrderRequest, context: Context
    ) -> pb.CancelOrderResponse:
        if scoped():
            authorize(channel=(await self._handlers.get_order(request.order_id)).channel)
        order = await self._handlers.cancel_order(
            request.request_id,
            request.order_id,
            list(request.line_numbers),
            request.reason_code,
        )
        return pb.CancelOrderResponse(order=order)

    async def RouteReturn(
        self, request: pb.RouteReturnRequest, context: Context
    ) -> pb.RouteReturnResponse:
        # The customer's channel, or the store the goods are handed in at.
        channel = None
        if scoped() and current_caller().principal.role is Role.CHANNEL:
            channel = (await self._handlers.get_order(request.order_id)).channel
        authorize(channel=channel, locations=[request.location_id])
        return pb.RouteReturnResponse(order_return=await self._handlers.route_return(request))

    async def GetRoutingRules(
        self, request: pb.GetRoutingRulesRequest, context: Context
    ) -> pb.GetRoutingRulesResponse:
        return pb.GetRoutingRulesResponse(rules=await self._handlers.get_rules())

    async def SetRoutingRules(
        self, request: pb.SetRoutingRulesRequest, context: Context
    ) -> pb.SetRoutingRulesResponse:
        rules = await self._handlers.set_rules(request.request_id, request.rules)
        return pb.SetRoutingRulesResponse(rules=rules)


def binding(handlers: RoutingHandlers) -> ServiceBinding:
    """The servicer, ready for the shared gRPC bootstrap."""
    return ServiceBinding(
        full_name=pb.DESCRIPTOR.services_by_name["OrderRoutingService"].full_name,
        servicer=OrderRoutingServicer(handlers),
        register=pb_grpc.add_OrderRoutingServiceServicer_to_server,
    )
