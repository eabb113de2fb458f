"""Who may call which RPC, and the scope checks servicers make before they write.

:data:`POLICY` names, per RPC, the roles allowed and whether each is limited to
its own channels or locations (``OWN``) or not (``ANY``). The server
interceptor refuses a role the table does not allow (PERMISSION_DENIED) and
binds the verified caller; a servicer then calls :func:`authorize` with the
channel or locations the request touches. A role whose scope is ``OWN`` must
find its dimension there, otherwise the call is refused: a forgotten check
fails closed. ``docs/security.md`` shows the same table.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum

from prometheus_client import Counter

from omnistock.auth.tokens import Principal, Role
from omnistock.errors import PermissionDenied
from omnistock.logs import get_logger

log = get_logger(__name__)


class Scope(Enum):
    """How far a role's access to one RPC reaches."""

    ANY = "any"  # every channel and location
    OWN = "own"  # the token's channels (channel role) or locations (scanner, store)


ANY, OWN = Scope.ANY, Scope.OWN
CHANNEL, SCANNER, STORE, ADMIN, SERVICE = (
    Role.CHANNEL, Role.SCANNER, Role.STORE, Role.ADMIN, Role.SERVICE,
)  # fmt: skip

# Methods anyone may call without a token: load balancers' health checks and
# reflection (it describes the API, not the data).
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

Rule = Mapping[Role, Scope]

_LEDGER = "/omni.ledger.v1.StockLedgerService/"
_RESERVATION = "/omni.reservation.v1.ReservationService/"
_ROUTING = "/omni.routing.v1.OrderRoutingService/"
_FULFILMENT = "/omni.fulfilment.v1.FulfilmentService/"

_EVERYONE: Rule = {CHANNEL: ANY, SCANNER: ANY, STORE: ANY, ADMIN: ANY, SERVICE: ANY}
_ADMIN: Rule = {ADMIN: ANY, SERVICE: ANY}
_CHANNEL_WRITES: Rule = {CHANNEL: OWN, SERVICE: ANY}
_CHANNEL_READS: Rule = {CHANNEL: OWN, ADMIN: ANY, SERVICE: ANY}
_STORE_STEP: Rule = {STORE: OWN, SERVICE: ANY}

POLICY: dict[str, Rule] = {
    # Stock ledger: scanners post and look up at their locations; master data is admin's.
    _LEDGER + "PostMovements": {SCANNER: OWN, SERVICE: ANY},
    _LEDGER + "GetStockLevels": {SCANNER: OWN, STORE: ANY, ADMIN: ANY, SERVICE: ANY},
    _LEDGER + "ListMovements": {SCANNER: OWN, STORE: OWN, ADMIN: ANY, SERVICE: ANY},
    _LEDGER + "UpsertLocations": _ADMIN,
    _LEDGER + "ListLocations": _EVERYONE,
    _LEDGER + "UpsertSkus": _ADMIN,
    _LEDGER + "ListSkus": _EVERYONE,
    # Reservation: a channel's holds and availability; rules are admin's.
    _RESERVATION + "Reserve": _CHANNEL_WRITES,
    _RESERVATION + "ExtendReservation": _CHANNEL_WRITES,
    _RESERVATION + "ReleaseReservation": _CHANNEL_WRITES,
    _RESERVATION + "ConvertReservation": _CHANNEL_WRITES,
    _RESERVATION + "GetReservation": _CHANNEL_READS,
    _RESERVATION + "ListReservations": _CHANNEL_READS,
    _RESERVATION + "GetAvailability": {CHANNEL: OWN, STORE: ANY, ADMIN: ANY, SERVICE: ANY},
    _RESERVATION + "WatchAvailability": {CHANNEL: OWN, STORE: ANY, ADMIN: ANY, SERVICE: ANY},
    _RESERVATION + "SetChannelRules": _ADMIN,
    _RESERVATION + "SetLocationSafetyStock": _ADMIN,
    _RESERVATION + "ListRules": _ADMIN,
    # Order routing: a channel's orders; a store enters the returns handed in to it.
    _ROUTING + "RouteOrder": _CHANNEL_WRITES,
    _ROUTING + "QuoteOrder": _CHANNEL_WRITES,
    _ROUTING + "GetOrder": _CHANNEL_READS,
    _ROUTING + "CancelOrder": _CHANNEL_WRITES,
    _ROUTING + "RouteReturn": {CHANNEL: OWN, STORE: OWN, SERVICE: ANY},
    _ROUTING + "GetRoutingRules": _ADMIN,
    _ROUTING + "SetRoutingRules": _ADMIN,
    # Fulfilment: a store works its own queue and tasks.
    _FULFILMENT + "ListFulfilments": {STORE: OWN, ADMIN: ANY, SERVICE: ANY},
    _FULFILMENT + "GetFulfilment": {STORE: OWN, ADMIN: ANY, SERVICE: ANY},
    **{
        _FULFILMENT + step: _STORE_STEP
        for step in (
            "AcceptFulfilment",
            "RejectFulfilment",
            "ConfirmPick",
            "PackFulfilment",
            "ShipFulfilment",
            "ReceiveTransfer",
            "MarkReadyForPickup",
            "CollectFulfilment",
            "CancelFulfilment",
        )
    },
}

