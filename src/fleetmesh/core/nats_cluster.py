"""A real NATS JetStream cluster on one machine: three `nats-server` processes with routes.

Used by `fleetmesh up --distributed`. Every node has the same accounts, auth
callout and secrets as the embedded server, its own JetStream store and MQTT
listener, and routes to the other two; streams and KV buckets are created
with three replicas, so one node can stop and restart without losing data.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from fleetmesh.core.nats_server import EmbeddedNatsServer, NatsSecrets
from fleetmesh.core.ports import free_port

CLUSTER_NAME = "fleetmesh"


@dataclass(frozen=True, slots=True)
class NodePorts:
    client: int
    mqtt: int
    route: int


def cluster_block(node: NodePorts, peers: list[NodePorts], host: str) -> str:
    routes = ", ".join(f'"nats-route://{host}:{peer.route}"' for peer in peers)
    return f"""
cluster {{
  name: "{CLUSTER_NAME}"
  listen: "{host}:{node.route}"
  routes: [{routes}]
}}
"""


class NatsCluster:
    """Starts, stops and restarts the nodes of a local three-node cluster."""

    def __init__(
        self, *, data_dir: Path, host: str, nats_secrets: NatsSecrets, size: int = 3
    ) -> None:
        self.host = host
        self.ports = [
            NodePorts(free_port(host), free_port(host), free_port(host)) for _ in range(size)
        ]
        self.nodes = [
            EmbeddedNatsServer(
                data_dir=data_dir / f"node-{index}",
                host=host,
                client_port=ports.client,
                mqtt_port=ports.mqtt,
                nats_secrets=nats_secrets,
                server_name=f"fleetmesh-node-{index}",
                extra_config=cluster_block(ports, [p for p in self.ports if p is not ports], host),
            )
            for index, ports in enumerate(self.ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        return [f"mqtt://{self.host}:{ports.mqtt}" for ports in self.ports]

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.nodes))

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))

    def down_nodes(self) -> list[int]:
        """Indexes of the nodes whose process is not running (exited, killed, failed to start)."""
        return [index for index, node in enumerate(self.nodes) if not node.running]

    async def stop_node(self, index: int) -> None:
        await self.nodes[index].stop()

    async def start_node(self, index: int) -> None:
        await self.nodes[index].start()
