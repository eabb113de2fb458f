"""Fixtures of the fulfilment tests: fulfilment beside real routing, reservation and ledger.

The fulfilment service and its stub live in ``tests/integration/conftest.py``
(the security tests use them too).
"""

from __future__ import annotations

from tests.integration.conftest import FulfilmentStub
from tests.integration.routing.conftest import world

__all__ = ["FulfilmentStub", "world"]
