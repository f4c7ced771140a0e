"""Pytest plugin: one Kafka cluster per test session, plus per-test unique names.

Where the cluster comes from is chosen once per session:

1. ``CHOREO_BOOTSTRAP_SERVERS`` set: use that cluster as is.
2. Otherwise ``CHOREO_TEST_KAFKA`` picks the backend: ``docker``
   (testcontainers, error if it fails), ``local`` (a :class:`LocalBroker`) or
   ``auto``: Docker when an engine answers, else a LocalBroker. ``auto`` is the
   default except when ``CI`` is set, where ``local`` is, so that tests needing
   to kill or restart the broker always run in CI.

A LocalBroker gets free ports and a run dir under pytest's temp folder (kept
for the last few sessions, handy for reading ``logs/server.log`` after a
failure) and is stopped when the session ends, whatever the outcome.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pytest

from services.common.broker import BrokerSettings, LocalBroker, PortInUseError

if TYPE_CHECKING:
    from testcontainers.community.kafka import KafkaContainer

logger = logging.getLogger(__name__)

BOOTSTRAP_ENV = "CHOREO_BOOTSTRAP_SERVERS"
BACKEND_ENV = "CHOREO_TEST_KAFKA"
CONTAINER_IMAGE = "confluentinc/cp-kafka:7.6.0"
# Generous: a first run on a fresh machine also downloads the jars through
# Maven (not counted here) and a loaded CI box boots the JVM slowly.
LOCAL_START_TIMEOUT_S = 120.0
LOCAL_START_ATTEMPTS = 3
TEST_BROKER_HEAP = "512m"

Backend = Literal["external", "docker", "local"]

_BACKEND_KEY = pytest.StashKey["KafkaBackend"]()


@dataclass(frozen=True, slots=True)
class KafkaBackend:
    kind: Backend
    bootstrap: str
    local: LocalBroker | None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts, stops or restarts brokers, or runs the whole stack for long (run one at a time)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    backend = terminalreporter.config.stash.get(_BACKEND_KEY, None)
    if backend is not None:
        terminalreporter.write_line(f"kafka: {backend.kind} broker at {backend.bootstrap}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _wanted_backend() -> str:
    wanted = os.environ.get(BACKEND_ENV, "").strip().lower() or ("local" if _in_ci() else "auto")
    if wanted not in ("auto", "docker", "local"):
        raise pytest.UsageError(f"{BACKEND_ENV} must be auto, docker or local, not {wanted!r}")
    return wanted


def _start_container(required: bool) -> KafkaContainer | None:
    """Start a Kafka container, or return None when Docker is unavailable."""
    # Imported lazily: without Docker these modules are dead weight, and
    # testcontainers probes the Docker socket as soon as a container is built.
    from docker.errors import DockerException
    from testcontainers.community.kafka import KafkaContainer

    try:
        container = KafkaContainer(CONTAINER_IMAGE).with_kraft()
    except DockerException as exc:
        if required:
            raise
        logger.info("no Docker engine answers (%s); using a local Kafka broker", exc)
        return None
    except Exception:
        if required:
            raise
        logger.warning("cannot reach Docker; using a local Kafka broker", exc_info=True)
        return None
    try:
        container.start()
    except Exception:
        # The engine answered, so this is a real failure (pull, port, image):
        # clean up whatever was created and surface or log it in full.
        try:
            container.stop()
        except Exception:
            logger.warning("could not remove the failed Kafka container", exc_info=True)
        if required:
            raise
        logger.warning("Kafka container failed to start; using a local broker", exc_info=True)
        return None
    return container


def _start_local_broker(tmp_path_factory: pytest.TempPathFactory) -> LocalBroker:
    run_dir = tmp_path_factory.mktemp("kafka") / "broker"
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        # A free port can be taken by another process (another test session,
        # a client's ephemeral port) before the JVM binds it: retry elsewhere.
        # The controller port is left to LocalBroker (port + 1000, else free).
        broker = LocalBroker(BrokerSettings(port=free_port(), run_dir=run_dir, heap=TEST_BROKER_HEAP))
        try:
            broker.start(timeout=LOCAL_START_TIMEOUT_S)
        except PortInUseError:
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            logger.warning("local Kafka broker lost a port race; retrying on another port", exc_info=True)
        else:
            return broker
    raise AssertionError("unreachable: the last attempt returns or raises")


@pytest.fixture(scope="session")
def kafka_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBackend]:
    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        backend = KafkaBackend("external", external, None)
        logger.info("using external Kafka at %s (from %s)", external, BOOTSTRAP_ENV)
        request.config.stash[_BACKEND_KEY] = backend
        yield backend
        return

    wanted = _wanted_backend()
    if wanted in ("auto", "docker"):
        container = _start_container(required=wanted == "docker")
        if container is not None:
            backend = KafkaBackend("docker", container.get_bootstrap_server(), None)
            logger.info("using Kafka container %s at %s", CONTAINER_IMAGE, backend.bootstrap)
            request.config.stash[_BACKEND_KEY] = backend
            try:
                yield backend
            finally:
                container.stop()
            return

    broker = _start_local_broker(tmp_path_factory)
    try:
        backend = KafkaBackend("local", broker.bootstrap, broker)
        logger.info("using local Kafka broker at %s (run dir %s)", broker.bootstrap, broker.run_dir)
        request.config.stash[_BACKEND_KEY] = backend
        yield backend
    finally:
        # Also reached when the session fails or is interrupted: a leaked JVM
        # would keep half a gigabyte and two ports.
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_backend: KafkaBackend) -> str:
    """Bootstrap servers of the session's Kafka cluster."""
    return kafka_backend.bootstrap


@pytest.fixture(scope="session")
def local_broker(kafka_backend: KafkaBackend) -> LocalBroker | None:
    """The session's LocalBroker, or None when the cluster is Docker or external.

    Tests that stop or kill it should use ``require_local_broker``, which
    skips without one and restarts the broker after the test.
    """
    return kafka_backend.local


@pytest.fixture
def require_local_broker(local_broker: LocalBroker | None) -> Iterator[LocalBroker]:
    """The session's LocalBroker, for tests that kill or restart it.

    Skips without one (fails in CI instead). After the test the broker is
    started again if the test left it down, even when the test failed, so one
    broken crash test cannot take the rest of the session with it.
    """
    if local_broker is None:
        message = f"needs a LocalBroker it can kill and restart ({BACKEND_ENV}=local)"
        if _in_ci():
            pytest.fail(f"{message}, but CI must never skip this test")
        pytest.skip(message)
    yield local_broker
    if not local_broker.status().running:
        logger.warning("test left the session's Kafka broker down; starting it again")
        local_broker.start(timeout=LOCAL_START_TIMEOUT_S)


_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]+")
_MAX_SLUG = 120
_MAX_NAME = 249  # Kafka's limit for topic names


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name(prefix)`` -> ``"{prefix}-{test-name}-{8 hex}"``, legal as a topic or group id.

    Each call returns a new name, so tests never see each other's (or an
    earlier run's) topics and groups on a shared cluster.
    """
    slug = _UNSAFE.sub("-", request.node.name).strip("-").lower()[:_MAX_SLUG].strip("-")

    def make(prefix: str) -> str:
        # '.' is replaced too: Kafka warns that '.' and '_' collide in metric names.
        clean = _UNSAFE.sub("-", prefix).strip("-") or "t"
        return f"{f'{clean}-{slug}'[: _MAX_NAME - 9]}-{uuid.uuid4().hex[:8]}"

    return make
