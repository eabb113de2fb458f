"""Container health check: ask an Omnistock service's gRPC health service, exit 0 if SERVING.

    python /app/deploy/docker/healthcheck.py PORT [SERVICE] [--server-name NAME]

Used by the compose healthchecks and the Kubernetes probes (the image holds the
repository at /app). It calls 127.0.0.1:PORT the way the service serves: with
TLS when OMNI_TLS_CERT_FILE and OMNI_TLS_KEY_FILE are set (trusting
OMNI_TLS_CA_FILE, presenting the same certificate as a client certificate, which
mutual TLS needs), in plaintext otherwise. Kubernetes' native gRPC probes cannot
speak TLS, hence this script. ``--server-name`` is a name the certificate is
issued for (the connection goes to 127.0.0.1, which a certificate rarely names).
SERVICE empty asks for the server as a whole (liveness); a service name asks for
that service, which turns NOT_SERVING first on shutdown (readiness).

Exit codes: 0 SERVING, 1 anything else (not serving, unreachable, timeout).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str, server_name: str | None) -> grpc.Channel:
    cert = os.environ.get("OMNI_TLS_CERT_FILE")
    key = os.environ.get("OMNI_TLS_KEY_FILE")
    if not (cert and key):
        return grpc.insecure_channel(target)
    ca = os.environ.get("OMNI_TLS_CA_FILE")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def main(argv: list[str]) -> int:
    """Check once; the exit code is the answer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--server-name", default=None)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        with _channel(f"127.0.0.1:{args.port}", args.server_name) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        code, details = getattr(error, "code", None), getattr(error, "details", None)
        reason = f"{code().name}: {details()}" if code and details else repr(error)
        print(f"health check failed: {reason}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable certificate or key file
        print(f"health check failed: {error}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"not serving: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
