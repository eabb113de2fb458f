"""NATS authentication and TLS by configuration, against real nats-servers.

Each server here has a configuration of its own (users, an NKey, TLS with a CA
made by ``trustme``, client certificates required), runs on free ports and
keeps its files in a temporary folder outside pytest's temporary root (another
pytest session on the machine prunes that). Clients connect through
``omnistock.nats_client.connect``, the one place every process connects from.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest
import trustme
from nats.aio.client import Client
from nats.js.api import StreamConfig

from omnistock import nats_client
from omnistock.bootstrap import provision_streams
from omnistock.devstack.nats import EmbeddedNats
from omnistock.devstack.ports import free_port
from omnistock.nats_client import NatsConnectError, connect
from omnistock.settings import Settings
from services.registry import STREAMS_FILE

USER = "omnistock"
PASSWORD = secrets.token_urlsafe(24)
NATS_ENVIRONMENT = (
    "OMNI_NATS_URL",
    "OMNI_NATS_USER",
    "OMNI_NATS_PASSWORD",
    "OMNI_NATS_CREDS_FILE",
    "OMNI_NATS_NKEY_SEED_FILE",
    "OMNI_NATS_TLS_CA_FILE",
    "OMNI_NATS_TLS_CERT_FILE",
    "OMNI_NATS_TLS_KEY_FILE",
)


@dataclass(frozen=True)
class Files:
    """Certificates, keys and seeds the servers and clients of this module use."""

    folder: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path
    nkey_seed: Path
    nkey_public: str
    other_nkey_seed: Path


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    """A CA, a server and a client certificate, a stranger's, and two NKey users."""
    with tempfile.TemporaryDirectory(prefix="omnistock-nats-security-") as name:
        folder = Path(name)
        ca, other_ca = trustme.CA(), trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("omnistock-client")
        stranger = other_ca.issue_cert("stranger")
        paths = {
            "ca": ca.cert_pem,
            "other_ca": other_ca.cert_pem,
            "server_cert": server.cert_chain_pems[0],
            "server_key": server.private_key_pem,
            "client_cert": client.cert_chain_pems[0],
            "client_key": client.private_key_pem,
            "stranger_cert": stranger.cert_chain_pems[0],
            "stranger_key": stranger.private_key_pem,
        }
        written: dict[str, Path] = {}
        for key, blob in paths.items():
            written[key] = folder / f"{key}.pem"
            blob.write_to_path(str(written[key]))
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        other_seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        (folder / "user.nk").write_bytes(seed + b"\n")
        (folder / "other.nk").write_bytes(other_seed + b"\n")
        yield Files(
            folder=folder,
            nkey_seed=folder / "user.nk",
            nkey_public=nkeys.from_seed(bytearray(seed)).public_key.decode(),
            other_nkey_seed=folder / "other.nk",
            **written,
        )


@contextmanager
def nats_server(folder: Path, extra_config: str) -> Iterator[EmbeddedNats]:
    """A nats-server (JetStream on) with ``extra_config`` added to its configuration file."""
    server = EmbeddedNats(
        folder / "jetstream",
        free_port(),
        free_port(),
        sync_always=False,
        extra_config=extra_config,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def tls_block(files: Files, *, verify: bool) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{files.server_cert}"\n'
        f'  key_file: "{files.server_key}"\n'
        f'  ca_file: "{files.ca}"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 2\n"
        "}\n"
    )


@pytest.fixture(scope="module")
def auth_server(files: Files) -> Iterator[EmbeddedNats]:
    """Plaintext, with a user and password and an NKey user."""
    config = (
        "authorization {\n  users = [\n"
        f'    {{ user: "{USER}", password: "{PASSWORD}" }}\n'
        f'    {{ nkey: "{files.nkey_public}" }}\n'
        "  ]\n}\n"
    )
    with nats_server(files.folder / "auth", config) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(files: Files) -> Iterator[EmbeddedNats]:
    """TLS with the module's CA, a user and password, no client certificate asked."""
    config = f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n' + tls_block(
        files, verify=False
    )
    with nats_server(files.folder / "tls", config) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(files: Files) -> Iterator[EmbeddedNats]:
    """TLS with ``verify: true``: a client certificate from the CA and a password."""
    config = f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n' + tls_block(
        files, verify=True
    )
    with nats_server(files.folder / "mtls", config) as server:
        yield server


def configured(**values: Any) -> Settings:
    """Settings with ``values`` (the autouse fixture keeps the shell's OMNI_NATS_* out)."""
    return Settings(**values)


def mtls_settings(files: Files) -> Settings:
    return configured(
        nats_user=USER,
        nats_password=PASSWORD,
        nats_tls_ca_file=files.ca,
        nats_tls_cert_file=files.client_cert,
        nats_tls_key_file=files.client_key,
    )


