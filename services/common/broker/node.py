"""One real Apache Kafka (KRaft) node for dev, tests and CI: a broker and controller in one JVM.

The broker runs from the Maven artifacts declared in ``broker/pom.xml`` (no
Docker, no Kafka tarball): Maven resolves the jars into the local repository
once, and ``kafka.Kafka`` is launched as a detached JVM whose state lives in a
run directory::

    <run dir>/server.properties   broker config, rewritten on every start
    <run dir>/log4j2.properties   logging config for the broker JVM
    <run dir>/classpath.txt       resolved jars (reused while newer than the pom)
    <run dir>/broker.pid          pid of the running JVM
    <run dir>/data/               log.dirs (topic data and the KRaft metadata log)
    <run dir>/logs/server.log     broker log; logs/kafka.out holds JVM stdout/stderr

Importing this module has no side effects; nothing touches the network or the
file system until a method of :class:`LocalBroker` is called.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import default_insync_replicas

__all__ = [
    "BrokerError",
    "BrokerSettings",
    "BrokerStatus",
    "LocalBroker",
    "PortInUseError",
    "StartResult",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_POM = REPO_ROOT / "broker" / "pom.xml"
DEFAULT_RUN_DIR = REPO_ROOT / ".run" / "broker"

# The first resolve downloads ~70 MB of jars; slow mirrors need far longer than
# the broker itself needs to start, so Maven gets its own, generous budget.
MAVEN_TIMEOUT_S = 900.0
FORMAT_TIMEOUT_S = 120.0
# Budget for one admin round trip while polling; a healthy local broker answers
# in milliseconds, so this only bounds how long a wedged broker can stall us.
PROBE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.2
KILL_WAIT_S = 10.0
LOG_TAIL_LINES = 40

_T = TypeVar("_T")


class BrokerError(RuntimeError):
    """The local broker could not be started, stopped or inspected."""


class PortInUseError(BrokerError):
    """A port the broker needs is taken; retrying on other ports may succeed."""


class BrokerSettings(BaseSettings):
    """Where and how the local broker runs; every field has a ``CHOREO_BROKER_`` env var."""

    model_config = SettingsConfigDict(env_prefix="CHOREO_BROKER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=9092, ge=1, le=65535)
    # None: port + 1000 when that port is free, else any free port.
    controller_port: int | None = Field(default=None, ge=1, le=65535)
    run_dir: Path = DEFAULT_RUN_DIR
    heap: str = Field(default="512m", pattern=r"^[1-9][0-9]*[kKmMgG]?$")
    pom: Path = DEFAULT_POM
    # 1: one node in the run dir itself; more: node-1, node-2, ... under it, on ports port, port+1, ...
    nodes: int = Field(default=1, ge=1, le=9)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    ready: bool
    rss_bytes: int | None


@dataclass(frozen=True, slots=True)
class StartResult:
    bootstrap: str
    pid: int
    already_running: bool
    elapsed_s: float


class LocalBroker:
    """Start, inspect and stop one Kafka broker+controller process on this machine.

    Several ``LocalBroker`` objects (or processes) may point at the same run
    directory: the pid file and an advisory lock on the run directory are the
    shared state, so ``choreo broker stop`` stops a broker a test started.
    """

    def __init__(
        self,
        settings: BrokerSettings | None = None,
        *,
        node_id: int = 1,
        voters: str | None = None,
        replication: int = 1,
        cluster_id: str | None = None,
    ) -> None:
        """One node; a cluster's nodes share `voters` (the KRaft quorum), `replication` and `cluster_id`."""
        self._settings = settings if settings is not None else BrokerSettings()
        self._node_id = node_id
        self._voters = voters
        self._replication = replication
        self._given_cluster_id = cluster_id
        self._run_dir = self._settings.run_dir.expanduser().resolve()
        # Only set in the process that launched the JVM: used to reap it so an
        # exited broker does not linger as a zombie that still looks alive.
        self._proc: subprocess.Popen[bytes] | None = None
        # Size of server.log when this object last launched the JVM, so a
        # start-up failure reports that launch's errors, not older ones.
        self._log_offset: int | None = None

    def __repr__(self) -> str:
        return f"LocalBroker(bootstrap={self._settings.bootstrap!r}, run_dir={str(self._run_dir)!r})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- paths and addresses -------------------------------------------------

    @property
    def settings(self) -> BrokerSettings:
        return self._settings

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def data_dir(self) -> Path:
        return self._run_dir / "data"

    @property
    def logs_dir(self) -> Path:
        return self._run_dir / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def console_file(self) -> Path:
        return self.logs_dir / "kafka.out"

    @property
    def pid_file(self) -> Path:
        return self._run_dir / "broker.pid"

    @property
    def server_properties(self) -> Path:
        return self._run_dir / "server.properties"

    @property
    def classpath_file(self) -> Path:
        return self._run_dir / "classpath.txt"

    @property
    def bootstrap(self) -> str:
        """Address clients should use; for a running broker, the one it advertises."""
        advertised = self._read_properties().get("advertised.listeners", "")
        if self._running_pid() is not None and advertised.startswith("PLAINTEXT://"):
            return advertised.removeprefix("PLAINTEXT://").split(",", 1)[0]
        return self._settings.bootstrap

    # -- lifecycle -------------------------------------------------------------

    @property
    def node_id(self) -> int:
        return self._node_id

    def pid(self) -> int | None:
        """The running JVM's pid, or None."""
        return self._running_pid()

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> StartResult:
        """Start the broker and return once it answers an admin request.

        ``timeout`` bounds the wait from JVM launch to readiness; resolving the
        jars (first run only) has its own budget. Starting an already running
        broker is a no-op, and starting on an existing data dir keeps its data.
        With ``wait=False`` it returns once the JVM is launched: a node of a
        cluster answers only once a quorum of controllers runs.
        """
        started_at = time.monotonic()
        self._run_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            pid = self._running_pid()
            if pid is not None:
                if not wait:
                    return StartResult(self.bootstrap, pid, True, time.monotonic() - started_at)
                return self._attach(pid, started_at, timeout)
            self._remove_pid_file()

            controller_port = self._choose_controller_port()
            self._check_port_free(self._settings.port, "broker")
            classpath = self.resolve_classpath()
            java = _find_java()
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._write_log4j_config()
            self._write_server_properties(controller_port)
            self._format_storage(java, classpath)
            proc = self._launch(java, classpath)
            if not wait:
                return StartResult(self._settings.bootstrap, proc.pid, False, time.monotonic() - started_at)
            self._wait_ready_or_kill(proc.pid, timeout)
        elapsed = time.monotonic() - started_at
        logger.info(
            "Kafka broker ready at %s (pid %d, %.1fs)",
            self._settings.bootstrap,
            proc.pid,
            elapsed,
        )
        return StartResult(self._settings.bootstrap, proc.pid, False, elapsed)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the running node answers an admin request and lists itself."""
        pid = self._running_pid()
        if pid is None and self._proc is not None:
            # Launched here and already gone (or not yet showing as the broker): the wait says which,
            # with the JVM's exit code and the log lines that explain it.
            pid = self._proc.pid
        if pid is None:
            raise BrokerError(f"no broker of {self._run_dir} is running")
        self._wait_ready_or_kill(pid, timeout)

    def _wait_ready_or_kill(self, pid: int, timeout: float) -> None:
        try:
            self._wait_ready(pid, time.monotonic() + timeout)
        except BaseException:
            # A JVM that never became ready would hold the ports and the
            # data dir lock, making every retry fail in a confusing way.
            logger.warning("broker pid %d failed to start; making sure it is gone", pid)
            self._signal_and_wait(pid, signal.SIGKILL, KILL_WAIT_S)
            self._remove_pid_file()
            raise

    def terminate(self) -> None:
        """Ask a running node to shut down (SIGTERM) without waiting; `stop` waits."""
        pid = self._running_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP the node: it holds its sockets but answers nothing, as a node cut off would."""
        self._signal_running(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_running(signal.SIGCONT)

    def _signal_running(self, sig: signal.Signals) -> None:
        pid = self._running_pid()
        if pid is None:
            raise BrokerError(f"no broker of {self._run_dir} is running")
        os.kill(pid, sig)

    def stop(self, timeout: float = 30.0) -> bool:
        """Shut the broker down cleanly (SIGTERM), SIGKILL after ``timeout``.

        Returns whether a running broker was stopped.
        """
        with self._lock():
            pid = self._running_pid()
            if pid is None:
                self._remove_pid_file()
                return False
            logger.info("stopping Kafka broker pid %d", pid)
            if not self._signal_and_wait(pid, signal.SIGTERM, timeout):
                logger.warning(
                    "broker pid %d still running %.0fs after SIGTERM; sending SIGKILL",
                    pid,
                    timeout,
                )
                if not self._signal_and_wait(pid, signal.SIGKILL, KILL_WAIT_S):
                    raise BrokerError(f"broker pid {pid} survived SIGKILL")
            self._remove_pid_file()
            return True

    def kill(self) -> bool:
        """SIGKILL the broker, as a crash would; the data dir is left as the crash left it."""
        with self._lock():
            pid = self._running_pid()
            if pid is None:
                return False
            logger.info("killing Kafka broker pid %d", pid)
            if not self._signal_and_wait(pid, signal.SIGKILL, KILL_WAIT_S):
                raise BrokerError(f"broker pid {pid} survived SIGKILL")
            self._remove_pid_file()
            return True

    def wipe(self) -> None:
        """Delete all topic data and the cluster id; logs and the resolved classpath stay."""
        with self._lock():
            pid = self._running_pid()
            if pid is not None:
                raise BrokerError(f"refusing to wipe {self.data_dir}: broker pid {pid} is running")
            if self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            logger.info("wiped Kafka data in %s", self.data_dir)

    def status(self, probe_timeout: float = PROBE_TIMEOUT_S) -> BrokerStatus:
        pid = self._running_pid()
        bootstrap = self.bootstrap
        if pid is None:
            return BrokerStatus(False, None, bootstrap, False, None)
        ready = _run_sync(_admin_ready(bootstrap, probe_timeout))
        return BrokerStatus(True, pid, bootstrap, ready, _rss_bytes(pid))

    # -- classpath ---------------------------------------------------------------

    def resolve_classpath(self) -> list[Path]:
        """Jars for the broker, resolving them with Maven only when needed.

        A classpath file is reused while it is newer than the pom and every jar
        it lists still exists, which keeps warm starts free of a Maven run. The
        shared copy under ``broker/target`` spares throwaway run dirs (tests) a
        Maven run too.
        """
        pom = self._settings.pom.expanduser().resolve()
        if not pom.is_file():
            raise BrokerError(f"broker pom not found: {pom}")
        self._run_dir.mkdir(parents=True, exist_ok=True)
        shared = pom.parent / "target" / "classpath.txt"
        for candidate in (self.classpath_file, shared):
            jars = _fresh_classpath(candidate, pom)
            if jars is not None:
                if candidate != self.classpath_file:
                    _atomic_write(self.classpath_file, candidate.read_text(encoding="utf-8"))
                return jars

        text = _maven_build_classpath(pom, self._run_dir)
        _atomic_write(self.classpath_file, text)
        shared.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(shared, text)
        jars = _fresh_classpath(self.classpath_file, pom)
        if jars is None:
            raise BrokerError(f"Maven produced an unusable classpath in {self.classpath_file}")
        return jars

    # -- internals -------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Serialises start/stop across processes sharing a run dir (CLI and a
        # test session, or parallel test workers) so two JVMs never race for it.
        self._run_dir.mkdir(parents=True, exist_ok=True)
        with open(self._run_dir / "broker.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _attach(self, pid: int, started_at: float, timeout: float) -> StartResult:
        running = self.bootstrap
        if running != self._settings.bootstrap:
            raise BrokerError(
                f"a broker from {self._run_dir} is already running at {running} (pid {pid}), "
                f"not at {self._settings.bootstrap}; stop it first"
            )
        # Usually answers at once; waiting covers a start that another process
        # began and abandoned before the broker became ready.
        self._wait_ready(pid, time.monotonic() + timeout)
        logger.info("Kafka broker already running at %s (pid %d)", running, pid)
        return StartResult(running, pid, True, time.monotonic() - started_at)

    def _choose_controller_port(self) -> int:
        configured = self._settings.controller_port
        if configured is not None:
            if configured == self._settings.port:
                raise BrokerError("controller port must differ from the broker port")
            self._check_port_free(configured, "controller")
            return configured
        preferred = self._settings.port + 1000
        if preferred <= 65535 and _port_free(self._settings.host, preferred):
            return preferred
        port = _free_port(self._settings.host)
        # The broker port is not bound yet, so the OS may hand it out here.
        while port == self._settings.port:
            port = _free_port(self._settings.host)
        logger.info("controller port %d is taken; using free port %d", preferred, port)
        return port

    def _check_port_free(self, port: int, role: str) -> None:
        if not _port_free(self._settings.host, port):
            raise PortInUseError(f"{role} port {self._settings.host}:{port} is already in use by another process")

    def _write_log4j_config(self) -> None:
        _atomic_write(self._run_dir / "log4j2.properties", _LOG4J2_PROPERTIES)

    def _write_server_properties(self, controller_port: int) -> None:
        host, port = self._settings.host, self._settings.port
        replicas = self._replication
        insync = default_insync_replicas(replicas)
        props: dict[str, str | int] = {
            "process.roles": "broker,controller",
            "node.id": self._node_id,
            # Static voters: no --standalone/--initial-controllers at format time.
            "controller.quorum.voters": self._voters or f"{self._node_id}@{host}:{controller_port}",
            "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": 6,
            "default.replication.factor": replicas,
            "min.insync.replicas": insync,
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": insync,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": insync,
            # Never elect a replica that missed acknowledged writes.
            "unclean.leader.election.enable": "false",
            # Fewer internal partitions than the production default (50): the
            # first consumer group and the first transaction create these
            # topics, and each partition costs start-up and recovery work.
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.num.partitions": 10,
            # Tests join groups constantly; the default 3s delay adds up.
            "group.initial.rebalance.delay.ms": 0,
            # Lets kill tests use consumer session timeouts below the default
            # minimum of 6s, so a killed member's partitions move on quickly.
            "group.min.session.timeout.ms": 1000,
            # Compaction becomes observable within a second in tests.
            "log.cleaner.backoff.ms": 500,
            # Retention/flush tasks otherwise start only 30s after boot.
            "log.initial.task.delay.ms": 0,
            # After a SIGKILL the restarted broker cannot register until the
            # dead incarnation's session expires (9s by default, ~13s with
            # registration backoff). Broker and controller share this JVM, so
            # a short session carries little risk of spurious fencing.
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 500,
        }
        body = "".join(f"{key}={value}\n" for key, value in props.items())
        _atomic_write(
            self.server_properties,
            "# Written by LocalBroker; edits are overwritten.\n" + body,
        )

    def _read_properties(self) -> dict[str, str]:
        try:
            text = self.server_properties.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        result: dict[str, str] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                result[key.strip()] = value.strip()
        return result

    def _format_storage(self, java: str, classpath: list[Path]) -> None:
        if (self.data_dir / "meta.properties").exists():
            return  # formatted earlier; skipping saves a JVM start per restart
        cluster_id = self._cluster_id()
        cmd = [
            java,
            *self._logging_jvm_args(),
            "-cp",
            os.pathsep.join(map(str, classpath)),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.server_properties),
            "--ignore-formatted",
        ]
        logger.info("formatting Kafka storage in %s (cluster id %s)", self.data_dir, cluster_id)
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=FORMAT_TIMEOUT_S,
            cwd=self._run_dir,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(
                f"kafka.tools.StorageTool format failed (exit {result.returncode}):\n"
                f"{_tail_text(result.stdout + result.stderr)}"
            )

    def _cluster_id(self) -> str:
        # Chosen once per data dir (format needs it before meta.properties
        # exists); living inside the data dir, wipe() forgets it too.
        path = self.data_dir / "cluster.id"
        if self._given_cluster_id is not None:
            _atomic_write(path, self._given_cluster_id + "\n")
            return self._given_cluster_id
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            cluster_id = _random_kafka_uuid()
            _atomic_write(path, cluster_id + "\n")
            return cluster_id

    def _logging_jvm_args(self) -> list[str]:
        return [
            f"-Dlog4j2.configurationFile={(self._run_dir / 'log4j2.properties').as_uri()}",
            f"-Dkafka.logs.dir={self.logs_dir}",
        ]

    def _launch(self, java: str, classpath: list[Path]) -> subprocess.Popen[bytes]:
        heap = self._settings.heap
        cmd = [
            java,
            f"-Xms{heap}",
            f"-Xmx{heap}",
            # GC flags from Kafka's kafka-run-class.sh.
            "-server",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:MaxInlineLevel=15",
            # A broker limping on after an OOM hides the problem; exiting
            # makes start()/tests fail with the reason in kafka.out.
            "-XX:+ExitOnOutOfMemoryError",
            f"-XX:ErrorFile={self.logs_dir / 'hs_err_pid%p.log'}",
            "-Djava.awt.headless=true",
            *self._logging_jvm_args(),
            "-cp",
            os.pathsep.join(map(str, classpath)),
            "kafka.Kafka",
            str(self.server_properties),
        ]
        logger.debug("launching broker: %s", cmd)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.console_file, "ab") as console:
            # New session: Ctrl-C in the terminal (or pytest's SIGINT) must not
            # reach the broker; it is stopped explicitly with stop().
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self._run_dir,
                start_new_session=True,
                close_fds=True,
            )
        self._proc = proc
        _atomic_write(self.pid_file, f"{proc.pid}\n")
        logger.info("launched Kafka broker pid %d (log: %s)", proc.pid, self.log_file)
        return proc

    def _wait_ready(self, pid: int, deadline: float) -> None:
        host, port = self._settings.host, self._settings.port
        while True:
            if not self._alive(pid):
                code = self._proc.returncode if self._proc and self._proc.pid == pid else None
                details = self._failure_details(pid)
                # Ports are checked before launch, but another process can grab
                # one before the JVM binds it; callers may retry elsewhere.
                error = PortInUseError if "Address already in use" in details else BrokerError
                raise error(
                    f"Kafka broker pid {pid} exited during start-up"
                    + (f" with code {code}" if code is not None else "")
                    + details
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"Kafka broker pid {pid} did not answer admin requests at {host}:{port} in time"
                    + self._failure_details(pid)
                )
            # A cheap TCP check first keeps aiokafka from logging connection
            # errors for every poll while the JVM is still booting.
            if _port_open(host, port, min(1.0, remaining)) and _run_sync(
                _admin_ready(f"{host}:{port}", min(PROBE_TIMEOUT_S, remaining))
            ):
                return
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            return None
        except ValueError:
            logger.warning("ignoring corrupt pid file %s", self.pid_file)
            return None
        if not self._alive(pid):
            return None
        # After a reboot or a crash the pid may now belong to something else;
        # never report (or signal) a process that is not this run dir's broker.
        cmdline = _cmdline(pid)
        if cmdline is not None and not ("kafka.Kafka" in cmdline and str(self.server_properties) in cmdline):
            logger.warning("pid %d from %s is not this broker; ignoring it", pid, self.pid_file)
            return None
        return pid

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        return _pid_alive(pid)

    def _signal_and_wait(self, pid: int, sig: signal.Signals, timeout: float) -> bool:
        """Send ``sig`` to ``pid``; return whether it exited within ``timeout``."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while self._alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _remove_pid_file(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    def _failure_details(self, pid: int) -> str:
        """Errors logged since our launch, then the tails of the broker's outputs."""
        parts = []
        offset = self._log_offset if self._proc is not None and self._proc.pid == pid else None
        if offset is not None:
            # The root cause is usually logged long before the tail, which
            # is filled by the shutdown that follows it.
            errors = _error_lines(self.log_file, offset)
            if errors:
                parts.append(f"\n--- errors in {self.log_file} ---\n{errors}")
        for path in (self.log_file, self.console_file):
            tail = _tail_file(path, LOG_TAIL_LINES // 2)
            if tail:
                parts.append(f"\n--- last lines of {path} ---\n{tail}")
        return "".join(parts) if parts else f"\n(no broker output in {self.logs_dir})"


_LOG4J2_PROPERTIES = """\
# Written by LocalBroker. One rolling file instead of Kafka's split
# server/controller/state-change logs: easier to tail when a test fails.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 5
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.channel.name = kafka.network.RequestChannel$
logger.channel.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


async def _admin_ready(bootstrap: str, budget_s: float) -> bool:
    """Whether the broker answers a metadata request and lists itself."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="choreo-broker-probe",
        request_timeout_ms=max(1, int(budget_s * 1000)),
    )
    try:
        async with asyncio.timeout(budget_s):
            await admin.start()
            cluster: Mapping[str, Any] = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError) as exc:
        logger.debug("admin probe of %s failed: %r", bootstrap, exc)
        return False
    finally:
        await admin.close()
    return bool(cluster.get("brokers"))


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run refuses to nest; a private loop in a worker thread lets async
    # callers (e.g. async tests) use the sync API, at the cost of blocking.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _maven_build_classpath(pom: Path, run_dir: Path) -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("mvn not found on PATH; Maven is needed to fetch the Kafka jars")
    output = run_dir / "classpath.mvn.txt"
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        "dependency:build-classpath",
        "-Dmdep.includeScope=runtime",
        f"-Dmdep.outputFile={output}",
    ]
    logger.info("resolving Kafka jars with Maven (first run downloads ~70 MB)")
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=MAVEN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"Maven did not resolve the Kafka jars within {MAVEN_TIMEOUT_S:.0f}s") from exc
    if result.returncode != 0:
        raise BrokerError(
            f"Maven failed to resolve the Kafka jars (exit {result.returncode}): {' '.join(cmd)}\n"
            f"{_tail_text(result.stdout + result.stderr)}"
        )
    logger.info("resolved Kafka jars in %.1fs", time.monotonic() - started)
    try:
        return output.read_text(encoding="utf-8").strip() + "\n"
    finally:
        output.unlink(missing_ok=True)


