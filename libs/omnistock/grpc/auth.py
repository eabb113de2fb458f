"""The server interceptor that authenticates every call and applies the role policy.

It reads ``authorization: Bearer <token>``, verifies the token
(:mod:`omnistock.auth.tokens`) and checks the caller's role against
:data:`omnistock.auth.policy.POLICY`: no or an invalid token is
UNAUTHENTICATED, a role the RPC does not allow is PERMISSION_DENIED; both are
counted in ``omni_auth_denied_total`` and logged with the subject, never the
token. The verified principal is bound for the handlers, which check the
channel or locations a request touches with :func:`omnistock.auth.policy.authorize`.
Health checks and reflection stay open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc_interceptor.server import AsyncServerInterceptor

from omnistock.auth.policy import caller_scope, is_open, record_denial, rule_for
from omnistock.auth.tokens import Principal, Role, TokenError, TokenVerifier
from omnistock.errors import DomainError, PermissionDenied, Unauthenticated, Unavailable
from omnistock.grpc import Context
from omnistock.grpc.errors import to_status
from omnistock.logs import get_logger

log = get_logger(__name__)

AUTHORIZATION_HEADER = "authorization"
# With authentication off (development without a JWKS) every call runs as this.
ANONYMOUS = Principal("anonymous (authentication is off)", Role.SERVICE)


class AuthInterceptor(AsyncServerInterceptor):
    """Authenticates each call; ``verifier`` None means authentication is off."""

    def __init__(self, verifier: TokenVerifier | None) -> None:
        self._verifier = verifier

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: Context,
        method_name: str,
    ) -> Any:
        if is_open(method_name):
            return await super().intercept(method, request_or_iterator, context, method_name)
        try:
            principal = self._authenticate(context, method_name)
        except DomainError as refused:
            await context.abort_with_status(to_status(refused))
        response = method(request_or_iterator, context)
        if hasattr(response, "__aiter__"):
            return self._stream(response, principal, method_name)
        with caller_scope(principal, method_name):
            return await response

    @staticmethod
    async def _stream(
        response: AsyncIterator[Any], principal: Principal, method_name: str
    ) -> AsyncIterator[Any]:
        with caller_scope(principal, method_name):
            async for item in response:
                yield item

    def _authenticate(self, context: Context, method_name: str) -> Principal:
        if self._verifier is None:
            return ANONYMOUS
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_HEADER:
                header = value if isinstance(value, str) else value.decode()
        scheme, _, token = header.partition(" ")
        if not header:
            raise _unauthenticated(method_name, "missing_token", "This call needs a bearer token.")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated(
                method_name,
                "malformed_header",
                "Send the token as 'authorization: Bearer <token>'.",
            )
        try:
            principal = self._verifier.verify(token.strip())
        except TokenError as error:
            raise _unauthenticated(method_name, error.reason, error.message) from None
        except Exception as error:  # the verifier broke, not the token: tell nobody why
            log.error("auth.verifier_failed", method=method_name, error=repr(error))
            raise Unavailable(
                "AUTH_UNAVAILABLE", "Tokens cannot be checked right now; retry shortly."
            ) from None
        if principal.role not in rule_for(method_name):
            message = f"The {principal.role.value} role may not call {method_name}."
            record_denial(
                method_name, "PERMISSION_DENIED", "role_not_allowed", principal.subject, message
            )
            raise PermissionDenied("ROLE_NOT_ALLOWED", message, {"role": principal.role.value})
        return principal


def _unauthenticated(method_name: str, reason: str, message: str) -> Unauthenticated:
    record_denial(method_name, "UNAUTHENTICATED", reason, "", message)
    return Unauthenticated(reason.upper(), message)
