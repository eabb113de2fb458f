"""Field rules every service applies to identifiers and free text.

Pure Python: domain modules use these to build ``FieldViolation`` lists before
anything is read or written.
"""

from __future__ import annotations

import re

from omnistock.errors import FieldViolation

# fullmatch, never match: "$" would accept a trailing newline, and "scanner-7\n"
# must not be a second device next to "scanner-7".
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
ID_RULE = "1-64 letters, digits or . _ : / -, starting with a letter or digit"
REASON_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{1,39}")
REASON_RULE = "2-40 upper-case letters, digits or _, starting with a letter"


def check_id(value: str, path: str, what: str) -> list[FieldViolation]:
    """Problems with an identifier (sku, location, device, channel, order)."""
    if not value:
        return [FieldViolation(path, f"{what} is required")]
    if not ID_PATTERN.fullmatch(value):
        return [FieldViolation(path, f"{what} {value[:40]!r} is malformed; use {ID_RULE}")]
    return []


def check_text(value: str, path: str, limit: int) -> list[FieldViolation]:
    """Problems with free text: too long, or holding control characters."""
    if len(value) > limit:
        return [FieldViolation(path, f"is {len(value)} characters long; at most {limit} allowed")]
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        return [FieldViolation(path, "must not contain control characters")]
    return []


def check_reason(value: str, path: str, *, required: bool) -> list[FieldViolation]:
    """Problems with an upper-case reason code such as "DAMAGED_IN_STORE"."""
    if not value:
        return [FieldViolation(path, "a reason code is required")] if required else []
    if not REASON_PATTERN.fullmatch(value):
        return [FieldViolation(path, f"{value[:40]!r} is not a reason code; use {REASON_RULE}")]
    return []


def shown(value: str, limit: int = 40) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters.

    Errors travel in gRPC trailing metadata, which clients refuse above 8-16 KB:
    a message must never echo a client's string whole.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_count(count: int, path: str, limit: int, noun: str) -> list[FieldViolation]:
    """Problems with the size of a list: more than ``limit`` ``noun`` in one request."""
    if count > limit:
        return [FieldViolation(path, f"at most {limit} {noun} per request, got {count}")]
    return []
