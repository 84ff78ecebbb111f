"""The embedded nats-server's ports: a picked port taken before the server bound it is
replaced; a port asked for is not."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetmesh.bootstrap import bootstrap
from fleetmesh.core.nats_server import EmbeddedNatsServer, NatsSecrets, NatsServerError
from fleetmesh.core.ports import free_port
from support import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another socket listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _server(data_dir: Path, mqtt_port: int, *, replaceable: bool) -> EmbeddedNatsServer:
    return EmbeddedNatsServer(
        data_dir=data_dir,
        host="127.0.0.1",
        client_port=free_port(),
        mqtt_port=mqtt_port,
        nats_secrets=NatsSecrets.load_or_create(data_dir / "secrets.json"),
        ports_replaceable=replaceable,
    )


async def test_a_picked_port_taken_meanwhile_is_replaced(tmp_path: Path, taken_port: int) -> None:
    server = _server(tmp_path, taken_port, replaceable=True)
    await server.start()
    try:
        assert server.running
        assert server.mqtt_port != taken_port
        with socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=5):
            pass  # the MQTT listener is there
    finally:
        await server.stop()


async def test_a_port_asked_for_that_is_taken_fails_the_start(
    tmp_path: Path, taken_port: int
) -> None:
    server = _server(tmp_path, taken_port, replaceable=False)
    with pytest.raises(NatsServerError, match="address already in use"):
        await server.start()
    assert not server.running


async def test_the_platform_connects_to_the_port_its_server_ended_up_on(
    tmp_path: Path,
) -> None:
    platform = bootstrap(make_settings(tmp_path / "data"), contexts=["config"])
    picked = platform.ports.mqtt
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", picked))  # another socket takes it before the server starts
        holder.listen()
        await platform.start()
        try:
            assert platform.ports.mqtt != picked
            assert platform.mqtt_url == f"mqtt://127.0.0.1:{platform.ports.mqtt}"
            assert platform.nats_urls == [f"nats://127.0.0.1:{platform.ports.nats}"]
            assert platform.backbone.nc.is_connected
        finally:
            await platform.stop()
