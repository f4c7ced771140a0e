"""docker-compose.yml is valid, runs every service, and wires the broker as the services expect."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import exposition
from tests.test_metrics import registry_of_every_metric

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


# --- Prometheus and Grafana ------------------------------------------------------------------------

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
# A metric name in a PromQL expression: what is not a function, keyword, label or label value.
METRIC_NAME = re.compile(r"\b(choreo_[a-z0-9_]+|process_[a-z0-9_]+|up)\b")


def _scrape_targets() -> set[str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {
        str(target)
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    }


def test_prometheus_scrapes_every_service_on_its_health_port(
    services: dict[str, dict[str, Any]], app_services: dict[str, dict[str, Any]]
) -> None:
    prometheus = services["prometheus"]
    assert str(prometheus["image"]).startswith("prom/prometheus:")
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    targets = _scrape_targets()
    for name, service in app_services.items():
        environment = _environment(service)
        assert f"{name}:{environment['CHOREO_HEALTH_PORT']}" in targets, name
        assert environment["CHOREO_HEALTH_HOST"] == "0.0.0.0", name
    assert len(targets) == len(app_services)


def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_prometheus_data_source(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert str(grafana["image"]).startswith("grafana/grafana:")
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "choreo.yml").read_text())
    assert [provider["options"]["path"] for provider in providers["providers"]] == ["/var/lib/grafana/dashboards"]


def test_every_dashboard_query_names_metrics_the_services_serve() -> None:
    text = exposition(registry_of_every_metric()).decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    served = {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, ("",))
    }
    served |= {"up"}  # Prometheus's own, per target
    source_uid = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ][0]["uid"]
    dashboard = json.loads((GRAFANA / "dashboards" / "choreo.json").read_text())
    named: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source_uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = set(METRIC_NAME.findall(target["expr"]))
            assert found, (panel["title"], target["expr"])
            assert found <= served, (panel["title"], sorted(found - served))
            named |= found
    for wanted in ("choreo_saga_outcomes_total", "choreo_saga_duration_seconds_bucket",
                   "choreo_consumer_lag_records", "choreo_dead_letters_total"):  # fmt: skip
        assert wanted in named, wanted
