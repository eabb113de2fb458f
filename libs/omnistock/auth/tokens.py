"""Bearer tokens: ES256 JWTs verified with PyJWT against a JWKS of public keys.

A token names its caller (``sub``), a ``role``, the ``channels`` (channel role)
or ``locations`` (scanner and store roles) it may act for, and when it expires
(``exp``). The key set may hold several keys, each with its ``kid``: a new key
is added before tokens signed with it are handed out, and the old one removed
once its last token has expired. The JWKS file is read again when it changes,
so a rotation needs no restart.

The token itself is a secret: nothing here logs it or puts it in an error.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from omnistock.logs import get_logger

log = get_logger(__name__)

ALGORITHM = "ES256"
DEFAULT_TTL_SECONDS = 3600.0
# Verified tokens are remembered until they expire, so a busy client does not
# pay an ECDSA verification per call; bounded so a flood of tokens cannot grow it.
CACHE_SIZE = 4096
# How often the JWKS file's modification time is looked at.
RELOAD_CHECK_SECONDS = 1.0


class Role(StrEnum):
    """What kind of caller a token stands for."""

    CHANNEL = "channel"
    SCANNER = "scanner"
    STORE = "store"
    ADMIN = "admin"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """A verified caller: who, in which role, for which channels or locations."""

    subject: str
    role: Role
    channels: frozenset[str] = frozenset()
    locations: frozenset[str] = frozenset()
    expires_at: float = 0.0


class TokenError(Exception):
    """A token that cannot be accepted; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """The principal a verified token's claims describe, or TokenError."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("invalid_claims", "The token names no subject (sub).")
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise TokenError(
            "invalid_claims",
            f"The token's role must be one of {', '.join(r.value for r in Role)}.",
        ) from None
    channels = _string_list(claims, "channels")
    locations = _string_list(claims, "locations")
    if role is Role.CHANNEL and not channels:
        raise TokenError("invalid_claims", "A channel token must list its channels.")
    if role in (Role.SCANNER, Role.STORE) and not locations:
        raise TokenError("invalid_claims", f"A {role.value} token must list its locations.")
    return Principal(subject, role, channels, locations, float(claims.get("exp", 0)))


def _string_list(claims: Mapping[str, Any], name: str) -> frozenset[str]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TokenError("invalid_claims", f"The token's {name} must be a list of names.")
    return frozenset(value)


@dataclass
class TokenVerifier:
    """Verifies bearer tokens against the JWKS in ``jwks_file``.

    Signature (ES256 only), ``exp``, ``aud`` and ``iss`` are checked by PyJWT;
    the key is the one whose ``kid`` the token's header names.
    """

    jwks_file: Path
    issuer: str
    audience: str
    leeway_seconds: float = 5.0
    _keys: jwt.PyJWKSet | None = field(default=None, init=False, repr=False)
    _loaded_mtime: float = field(default=-1.0, init=False, repr=False)
    _checked_at: float = field(default=-1e9, init=False, repr=False)
    _cache: dict[str, Principal] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._reload_if_changed(force=True)

    def _reload_if_changed(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        self._checked_at = now
        if force:
            self._load()  # at start a bad key set is an error, not a warning
            return
        try:
            self._load()
        except (OSError, ValueError, jwt.PyJWKSetError) as error:
            # A key set being rewritten or broken keeps the keys in use: no call
            # fails for it, and no caller learns the file's path.
            log.warning("auth.jwks_reload_failed", file=str(self.jwks_file), error=repr(error))

    def _load(self) -> None:
        mtime = os.stat(self.jwks_file).st_mtime
        if mtime == self._loaded_mtime:
            return
        document = json.loads(self.jwks_file.read_text())
        keys = jwt.PyJWKSet.from_dict(document)
        for key in keys.keys:
            if not key.key_id:
                raise ValueError(f"every key in {self.jwks_file} needs a kid")
        # One event loop calls this (no await in between): no lock needed.
        self._keys, self._loaded_mtime = keys, mtime
        self._cache.clear()

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys tokens are accepted from."""
        assert self._keys is not None
        return [str(key.key_id) for key in self._keys.keys]

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; TokenError naming what is wrong otherwise."""
        self._reload_if_changed()
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at + self.leeway_seconds > now:
                return cached
            self._cache.pop(token, None)
        principal = self._verify(token)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        assert self._keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed_token", "The bearer token is not a JWT.") from None
        if header.get("alg") != ALGORITHM:
            raise TokenError("wrong_algorithm", f"Tokens must be signed with {ALGORITHM}.")
        kid = header.get("kid")
        try:
            key = self._keys[str(kid)]
        except KeyError:
            shown = str(kid)[:64]  # the caller chose it: never echo it whole
            raise TokenError(
                "unknown_key",
                f"The token is signed with a key this service does not know ({shown}).",
            ) from None
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "sub", "role", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("expired_token", "The token has expired.") from None
        except jwt.InvalidAudienceError:
            raise TokenError("wrong_audience", "The token is not meant for this system.") from None
        except jwt.InvalidIssuerError:
            raise TokenError("wrong_issuer", "The token comes from an unknown issuer.") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "The token's signature does not verify.") from None
        except jwt.PyJWTError as error:
            raise TokenError("invalid_token", f"The token is not valid: {error}.") from None
        return principal_from_claims(claims)


# -- signing keys (development, tests, and `omni auth token`) -----------------------


@dataclass(frozen=True)
class SigningKey:
    """A private ES256 key and its ``kid``."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        """A new P-256 key."""
        return cls(kid or f"omni-{uuid.uuid4().hex[:12]}", ec.generate_private_key(ec.SECP256R1()))

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, kid: str, pem: bytes) -> SigningKey:
        """A key read back from :meth:`private_pem`."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC private key")
        return cls(kid, key)

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK with its ``kid``."""
        jwk: dict[str, Any] = json.loads(
            jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key())
        )
        jwk.update({"kid": self.kid, "use": "sig", "alg": ALGORITHM})
        return jwk

    def mint(
        self,
        *,
        subject: str,
        role: Role,
        issuer: str,
        audience: str,
        channels: Iterable[str] = (),
        locations: Iterable[str] = (),
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        now: float | None = None,
    ) -> str:
        """A signed token with these claims."""
        issued = time.time() if now is None else now
        claims: dict[str, Any] = {
            "sub": subject,
            "role": role.value,
            "iss": issuer,
            "aud": audience,
            "iat": int(issued),
            "exp": int(issued + ttl_seconds),
        }
        if channels:
            claims["channels"] = sorted(channels)
        if locations:
            claims["locations"] = sorted(locations)
        return jwt.encode(claims, self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid})


def jwks_document(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """A JWKS with the public half of every key."""
    return {"keys": [key.public_jwk() for key in keys]}
