"""docker-compose.yml is valid, runs every service, and wires the broker as the services expect."""

from __future__ import annotations

import base64
import itertools
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CHECK_SCRIPT = ROOT / "scripts" / "check-compose.sh"

APP_SERVICES = frozenset({"inventory", "payment", "approval", "shipping", "audit", "monitor"})
INTERNAL_BOOTSTRAP = "kafka:19092"


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _module(service: dict[str, Any]) -> str | None:
    """`inventory` for a service whose command is `python -m services.inventory`."""
    command = _command(service)
    for word, following in itertools.pairwise(command):
        if word == "-m" and following.startswith("services."):
            return following.removeprefix("services.")
    return None


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(compose, dict), "docker-compose.yml is not a mapping"
    assert isinstance(compose.get("services"), dict), "no services in docker-compose.yml"
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


@pytest.fixture(scope="module")
def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in services.items() if _module(service) is not None}


def test_check_script_passes() -> None:
    """docker-compose (installed by the script when missing and running as root) accepts the file."""
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, (
        f"scripts/check-compose.sh exited {result.returncode}; if docker-compose is missing, run as root "
        f"or `apt-get install -y docker-compose`.\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def test_kafka_is_the_official_image_with_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    assert "kafka-broker-api-versions.sh" in _healthcheck_command(kafka)
    assert any(str(volume).endswith(":/var/lib/kafka/data") for volume in kafka.get("volumes", []))


def test_kafka_listens_inside_and_on_the_host(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    environment = _environment(kafka)
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    advertised = environment["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{INTERNAL_BOOTSTRAP}" in advertised
    assert "//localhost:9092" in advertised
    assert "9092:9092" in [str(port) for port in kafka.get("ports", [])]
    assert environment["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert environment[key] == "1", key


def test_cluster_id_is_a_base64_uuid(services: dict[str, dict[str, Any]]) -> None:
    """`kafka-storage.sh format` refuses anything but 16 bytes in URL-safe base64 (22 characters)."""
    cluster_id = _environment(services["kafka"])["CLUSTER_ID"]
    assert len(cluster_id) == 22
    assert not cluster_id.startswith("-")
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_topics_init_service_creates_topics_once_kafka_is_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    topics = services["topics"]
    assert _command(topics)[-3:] == ["choreo", "topics", "create"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert _environment(topics)["CHOREO_BOOTSTRAP_SERVERS"] == INTERNAL_BOOTSTRAP
    assert str(topics.get("restart", "no")) == "no"


def test_every_service_has_a_container(app_services: dict[str, dict[str, Any]]) -> None:
    assert {_module(service) for service in app_services.values()} == APP_SERVICES


def test_app_services_wait_for_kafka_and_topics(
    app_services: dict[str, dict[str, Any]],
) -> None:
    for name, service in app_services.items():
        depends_on = service.get("depends_on")
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        assert depends_on["kafka"]["condition"] == "service_healthy", name
        assert depends_on["topics"]["condition"] == "service_completed_successfully", name


def test_app_services_are_configured_and_supervised(
    app_services: dict[str, dict[str, Any]],
) -> None:
    for name, service in app_services.items():
        environment = _environment(service)
        assert environment["CHOREO_BOOTSTRAP_SERVERS"] == INTERNAL_BOOTSTRAP, name
        assert "CHOREO_ENVIRONMENT" in environment, name
        assert service["restart"] == "unless-stopped", name
        assert "/health" in _healthcheck_command(service), name


def test_approval_publishes_its_api_and_has_a_token(
    services: dict[str, dict[str, Any]],
) -> None:
    approval = services["approval"]
    assert "8000:8000" in [str(port) for port in approval.get("ports", [])]
    assert "CHOREO_APPROVAL_TOKEN" in _environment(approval)


CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
KAFKA_NODES = ("kafka", "kafka-2", "kafka-3")


@pytest.fixture(scope="module")
def cluster_services() -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml with the cluster override merged on, as docker-compose merges them."""
    result = subprocess.run(
        [
            "docker-compose",
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(CLUSTER_FILE),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    merged: dict[str, dict[str, Any]] = yaml.safe_load(result.stdout)["services"]
    return merged


def test_cluster_override_runs_three_nodes_of_one_quorum(cluster_services: dict[str, dict[str, Any]]) -> None:
    nodes = {name: _environment(cluster_services[name]) for name in KAFKA_NODES}
    assert sorted(env["KAFKA_NODE_ID"] for env in nodes.values()) == ["1", "2", "3"]
    assert len({env["CLUSTER_ID"] for env in nodes.values()}) == 1
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in nodes.values()}
    assert voters == {"1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"}
    for name, env in nodes.items():
        assert f"INTERNAL://{name}:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert "healthcheck" in cluster_services[name]
    external = {str(port) for name in KAFKA_NODES for port in cluster_services[name].get("ports", [])}
    assert len(external) == 3, f"each node needs its own host port: {external}"


def test_cluster_override_gives_every_client_all_nodes_and_three_replicas(
    cluster_services: dict[str, dict[str, Any]],
) -> None:
    clients = {name: s for name, s in cluster_services.items() if _module(s) is not None or name == "topics"}
    assert set(clients) >= APP_SERVICES | {"topics"}
    for name, service in clients.items():
        env = _environment(service)
        assert env["CHOREO_BOOTSTRAP_SERVERS"].split(",") == [f"{node}:19092" for node in KAFKA_NODES], name
        assert env["CHOREO_REPLICATION_FACTOR"] == "3", name
        assert set(service["depends_on"]) >= set(KAFKA_NODES), name
