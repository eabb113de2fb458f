"""JetStream streams, declared as data in ``deploy/nats/streams.yaml`` and provisioned.

Provisioning creates missing streams and updates existing ones to the declared
configuration; it is run by the dev stack, by the test harness and, in a
deployment, by a one-off job before the services start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import yaml
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from omnistock.logs import get_logger

log = get_logger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration such as ``"2m"``, ``"7d"`` or ``30``."""
    if isinstance(text, int | float):
        return float(text)
    value, unit = text[:-1], text[-1]
    if unit not in _UNITS:
        raise ValueError(f"unknown duration unit in {text!r}; use s, m, h or d")
    return float(value) * _UNITS[unit]


@dataclass(frozen=True)
class StreamDeclaration:
    """One stream as declared."""

    name: str
    subjects: list[str]
    description: str
    max_age_seconds: float
    duplicate_window_seconds: float
    replicas: int

    def to_config(self, replicas: int | None = None) -> StreamConfig:
        """The nats-py configuration for this stream."""
        return StreamConfig(
            name=self.name,
            description=self.description,
            subjects=self.subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=self.max_age_seconds,
            duplicate_window=self.duplicate_window_seconds,
            num_replicas=replicas or self.replicas,
        )


def load_declarations(path: Path) -> list[StreamDeclaration]:
    """Read the stream declarations file."""
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return [
        StreamDeclaration(
            name=item["name"],
            subjects=list(item["subjects"]),
            description=item.get("description", ""),
            max_age_seconds=parse_duration(item["max_age"]),
            duplicate_window_seconds=parse_duration(item["duplicate_window"]),
            replicas=int(item.get("replicas", 1)),
        )
        for item in document["streams"]
    ]


async def provision(
    js: JetStreamContext, declarations: list[StreamDeclaration], *, replicas: int | None = None
) -> None:
    """Create or update every declared stream."""
    for declaration in declarations:
        config = declaration.to_config(replicas)
        try:
            await js.stream_info(declaration.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            log.info("streams.created", stream=declaration.name)
        else:
            await js.update_stream(config)
            log.info("streams.updated", stream=declaration.name)