@pytest.fixture(autouse=True)
def without_nats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test configures counts, not the shell's OMNI_NATS_* variables."""
    for variable in NATS_ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)


async def assert_round_trip(client: Client) -> None:
    inbox = client.new_inbox()
    subscription = await client.subscribe(inbox)
    await client.publish(inbox, b"ping")
    message = await subscription.next_msg(timeout=2)
    assert message.data == b"ping"
    await client.close()


# --- user and password ------------------------------------------------------


async def test_user_and_password_are_accepted(auth_server: EmbeddedNats) -> None:
    client = await connect(
        auth_server.url, "test-user", settings=configured(nats_user=USER, nats_password=PASSWORD)
    )
    await assert_round_trip(client)


async def test_a_wrong_password_is_refused_with_a_clear_error(auth_server: EmbeddedNats) -> None:
    wrong = configured(nats_user=USER, nats_password="not-the-password")
    with pytest.raises(NatsConnectError) as refused:
        await connect(auth_server.url, "test-wrong-password", settings=wrong)
    message = str(refused.value)
    assert f"did not accept user {USER!r} with OMNI_NATS_PASSWORD" in message
    assert "Authorization Violation" in message
    assert "not-the-password" not in message


async def test_no_credentials_for_a_server_that_wants_them_is_a_clear_error(
    auth_server: EmbeddedNats,
) -> None:
    with pytest.raises(NatsConnectError, match="requires credentials and none are configured"):
        await connect(auth_server.url, "test-anonymous", settings=configured())


async def test_credentials_in_the_url_still_work_and_stay_out_of_errors(
    auth_server: EmbeddedNats,
) -> None:
    host = auth_server.url.removeprefix("nats://")
    client = await connect(f"nats://{USER}:{PASSWORD}@{host}", "test-url", settings=configured())
    await assert_round_trip(client)
    with pytest.raises(NatsConnectError) as refused:
        await connect(f"nats://{USER}:wrong-in-url@{host}", "test-url", settings=configured())
    message = str(refused.value)
    assert f"NATS at nats://***@{host} refused" in message
    assert "did not accept the credentials in the NATS URL" in message
    assert "wrong-in-url" not in message


