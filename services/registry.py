"""Every Omnistock service, for the tools that run or prepare all of them."""

from __future__ import annotations

from pathlib import Path

from omnistock.service import ServiceSpec
from services.ledger.app import SPEC as LEDGER

SERVICES: list[ServiceSpec] = [LEDGER]
REPO_ROOT = Path(__file__).resolve().parents[1]
STREAMS_FILE = REPO_ROOT / "deploy" / "nats" / "streams.yaml"
