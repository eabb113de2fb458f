"""Conventions of the shared contract that the protos can state only in comments."""

from __future__ import annotations

# The ledger posts what fulfilment moves under idempotency keys of this device,
# one per fulfilment ("fulfilment:<fulfilment id>"), so the reservation service
# can tell which fulfilment a shipment or transfer out belongs to.
FULFILMENT_DEVICE_PREFIX = "fulfilment:"


def fulfilment_device(fulfilment_id: str) -> str:
    """The device id of the movements the ledger posts for a fulfilment."""
    return FULFILMENT_DEVICE_PREFIX + fulfilment_id


def fulfilment_of(device_id: str) -> str | None:
    """The fulfilment a movement was posted for, or None for a scanner's movement."""
    if device_id.startswith(FULFILMENT_DEVICE_PREFIX):
        return device_id.removeprefix(FULFILMENT_DEVICE_PREFIX)
    return None
