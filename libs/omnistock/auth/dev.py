"""Development keys: one ES256 key pair, its JWKS and a service token in a folder.

``omni dev run`` keeps them in its state folder (made on the first run, kept
across runs); the test harnesses make them in a temporary folder. Never used
in production, where keys come from the operator's issuer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omnistock.auth.tokens import Role, SigningKey, jwks_document

SERVICE_TOKEN_TTL_SECONDS = 30 * 24 * 3600.0


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that already existed keeps no wider mode
    with os.fdopen(fd, "wb") as file:
        file.write(data)


@dataclass(frozen=True)
class DevAuth:
    """A development signing key with its JWKS and a service token on disk."""

    folder: Path
    key: SigningKey
    issuer: str = "omnistock"
    audience: str = "omnistock"

    @property
    def jwks_file(self) -> Path:
        """The public key set services verify against."""
        return self.folder / "jwks.json"

    @property
    def service_token_file(self) -> Path:
        """The token services present when they call each other."""
        return self.folder / "service.token"

    @classmethod
    def ensure(
        cls, folder: Path, *, issuer: str = "omnistock", audience: str = "omnistock"
    ) -> DevAuth:
        """Load the key in ``folder`` or make one; (re)write the JWKS and a fresh service token."""
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "signing-key.json"
        if key_file.exists():
            stored = json.loads(key_file.read_text())
            key = SigningKey.from_pem(stored["kid"], stored["pem"].encode())
        else:
            key = SigningKey.generate()
            document = {"kid": key.kid, "pem": key.private_pem().decode()}
            write_private(key_file, json.dumps(document).encode())
        auth = cls(folder, key, issuer, audience)
        auth.jwks_file.write_text(json.dumps(jwks_document([key]), indent=2))
        token = auth.mint(
            Role.SERVICE, subject="omnistock-services", ttl_seconds=SERVICE_TOKEN_TTL_SECONDS
        )
        write_private(auth.service_token_file, token.encode())
        return auth

    @classmethod
    def load(
        cls, folder: Path, *, issuer: str = "omnistock", audience: str = "omnistock"
    ) -> DevAuth:
        """The key ``omni dev run`` made in ``folder``; FileNotFoundError when there is none."""
        stored = json.loads((folder / "signing-key.json").read_text())
        return cls(
            folder, SigningKey.from_pem(stored["kid"], stored["pem"].encode()), issuer, audience
        )

    def mint(
        self,
        role: Role,
        *,
        subject: str | None = None,
        channels: Iterable[str] = (),
        locations: Iterable[str] = (),
        ttl_seconds: float = 24 * 3600.0,
    ) -> str:
        """A token for ``role`` signed with the development key."""
        channels, locations = sorted(channels), sorted(locations)
        return self.key.mint(
            subject=subject or "-".join(["dev", role.value, *channels, *locations]),
            role=role,
            issuer=self.issuer,
            audience=self.audience,
            channels=channels,
            locations=locations,
            ttl_seconds=ttl_seconds,
        )

    def env(self) -> dict[str, str]:
        """The ``OMNI_*`` variables that make a service verify with this key and call
        others with the service token."""
        return {
            "OMNI_AUTH_JWKS_FILE": str(self.jwks_file),
            "OMNI_AUTH_ISSUER": self.issuer,
            "OMNI_AUTH_AUDIENCE": self.audience,
            "OMNI_SERVICE_TOKEN_FILE": str(self.service_token_file),
        }
