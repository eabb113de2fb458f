"""Runs each service as its own process, as in production, and stops them in order."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from omnistock.grpc.client import ChannelFactory
from omnistock.grpc.health import health_check
from omnistock.logs import get_logger

log = get_logger(__name__)


@dataclass
class ServiceProcess:
    """One service process: ``python -m <module>`` with the stack's environment."""

    name: str
    module: str
    grpc_address: str
    env: dict[str, str]
    # How to reach it (TLS as the services serve it).
    channels: ChannelFactory = field(default_factory=ChannelFactory)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        """Start the process; its logs go to this terminal."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
        )

    async def wait_serving(self, within: float = 30.0) -> None:
        """Wait until the service's health check reports SERVING."""
        deadline = time.monotonic() + within
        async with self.channels.open(self.grpc_address) as channel:
            check = health_check(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
                try:
                    reply = await check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} did not become healthy within {within}s")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("supervisor.kill", service=self.name)
            self.process.kill()
            self.process.wait()