AUTH_DENIED = Counter(
    "omni_auth_denied_total",
    "Calls refused by authentication (UNAUTHENTICATED) or authorisation (PERMISSION_DENIED).",
    ["service", "method", "code", "reason"],
)


def is_open(method: str) -> bool:
    """Health checks and reflection need no token."""
    return method.startswith(OPEN_PREFIXES)


def rule_for(method: str) -> Rule:
    """The roles allowed to call ``method``; none for a method the table does not know."""
    return POLICY.get(method, {})


@dataclass(frozen=True)
class Caller:
    """The verified principal of the call in progress and the RPC it called."""

    principal: Principal
    method: str

    @property
    def scope(self) -> Scope | None:
        """The principal's scope for this RPC (None: not allowed)."""
        return rule_for(self.method).get(self.principal.role)


_caller: ContextVar[Caller | None] = ContextVar("omnistock_caller", default=None)


@contextmanager
def caller_scope(principal: Principal, method: str) -> Iterator[Caller]:
    """Bind the verified caller for the handlers of one call."""
    bound = Caller(principal, method)
    token = _caller.set(bound)
    try:
        yield bound
    finally:
        _caller.reset(token)


def current_caller() -> Caller:
    """The caller of the RPC in progress; refused when none was bound (fail closed)."""
    caller = _caller.get()
    if caller is None:
        raise PermissionDenied("NO_CALLER", "No verified caller is bound to this call.")
    return caller


def current_subject() -> str | None:
    """Who is calling (the token's subject), or None when no caller is bound."""
    caller = _caller.get()
    return caller.principal.subject if caller is not None else None


def record_denial(method: str, code: str, reason: str, subject: str, message: str) -> None:
    """Count and log a refused call: who, what, why; never the token."""
    service, _, rpc = method.lstrip("/").partition("/")
    AUTH_DENIED.labels(service, rpc, code, reason).inc()
    log.warning(
        "auth.denied", subject=subject, method=method, code=code, reason=reason, message=message
    )


def scoped() -> bool:
    """Whether the caller is limited to its own channels or locations for this RPC:
    a servicer loads what it needs to check (an order's channel) only then."""
    return current_caller().scope is not Scope.ANY


def _deny(
    caller: Caller, reason: str, message: str, metadata: Mapping[str, str]
) -> PermissionDenied:
    record_denial(
        caller.method, "PERMISSION_DENIED", reason.lower(), caller.principal.subject, message
    )
    return PermissionDenied(reason, message, {"subject": caller.principal.subject, **metadata})


def _names(values: Collection[str]) -> str:
    return ", ".join(sorted(values)) or "none"


def authorize(
    *,
    channel: str | None = None,
    locations: Collection[str] | None = None,
    any_of_locations: Collection[str] | None = None,
) -> Principal:
    """Check that the caller may act for ``channel`` / at every one of ``locations`` /
    at one of ``any_of_locations``; PERMISSION_DENIED naming what it may not touch.

    Call it before anything is written. Roles with ``ANY`` scope pass; a channel
    token is checked against ``channel``, a scanner or store token against the
    locations. If the dimension a role is scoped by is not given, the call is
    refused (the servicer did not say what it touches).
    """
    caller = current_caller()
    principal, scope = caller.principal, caller.scope
    if scope is None:
        raise _deny(
            caller, "ROLE_NOT_ALLOWED", f"The {principal.role.value} role may not call this.", {}
        )
    if scope is ANY:
        return principal
    if principal.role is Role.CHANNEL:
        if channel is None:
            raise _deny(caller, "SCOPE_UNKNOWN", "This call names no channel to check.", {})
        if channel not in principal.channels:
            raise _deny(
                caller,
                "CHANNEL_NOT_ALLOWED",
                f"This token acts for channel {_names(principal.channels)}; "
                f"it may not act for channel '{channel}'.",
                {"channel": channel},
            )
        return principal
    allowed = principal.locations
    if locations is not None:
        wanted = set(locations)
        outside = wanted - allowed
        if not wanted:
            raise _deny(
                caller,
                "LOCATION_REQUIRED",
                f"A {principal.role.value} token must name the locations it asks about "
                f"(it acts at {_names(allowed)}).",
                {},
            )
        if outside:
            raise _deny(
                caller,
                "LOCATION_NOT_ALLOWED",
                f"This token acts at {_names(allowed)}; it may not act at {_names(outside)}.",
                {"location_id": sorted(outside)[0]},
            )
        return principal
    if any_of_locations is not None:
        if not allowed & set(any_of_locations):
            raise _deny(
                caller,
                "LOCATION_NOT_ALLOWED",
                f"This token acts at {_names(allowed)}; this belongs to "
                f"{_names(set(any_of_locations))}.",
                {"location_id": sorted(any_of_locations)[0] if any_of_locations else ""},
            )
        return principal
    raise _deny(caller, "SCOPE_UNKNOWN", "This call names no location to check.", {})
