"""Real Apache Kafka (KRaft) from Maven jars: one node (`LocalBroker`) or a local cluster (`LocalCluster`)."""

from services.common.broker.cluster import ClusterStart, ClusterStatus, LocalCluster, NodeStatus
from services.common.broker.node import (
    REPO_ROOT,
    BrokerError,
    BrokerSettings,
    BrokerStatus,
    LocalBroker,
    PortInUseError,
    StartResult,
)

__all__ = [
    "REPO_ROOT",
    "BrokerError",
    "BrokerSettings",
    "BrokerStatus",
    "ClusterStart",
    "ClusterStatus",
    "LocalBroker",
    "LocalCluster",
    "NodeStatus",
    "PortInUseError",
    "StartResult",
]
