"""Token verification and the per-RPC policy, without I/O beyond a key file."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from omni.fulfilment.v1 import fulfilment_service_pb2
from omni.ledger.v1 import ledger_service_pb2
from omni.reservation.v1 import reservation_service_pb2
from omni.routing.v1 import routing_service_pb2
from omnistock.auth import policy, tokens
from omnistock.auth.policy import POLICY, authorize, caller_scope
from omnistock.auth.tokens import Principal, Role, SigningKey, TokenError, TokenVerifier
from omnistock.errors import PermissionDenied
from omnistock.settings import Settings
from services.fulfilment import domain as fulfilment

REPO = Path(__file__).resolve().parents[2]
RESERVE = "/omni.reservation.v1.ReservationService/Reserve"
AVAILABILITY = "/omni.reservation.v1.ReservationService/GetAvailability"
POST = "/omni.ledger.v1.StockLedgerService/PostMovements"
ACCEPT = "/omni.fulfilment.v1.FulfilmentService/AcceptFulfilment"


def write_jwks(path: Path, *keys: SigningKey) -> None:
    path.write_text(json.dumps(tokens.jwks_document(keys)))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("key-1")


@pytest.fixture
def verifier(tmp_path: Path, key: SigningKey) -> TokenVerifier:
    write_jwks(tmp_path / "jwks.json", key)
    return TokenVerifier(tmp_path / "jwks.json", issuer="omnistock", audience="omnistock")


def mint(key: SigningKey, role: Role = Role.CHANNEL, **claims: object) -> str:
    values: dict[str, object] = {
        "subject": "webshop",
        "issuer": "omnistock",
        "audience": "omnistock",
        "channels": ["web"] if role is Role.CHANNEL else [],
        "locations": ["store-utrecht"] if role in (Role.SCANNER, Role.STORE) else [],
    }
    values.update(claims)
    return key.mint(role=role, **values)  # type: ignore[arg-type]


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    return caught.value.reason


def test_a_valid_token_names_its_caller(verifier: TokenVerifier, key: SigningKey) -> None:
    principal = verifier.verify(mint(key, channels=["web", "app"]))
    assert principal.subject == "webshop"
    assert principal.role is Role.CHANNEL
    assert principal.channels == {"web", "app"}


def test_an_expired_token_is_refused(verifier: TokenVerifier, key: SigningKey) -> None:
    old = mint(key, ttl_seconds=60, now=time.time() - 3600)
    assert refused(verifier, old) == "expired_token"


def test_a_token_for_another_audience_or_issuer_is_refused(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    assert refused(verifier, mint(key, audience="someone-else")) == "wrong_audience"
    assert refused(verifier, mint(key, issuer="evil")) == "wrong_issuer"


def test_a_token_signed_with_an_unknown_key_is_refused(verifier: TokenVerifier) -> None:
    assert refused(verifier, mint(SigningKey.generate("key-2"))) == "unknown_key"
    # Same kid, another key: the signature does not verify.
    assert refused(verifier, mint(SigningKey.generate("key-1"))) == "bad_signature"
    assert refused(verifier, "not-a-jwt") == "malformed_token"


def test_claims_must_fit_the_role(verifier: TokenVerifier, key: SigningKey) -> None:
    assert refused(verifier, mint(key, Role.CHANNEL, channels=[])) == "invalid_claims"
    assert refused(verifier, mint(key, Role.SCANNER, locations=[])) == "invalid_claims"
    assert verifier.verify(mint(key, Role.ADMIN)).role is Role.ADMIN


def test_keys_rotate_with_two_keys_in_the_set_at_once(
    tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "RELOAD_CHECK_SECONDS", 0.0)
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, key)
    verifier = TokenVerifier(jwks, issuer="omnistock", audience="omnistock")
    old_token = mint(key)
    new_key = SigningKey.generate("key-2")
    new_token = mint(new_key)
    assert refused(verifier, new_token) == "unknown_key"

    # Step 1: publish the new key beside the old one; both verify.
    write_jwks(jwks, key, new_key)
    os.utime(jwks, (time.time() + 1, time.time() + 1))
    assert verifier.verify(old_token).subject == verifier.verify(new_token).subject
    assert sorted(verifier.key_ids) == ["key-1", "key-2"]

    # Step 2: once the old key's tokens have expired, drop it.
    write_jwks(jwks, new_key)
    os.utime(jwks, (time.time() + 2, time.time() + 2))
    assert refused(verifier, old_token) == "unknown_key"
    assert verifier.verify(new_token).role is Role.CHANNEL


# -- the policy ------------------------------------------------------------------------


def rpcs() -> list[str]:
    names = []
    for module, service in (
        (ledger_service_pb2, "StockLedgerService"),
        (reservation_service_pb2, "ReservationService"),
        (routing_service_pb2, "OrderRoutingService"),
        (fulfilment_service_pb2, "FulfilmentService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        names += [f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods]
    return names


def test_every_rpc_has_a_policy_and_is_in_the_documented_table() -> None:
    assert sorted(POLICY) == sorted(rpcs())
    table = (REPO / "docs" / "security.md").read_text()
    for method in rpcs():
        service, rpc = method.strip("/").split("/")
        row = re.search(rf"^\| `{service.split('.')[-1]}/{rpc}` \|(.*)$", table, re.M)
        assert row, f"{method} is not in docs/security.md"
        documented = set(row.group(1).split("|")[0].strip().split(", "))
        expected = {
            f"{role.value} ({scope.value})" if scope is policy.OWN else role.value
            for role, scope in POLICY[method].items()
        }
        assert documented == expected, f"{method}: docs/security.md says {documented}"
    assert all(Role.SERVICE in rule for rule in POLICY.values())


def denied(method: str, principal: Principal, **touched: object) -> PermissionDenied:
    with caller_scope(principal, method), pytest.raises(PermissionDenied) as caught:
        authorize(**touched)  # type: ignore[arg-type]
    return caught.value


def test_a_channel_acts_for_its_own_channels_only() -> None:
    web = Principal("webshop", Role.CHANNEL, channels=frozenset({"web"}))
    with caller_scope(web, AVAILABILITY):
        assert authorize(channel="web") is web
    refusal = denied(AVAILABILITY, web, channel="app")
    assert refusal.reason == "CHANNEL_NOT_ALLOWED"
    assert "'app'" in refusal.message and refusal.metadata["channel"] == "app"
    # A servicer that forgets to say which channel it touches refuses.
    assert denied(RESERVE, web).reason == "SCOPE_UNKNOWN"


def test_a_scanner_posts_at_its_locations_only_and_the_whole_batch_counts() -> None:
    scanner = Principal("scanner-7", Role.SCANNER, locations=frozenset({"store-utrecht"}))
    with caller_scope(scanner, POST):
        authorize(locations=["store-utrecht", "store-utrecht"])
    refusal = denied(POST, scanner, locations=["store-utrecht", "store-leiden"])
    assert refusal.reason == "LOCATION_NOT_ALLOWED"
    assert "store-leiden" in refusal.message
    assert denied(POST, scanner, locations=[]).reason == "LOCATION_REQUIRED"


def test_roles_the_rpc_does_not_name_are_refused_and_admin_reads_everything() -> None:
    store = Principal("till", Role.STORE, locations=frozenset({"store-utrecht"}))
    assert denied(POST, store, locations=["store-utrecht"]).reason == "ROLE_NOT_ALLOWED"
    admin = Principal("ops", Role.ADMIN)
    with caller_scope(admin, AVAILABILITY):
        authorize(channel="marketplace")
    assert denied(RESERVE, admin, channel="web").reason == "ROLE_NOT_ALLOWED"
    with pytest.raises(PermissionDenied):
        authorize(channel="web")  # no caller bound: closed


def test_denials_are_counted_by_rpc_and_reason() -> None:
    labels = ("omni.reservation.v1.ReservationService", "GetAvailability")
    counter = policy.AUTH_DENIED.labels(*labels, "PERMISSION_DENIED", "channel_not_allowed")
    before = counter._value.get()
    denied(AVAILABILITY, Principal("w", Role.CHANNEL, channels=frozenset({"web"})), channel="x")
    assert counter._value.get() == before + 1


def transfer(status: fulfilment.Status, **changes: object) -> fulfilment.Fulfilment:
    return fulfilment.Fulfilment(
        "f-1", "o-1", "web", "dc-tilburg", fulfilment.Kind.TRANSFER_TO_STORE, (),
        status=status, pickup_location_id="store-leiden", **changes,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_transfer_is_the_pickup_stores_work_once_it_is_on_the_road() -> None:
    assert fulfilment.working_locations(transfer(fulfilment.Status.PACKED)) == {"dc-tilburg"}
    for status in (fulfilment.Status.SHIPPED, fulfilment.Status.READY_FOR_PICKUP):
        assert fulfilment.working_locations(transfer(status)) == {"dc-tilburg", "store-leiden"}
    leiden = Principal("till", Role.STORE, locations=frozenset({"store-leiden"}))
    task = transfer(fulfilment.Status.ACCEPTED)
    assert denied(ACCEPT, leiden, any_of_locations=fulfilment.working_locations(task))


def test_production_refuses_development_defaults(tmp_path: Path) -> None:
    settings = Settings(environment="production")
    fulfilment_problems = " ".join(settings.startup_problems("fulfilment"))
    assert "OMNI_AUTH_JWKS_FILE" in fulfilment_problems
    assert "OMNI_FULFILMENT_CODE_SECRET" in fulfilment_problems
    routing_problems = " ".join(settings.startup_problems("routing"))
    assert "OMNI_SERVICE_TOKEN_FILE" in routing_problems
    assert "OMNI_SERVICE_TOKEN_FILE" not in " ".join(settings.startup_problems("ledger"))
    ready = Settings(
        environment="production",
        auth_jwks_file=tmp_path / "jwks.json",
        service_token_file=tmp_path / "token",
        fulfilment_code_secret="a-real-secret",
    )
    assert [ready.startup_problems(s) for s in ("ledger", "routing", "fulfilment")] == [[], [], []]
    assert Settings().startup_problems("routing") == []


def test_without_keys_authentication_is_off_on_a_loopback_address_only() -> None:
    assert Settings(grpc_host="127.0.0.1").startup_problems("ledger") == []
    (problem,) = Settings(grpc_host="0.0.0.0").startup_problems("ledger")
    assert "OMNI_AUTH_JWKS_FILE" in problem and "0.0.0.0" in problem
    assert Settings(grpc_host="0.0.0.0", auth_disabled=True).startup_problems("ledger") == []


def test_a_key_set_that_breaks_while_running_keeps_the_keys_in_use(
    tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "RELOAD_CHECK_SECONDS", 0.0)
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, key)
    verifier = TokenVerifier(jwks, issuer="omnistock", audience="omnistock")
    jwks.write_text("{ half written")
    os.utime(jwks, (time.time() + 1, time.time() + 1))
    assert verifier.verify(mint(key)).role is Role.CHANNEL
    jwks.unlink()
    assert verifier.verify(mint(key)).role is Role.CHANNEL
    # At start, a key set that cannot be read is an error, not a warning.
    with pytest.raises(FileNotFoundError):
        TokenVerifier(jwks, issuer="omnistock", audience="omnistock")
