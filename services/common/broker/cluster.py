"""A local KRaft cluster of one or more nodes, each a `LocalBroker` with its own data, ports and log.

With one node the run dir is the node's own, as it always was. With more, the layout is::

    <run dir>/cluster.json   cluster id and every node's ports, chosen at the first start and kept
    <run dir>/node-<id>/     one LocalBroker run dir per node

Every node is a broker and a controller; the controllers form a static quorum of all the nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.common.broker.node import (
    PROBE_TIMEOUT_S,
    BrokerError,
    BrokerSettings,
    LocalBroker,
    _atomic_write,
    _free_port,
    _port_free,
    _random_kafka_uuid,
    _rss_bytes,
    _run_sync,
)

logger = logging.getLogger(__name__)

# Replicas of every internal topic; a fourth node adds capacity, not more copies.
MAX_REPLICATION = 3


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: int
    pid: int | None
    bootstrap: str
    up: bool
    rss_bytes: int | None


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    nodes: tuple[NodeStatus, ...]
    controller_id: int | None
    # Partitions whose in-sync replicas are fewer than their replicas; None when no node answered.
    under_replicated: int | None

    @property
    def running(self) -> bool:
        return any(node.pid is not None for node in self.nodes)


@dataclass(frozen=True, slots=True)
class ClusterStart:
    bootstrap: str
    pids: tuple[int, ...]
    already_running: bool
    elapsed_s: float


class LocalCluster:
    """Start, inspect, stop and break the nodes of a local cluster; `nodes=1` is a single broker."""

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        self._settings = settings if settings is not None else BrokerSettings()
        self._run_dir = self._settings.run_dir.expanduser().resolve()
        self._nodes: list[LocalBroker] | None = None

    @property
    def settings(self) -> BrokerSettings:
        return self._settings

    @property
    def layout_file(self) -> Path:
        return self._run_dir / "cluster.json"

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def replication(self) -> int:
        return _replication(self.size)

    @property
    def nodes(self) -> list[LocalBroker]:
        if self._nodes is None:
            self._nodes = self._load_nodes()
        return self._nodes

    def node(self, node_id: int) -> LocalBroker:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise BrokerError(f"no node {node_id} in {self._run_dir} (nodes {[n.node_id for n in self.nodes]})")

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def start(self, timeout: float = 90.0) -> ClusterStart:
        """Launch every node that is down, then wait until each answers; a running cluster is left as it is."""
        started_at = time.monotonic()
        launched = [node.start(timeout, wait=False) for node in self.nodes]
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.wait_ready(max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - started_at
        already = all(result.already_running for result in launched)
        if not already:
            logger.info("Kafka cluster of %d node(s) ready at %s (%.1fs)", self.size, self.bootstrap, elapsed)
        return ClusterStart(self.bootstrap, tuple(result.pid for result in launched), already, elapsed)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop every node cleanly; returns whether any was running.

        All nodes get SIGTERM at once: one at a time, the last ones would wait for a controller quorum
        that the first ones took away with them.
        """
        for node in self.nodes:
            node.terminate()
        deadline = time.monotonic() + timeout
        stopped = [node.stop(max(1.0, deadline - time.monotonic())) for node in self.nodes]
        return any(stopped)

    def status(self, probe_timeout: float = PROBE_TIMEOUT_S) -> ClusterStatus:
        pids = {node.node_id: node.pid() for node in self.nodes}
        view = None
        # The metadata may still list a node that just died, and a request sent to it fails: ask again,
        # each time through another live node, until one answers.
        for node in [node for node in self.nodes if pids[node.node_id] is not None] * 2:
            view = _run_sync(_cluster_view(node.bootstrap, probe_timeout))
            if view is not None:
                break
        up = view.broker_ids if view is not None else set()
        nodes = []
        for node in self.nodes:
            pid = pids[node.node_id]
            rss = _rss_bytes(pid) if pid is not None else None
            nodes.append(NodeStatus(node.node_id, pid, node.bootstrap, pid is not None and node.node_id in up, rss))
        if view is None:
            return ClusterStatus(tuple(nodes), None, None)
        return ClusterStatus(tuple(nodes), view.controller_id, view.under_replicated)

    def _load_nodes(self) -> list[LocalBroker]:
        if self._settings.nodes == 1 and not self.layout_file.exists():
            return [LocalBroker(self._settings)]
        layout = self._layout()
        voters = ",".join(f"{n['id']}@{self._settings.host}:{n['controller_port']}" for n in layout["nodes"])
        replication = _replication(len(layout["nodes"]))
        return [
            LocalBroker(
                self._settings.model_copy(
                    update={
                        "port": n["port"],
                        "controller_port": n["controller_port"],
                        "run_dir": self._run_dir / f"node-{n['id']}",
                        "nodes": 1,
                    }
                ),
                node_id=n["id"],
                voters=voters,
                replication=replication,
                cluster_id=layout["cluster_id"],
            )
            for n in layout["nodes"]
        ]

    def _layout(self) -> dict[str, Any]:
        """The cluster's id and ports: read back when the cluster was made before, else chosen and kept."""
        try:
            layout: dict[str, Any] = json.loads(self.layout_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        else:
            if len(layout["nodes"]) != self._settings.nodes and self._settings.nodes != 1:
                raise BrokerError(
                    f"{self._run_dir} holds a cluster of {len(layout['nodes'])} nodes, not {self._settings.nodes}; "
                    "stop it and remove the folder to make another"
                )
            return layout
        host, taken = self._settings.host, set[int]()

        def pick(preferred: int) -> int:
            port = preferred if preferred <= 65535 and preferred not in taken and _port_free(host, preferred) else 0
            while port == 0 or port in taken:
                port = _free_port(host)
            taken.add(port)
            return port

        nodes = []
        for index in range(self._settings.nodes):
            port = pick(self._settings.port + index)
            nodes.append({"id": index + 1, "port": port, "controller_port": pick(port + 1000)})
        layout = {"cluster_id": _random_kafka_uuid(), "nodes": nodes}
        _atomic_write(self.layout_file, json.dumps(layout, indent=2) + "\n")
        return layout


def _replication(nodes: int) -> int:
    return min(MAX_REPLICATION, nodes)


@dataclass(frozen=True, slots=True)
class _View:
    broker_ids: set[int]
    controller_id: int | None
    under_replicated: int


async def _cluster_view(bootstrap: str, budget_s: float) -> _View | None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="choreo-broker-status",
        request_timeout_ms=max(1, int(budget_s * 1000)),
    )
    try:
        async with asyncio.timeout(budget_s * 2):
            await admin.start()
            cluster = await admin.describe_cluster()
            topics = await admin.describe_topics()
    except (KafkaError, OSError, TimeoutError) as exc:
        logger.debug("status of %s failed: %r", bootstrap, exc)
        return None
    finally:
        await admin.close()
    controller = cluster.get("controller_id")
    return _View(
        {int(broker["node_id"]) for broker in cluster.get("brokers", [])},
        int(controller) if controller is not None and controller >= 0 else None,
        _under_replicated(topics),
    )


def _under_replicated(topics: Sequence[dict[str, Any]]) -> int:
    return sum(
        1
        for topic in topics
        for partition in topic.get("partitions", [])
        if len(partition.get("isr", [])) < len(partition.get("replicas", []))
    )
