"""Structured logs (structlog) with a correlation id bound per request or event.

The correlation id travels in gRPC metadata (``x-correlation-id``) and in every
event envelope, so one customer action can be followed through all services.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import structlog

_correlation_id: ContextVar[str | None] = ContextVar("omni_correlation_id", default=None)
_causation_id: ContextVar[str | None] = ContextVar("omni_causation_id", default=None)


# The gRPC metadata key the correlation id travels in, from client to server.
CORRELATION_HEADER = "x-correlation-id"


def configure_logging(level: str = "INFO", fmt: str = "json", service: str | None = None) -> None:
    """Configure structlog and the standard library to emit one line per event.

    ``fmt="json"`` (the default, and the services' default setting) writes one
    JSON object per line; ``"console"`` is for people at a terminal. Lines of
    libraries that log through the standard library (asyncio, grpc, asyncpg)
    are rendered the same way, with their logger's name, so a JSON log stays
    JSON whatever wrote to it.
    """
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if service:
        structlog.contextvars.bind_contextvars(service=service)
        # Also for lines written outside the context that holds the binding
        # (threads, callbacks registered before it).
        processors.append(_add_service(service))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    # Like before, a process whose root logger already has handlers (pytest's)
    # keeps them.
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _add_service(service: str) -> structlog.typing.Processor:
    def add(
        _: structlog.typing.WrappedLogger, __: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("service", service)
        return event

    return add


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A structured logger tagged with the module name."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger


def current_correlation_id() -> str | None:
    """The correlation id of the request or event being handled, if any."""
    return _correlation_id.get()


def current_causation_id() -> str | None:
    """The id of the command or event that caused the current work, if any."""
    return _causation_id.get()


def new_id() -> str:
    """A fresh random identifier (UUID4 text)."""
    return str(uuid.uuid4())


@contextmanager
def correlation_scope(correlation_id: str | None, causation_id: str | None = None) -> Iterator[str]:
    """Bind a correlation id (a new one when none is given) for the enclosed work."""
    cid = correlation_id or new_id()
    token_c = _correlation_id.set(cid)
    token_k = _causation_id.set(causation_id)
    with structlog.contextvars.bound_contextvars(correlation_id=cid):
        try:
            yield cid
        finally:
            _correlation_id.reset(token_c)
            _causation_id.reset(token_k)
