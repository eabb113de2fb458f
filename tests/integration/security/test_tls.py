"""TLS and mutual TLS on a real service, with certificates made here by trustme."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme

from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import ledger_service_pb2_grpc as pb_grpc
from omnistock.grpc.client import ChannelFactory
from omnistock.service import ConfigurationError, RunningService, start_service
from omnistock.settings import Settings
from services.ledger.app import SPEC as LEDGER
from services.registry import REPO_ROOT


class Pki:
    """A test CA, the server's certificate, and a client certificate, on disk."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = folder / "server.pem", folder / "server.key"
        server.private_key_pem.write_to_path(str(self.key_file))
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        client = self.ca.issue_cert("scanner-utrecht-07")
        self.client_chain = b"".join(blob.bytes() for blob in client.cert_chain_pems)
        self.client_key = client.private_key_pem.bytes()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def tls_ledger(settings: Settings, pki: Pki, client_auth: str) -> RunningService:
    tls = settings.model_copy(
        update={
            "tls_cert_file": pki.cert_file,
            "tls_key_file": pki.key_file,
            "tls_ca_file": pki.ca_file,
            "tls_client_auth": client_auth,
        }
    )
    return await start_service(LEDGER, tls, grpc_port=0, serve_metrics_endpoint=False)


async def list_locations(factory: ChannelFactory, port: int) -> grpc.StatusCode:
    async with factory.open(f"127.0.0.1:{port}") as channel:
        stub: pb_grpc.StockLedgerServiceAsyncStub = pb_grpc.StockLedgerServiceStub(channel)
        try:
            await stub.ListLocations(pb.ListLocationsRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[list[RunningService]]:
    started: list[RunningService] = []
    yield started
    for service in started:
        await service.stop()


async def test_a_client_trusting_the_ca_connects_and_one_without_it_fails(
    settings: Settings, pki: Pki, channels: ChannelFactory, running: list[RunningService]
) -> None:
    service = await tls_ledger(settings, pki, "none")
    running.append(service)
    trusted = ChannelFactory.from_settings(settings.model_copy(update={"tls_ca_file": pki.ca_file}))
    assert trusted.tls
    assert await list_locations(trusted, service.grpc_port) == grpc.StatusCode.OK
    # The system's roots do not know the test CA; plaintext is not spoken at all.
    system_roots = ChannelFactory(token=channels.token, tls=True)
    assert await list_locations(system_roots, service.grpc_port) == grpc.StatusCode.UNAVAILABLE
    plaintext = ChannelFactory(token=channels.token)
    assert await list_locations(plaintext, service.grpc_port) == grpc.StatusCode.UNAVAILABLE


async def test_with_client_auth_required_a_client_without_a_certificate_is_refused(
    settings: Settings, pki: Pki, channels: ChannelFactory, running: list[RunningService]
) -> None:
    service = await tls_ledger(settings, pki, "require")
    running.append(service)
    without_certificate = ChannelFactory(
        token=channels.token, tls=True, root_certificates=pki.ca_file.read_bytes()
    )
    assert (
        await list_locations(without_certificate, service.grpc_port) == grpc.StatusCode.UNAVAILABLE
    )
    with_certificate = ChannelFactory(
        token=channels.token,
        tls=True,
        root_certificates=pki.ca_file.read_bytes(),
        certificate_chain=pki.client_chain,
        private_key=pki.client_key,
    )
    assert await list_locations(with_certificate, service.grpc_port) == grpc.StatusCode.OK
    # A certificate is not a token: the call still needs one.
    no_token = with_certificate.with_token(None)
    assert await list_locations(no_token, service.grpc_port) == grpc.StatusCode.UNAUTHENTICATED


async def test_client_auth_without_a_ca_is_a_configuration_error(
    settings: Settings, pki: Pki
) -> None:
    broken = settings.model_copy(
        update={"tls_cert_file": pki.cert_file, "tls_key_file": pki.key_file,
                "tls_client_auth": "require"}
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="OMNI_TLS_CA_FILE"):
        await start_service(LEDGER, broken, grpc_port=0, serve_metrics_endpoint=False)


def test_production_refuses_to_start_with_development_defaults() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "OMNI_ENVIRONMENT": "production",
        "OMNI_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "OMNI_NATS_URL": "nats://127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.fulfilment"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "fulfilment cannot start" in done.stderr
    assert "OMNI_AUTH_JWKS_FILE is not set" in done.stderr
    assert "OMNI_FULFILMENT_CODE_SECRET is the development default" in done.stderr
    assert "Traceback" not in done.stderr
