"""An acknowledged event survives a SIGKILL of nats-server (sync_interval: always)."""

from __future__ import annotations

from pathlib import Path

import nats
from nats.js.api import StreamConfig

from omnistock.devstack.nats import EmbeddedNats
from omnistock.devstack.ports import free_port


async def test_acknowledged_messages_survive_a_server_kill(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "jetstream", free_port(), free_port())
    server.start()
    try:
        client = await nats.connect(server.url)
        js = client.jetstream()
        await js.add_stream(StreamConfig(name="DURABLE", subjects=["durable.>"]))
        for n in range(200):
            ack = await js.publish(
                "durable.test", f"event-{n}".encode(), headers={"Nats-Msg-Id": str(n)}
            )
            assert ack.seq == n + 1
        await client.close()

        server.kill()  # no flush, no goodbye
        server.start()

        client = await nats.connect(server.url)
        info = await client.jetstream().stream_info("DURABLE")
        last = await client.jetstream().get_msg("DURABLE", 200)
        await client.close()
    finally:
        server.stop()

    assert info.state.messages == 200
    assert last.data == b"event-199"