def _fresh_classpath(path: Path, pom: Path) -> list[Path] | None:
    try:
        if path.stat().st_mtime < pom.stat().st_mtime:
            return None
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    jars = [Path(entry) for entry in text.split(os.pathsep) if entry]
    if not jars or not all(jar.is_file() for jar in jars):
        return None
    return jars


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
        logger.warning("JAVA_HOME=%s has no bin/java; looking on PATH", java_home)
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java not found (set JAVA_HOME or put java on PATH); Kafka 4 needs Java 17+")
    return java


def _random_kafka_uuid() -> str:
    # Same shape and restrictions as org.apache.kafka.common.Uuid.randomUuid():
    # URL-safe base64 of 16 random bytes; ids starting with '-' are rejected
    # because they look like command-line flags.
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not value.startswith("-"):
            return value


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Java servers bind with SO_REUSEADDR; without it here, TIME_WAIT
        # sockets left by a just-stopped broker would look like a busy port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=max(0.05, timeout)):
            return True
    except OSError:
        return False


@functools.cache
def _has_procfs() -> bool:
    return Path("/proc/self/stat").exists()


def _pid_alive(pid: int) -> bool:
    if not _has_procfs():
        # Without procfs (macOS) zombies cannot be told apart; the Popen
        # handle covers our own children, and others are reaped by init.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    # The state follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state == "Z":
        # An exited child of ours not yet reaped; reap it so it does not linger.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _rss_bytes(pid: int) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


_LOG_LEVEL = re.compile(r"^\[[^\]]*\] (ERROR|FATAL) ")


def _error_lines(path: Path, offset: int, limit: int = LOG_TAIL_LINES // 2) -> str:
    """ERROR/FATAL lines after ``offset`` with their exception and cause lines (no stack frames)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            # A smaller file means it rolled over since launch: read it all.
            handle.seek(offset if offset <= size else 0)
            text = handle.read(4 * 1024 * 1024).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    picked: list[str] = []
    in_error = False
    for line in text.splitlines():
        if line.startswith("["):
            in_error = bool(_LOG_LEVEL.match(line))
            if in_error:
                picked.append(line)
        elif in_error and not line.startswith(("\tat ", "\t... ")) and line.strip():
            picked.append(line)  # exception message or "Caused by:" line
        if len(picked) >= limit:
            break
    return "\n".join(picked)


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            # The tail of a rolling log is all that matters; avoid reading MBs.
            handle.seek(max(0, handle.tell() - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return ""
    return _tail_text(data.decode("utf-8", errors="replace"), lines)