async def test_secrets_reach_neither_the_log_nor_the_errors(
    auth_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def info(self, event: str, **fields: Any) -> None:
            events.append((event, fields))

        warning = info

    monkeypatch.setattr(nats_client, "log", Recorder())
    good = configured(nats_user=USER, nats_password=PASSWORD)
    client = await connect(auth_server.url, "test-quiet", settings=good)
    await client.close()
    wrong_password = "wrong-" + secrets.token_urlsafe(12)
    bad = configured(nats_user=USER, nats_password=wrong_password)
    with pytest.raises(NatsConnectError) as refused:
        await connect(auth_server.url, "test-quiet", settings=bad)

    connected = {
        "servers": auth_server.url,
        "name": "test-quiet",
        "credentials": f"user {USER!r} with OMNI_NATS_PASSWORD",
        "tls": False,
    }
    assert ("nats.connected", connected) in events
    said = repr(events) + str(refused.value) + repr(good) + repr(bad)
    assert PASSWORD not in said
    assert wrong_password not in said


# --- NKey -------------------------------------------------------------------


async def test_an_nkey_seed_is_accepted(auth_server: EmbeddedNats, files: Files) -> None:
    client = await connect(
        auth_server.url, "test-nkey", settings=configured(nats_nkey_seed_file=files.nkey_seed)
    )
    await assert_round_trip(client)


async def test_an_unknown_nkey_is_refused(auth_server: EmbeddedNats, files: Files) -> None:
    unknown = configured(nats_nkey_seed_file=files.other_nkey_seed)
    with pytest.raises(NatsConnectError, match="did not accept the NKey seed file"):
        await connect(auth_server.url, "test-unknown-nkey", settings=unknown)


async def test_a_file_without_a_seed_is_named(auth_server: EmbeddedNats, files: Files) -> None:
    not_a_seed = configured(nats_nkey_seed_file=files.ca)
    with pytest.raises(NatsConnectError, match="does not hold a valid NKey seed"):
        await connect(auth_server.url, "test-not-a-seed", settings=not_a_seed)


async def test_a_missing_seed_file_is_named(auth_server: EmbeddedNats, files: Files) -> None:
    missing = configured(nats_nkey_seed_file=files.folder / "absent.nk")
    with pytest.raises(NatsConnectError, match=r"OMNI_NATS_NKEY_SEED_FILE names .*absent\.nk"):
        await connect(auth_server.url, "test-missing-seed", settings=missing)


# --- a .creds file (operator mode: operator, account and user JWTs) -----------


def nkey_pair(prefix: int) -> tuple[bytes, Any]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def public(key_pair: Any) -> str:
    return str(key_pair.public_key.decode())


def signed_jwt(signer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (version 2) for ``subject``, signed with the ``signer`` NKey, as nsc makes."""

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": public(signer),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = encode(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    unsigned = f"{header}.{encode(json.dumps(claims).encode())}"
    return f"{unsigned}.{encode(signer.sign(unsigned.encode()))}"


def creds_file(path: Path, user_jwt: str, user_seed: bytes) -> Path:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return path


@dataclass(frozen=True)
class OperatorMode:
    """A server trusting one operator, and .creds files of users of its accounts."""

    server: EmbeddedNats
    member: Path
    outsider: Path


@pytest.fixture(scope="module")
def operator_mode(files: Files) -> Iterator[OperatorMode]:
    """An operator with a system account and an account with JetStream, and two users."""
    _, operator = nkey_pair(nkeys.PREFIX_BYTE_OPERATOR)
    _, system = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, account = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, unknown_account = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    limits: dict[str, Any] = {
        **{key: -1 for key in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")},
        "wildcards": True,
    }
    jetstream = {key: -1 for key in ("mem_storage", "disk_storage", "streams", "consumer")}
    operator_jwt = signed_jwt(operator, public(operator), "omnistock", {"type": "operator"})
    system_jwt = signed_jwt(operator, public(system), "SYS", {"type": "account", "limits": limits})
    account_jwt = signed_jwt(
        operator, public(account), "OMNI", {"type": "account", "limits": limits | jetstream}
    )
    user = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    member_seed, member = nkey_pair(nkeys.PREFIX_BYTE_USER)
    outsider_seed, outsider = nkey_pair(nkeys.PREFIX_BYTE_USER)
    config = (
        f'operator: "{operator_jwt}"\n'
        "resolver: MEMORY\n"
        f"system_account: {public(system)}\n"
        "resolver_preload: {\n"
        f'  {public(account)}: "{account_jwt}"\n'
        f'  {public(system)}: "{system_jwt}"\n'
        "}\n"
    )
    with nats_server(files.folder / "operator", config) as server:
        yield OperatorMode(
            server=server,
            member=creds_file(
                files.folder / "member.creds",
                signed_jwt(account, public(member), "omnistock-service", user),
                member_seed,
            ),
            outsider=creds_file(
                files.folder / "outsider.creds",
                signed_jwt(unknown_account, public(outsider), "outsider", user),
                outsider_seed,
            ),
        )


async def test_a_creds_file_is_accepted_and_jetstream_works(operator_mode: OperatorMode) -> None:
    member = configured(nats_creds_file=operator_mode.member)
    client = await connect(operator_mode.server.url, "test-creds", settings=member)
    try:
        js = client.jetstream()
        name = f"CREDS_{uuid.uuid4().hex[:12].upper()}"
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
        ack = await js.publish(f"{name.lower()}.event", b"fact", headers={"Nats-Msg-Id": name})
        assert ack.stream == name
    finally:
        await client.close()


async def test_a_user_of_an_unknown_account_is_refused(operator_mode: OperatorMode) -> None:
    outsider = configured(nats_creds_file=operator_mode.outsider)
    with pytest.raises(NatsConnectError, match="did not accept the credentials file"):
        await connect(operator_mode.server.url, "test-outsider", settings=outsider)


async def test_a_file_that_is_not_a_creds_file_is_named(
    operator_mode: OperatorMode, files: Files
) -> None:
    # nats-py itself would read such a file forever, blocking the event loop.
    not_creds = configured(nats_creds_file=files.nkey_seed)
    with pytest.raises(NatsConnectError, match="not a NATS credentials file"):
        await connect(operator_mode.server.url, "test-not-creds", settings=not_creds)


# --- TLS --------------------------------------------------------------------


async def test_a_client_trusting_the_ca_connects_over_tls(
    tls_server: EmbeddedNats, files: Files
) -> None:
    trusting = configured(nats_user=USER, nats_password=PASSWORD, nats_tls_ca_file=files.ca)
    client = await connect(tls_server.url, "test-tls", settings=trusting)
    await assert_round_trip(client)


async def test_a_client_trusting_another_ca_fails(tls_server: EmbeddedNats, files: Files) -> None:
    distrusting = configured(
        nats_user=USER, nats_password=PASSWORD, nats_tls_ca_file=files.other_ca
    )
    with pytest.raises(NatsConnectError, match="TLS certificate is not trusted"):
        await connect(tls_server.url, "test-other-ca", settings=distrusting)


async def test_a_client_with_only_the_system_cas_fails(tls_server: EmbeddedNats) -> None:
    system_cas = configured(nats_user=USER, nats_password=PASSWORD)
    with pytest.raises(NatsConnectError, match="set OMNI_NATS_TLS_CA_FILE"):
        await connect(tls_server.url, "test-system-cas", settings=system_cas)


async def test_tls_configured_against_a_plaintext_server_is_refused(
    auth_server: EmbeddedNats, files: Files
) -> None:
    expecting_tls = configured(nats_user=USER, nats_password=PASSWORD, nats_tls_ca_file=files.ca)
    with pytest.raises(NatsConnectError, match="did not require TLS"):
        await connect(auth_server.url, "test-downgrade", settings=expecting_tls)
    tls_scheme = auth_server.url.replace("nats://", "tls://")
    with pytest.raises(NatsConnectError, match="did not require TLS"):
        await connect(
            tls_scheme,
            "test-downgrade",
            settings=configured(nats_user=USER, nats_password=PASSWORD),
        )


async def test_with_verify_a_client_with_a_certificate_connects(
    mtls_server: EmbeddedNats, files: Files
) -> None:
    client = await connect(mtls_server.url, "test-mtls", settings=mtls_settings(files))
    await assert_round_trip(client)


async def test_with_verify_a_client_without_a_certificate_is_refused(
    mtls_server: EmbeddedNats, files: Files
) -> None:
    no_certificate = configured(nats_user=USER, nats_password=PASSWORD, nats_tls_ca_file=files.ca)
    with pytest.raises(NatsConnectError, match="requires a client certificate"):
        await connect(mtls_server.url, "test-no-cert", settings=no_certificate)


async def test_with_verify_a_certificate_from_another_ca_is_not_let_in(
    mtls_server: EmbeddedNats, files: Files
) -> None:
    stranger = configured(
        nats_user=USER,
        nats_password=PASSWORD,
        nats_tls_ca_file=files.ca,
        nats_tls_cert_file=files.stranger_cert,
        nats_tls_key_file=files.stranger_key,
    )
    # The server's refusal comes as a TLS alert or a reset, depending on timing;
    # a reset is retried, so the point is only that no connection is made.
    with pytest.raises((NatsConnectError, TimeoutError)):
        await asyncio.wait_for(connect(mtls_server.url, "test-stranger", settings=stranger), 3)


async def test_a_key_that_does_not_match_the_certificate_is_named(
    mtls_server: EmbeddedNats, files: Files
) -> None:
    mismatched = configured(
        nats_user=USER,
        nats_password=PASSWORD,
        nats_tls_ca_file=files.ca,
        nats_tls_cert_file=files.client_cert,
        nats_tls_key_file=files.stranger_key,
    )
    with pytest.raises(NatsConnectError, match="does the key match"):
        await connect(mtls_server.url, "test-mismatch", settings=mismatched)


# --- JetStream over the authenticated TLS connection --------------------------


async def test_jetstream_publish_and_consume_over_authenticated_mutual_tls(
    mtls_server: EmbeddedNats, files: Files
) -> None:
    client = await connect(mtls_server.url, "test-jetstream", settings=mtls_settings(files))
    try:
        js = client.jetstream()
        name = f"SECURE_{uuid.uuid4().hex[:12].upper()}"
        subject = f"secure.{name.lower()}"
        await js.add_stream(StreamConfig(name=name, subjects=[f"{subject}.>"]))
        event_ids = [str(uuid.uuid4()) for _ in range(3)]
        for event_id in [*event_ids, event_ids[0]]:  # the last one is a duplicate
            await js.publish(
                f"{subject}.moved", event_id.encode(), headers={"Nats-Msg-Id": event_id}
            )
        consumer = await js.pull_subscribe(f"{subject}.>", durable="secure-test", stream=name)
        messages = await consumer.fetch(10, timeout=2)
        for message in messages:
            await message.ack()
        assert [message.data.decode() for message in messages] == event_ids
        info = await js.stream_info(name)
        assert info.state.messages == 3
    finally:
        await client.close()


async def test_provisioning_reads_the_security_from_the_environment(
    mtls_server: EmbeddedNats, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # provision_streams passes no settings: connect takes them from OMNI_NATS_*,
    # as the services, the CLI and the dev stack's processes do.
    monkeypatch.setenv("OMNI_NATS_USER", USER)
    monkeypatch.setenv("OMNI_NATS_PASSWORD", PASSWORD)
    monkeypatch.setenv("OMNI_NATS_TLS_CA_FILE", str(files.ca))
    monkeypatch.setenv("OMNI_NATS_TLS_CERT_FILE", str(files.client_cert))
    monkeypatch.setenv("OMNI_NATS_TLS_KEY_FILE", str(files.client_key))
    await provision_streams(mtls_server.url, STREAMS_FILE)

    client = await connect(mtls_server.url, "test-provisioned")
    try:
        info = await client.jetstream().stream_info("OMNI_LEDGER")
    finally:
        await client.close()
    assert info.config.subjects == ["omni.ledger.>"]
