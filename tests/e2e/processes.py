"""The saga's services as real processes: start, SIGKILL and restart them, and ask their /health.

Each incarnation of a service logs to its own file under the test's tmp dir, so after a failure
the file names say which process wrote what (`payment-1.2.log`: instance 1, second start).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_TOKEN = "crash-reviewer-token-8d21"
HEALTH_MESSAGE = "health endpoint listening"
MONITOR_MESSAGE = "monitor started"  # the monitor serves /health from faust's web server, on this port
STOP_TIMEOUT_S = 15.0


class ProcessDiedError(AssertionError):
    """A service process exited while the test was waiting for it."""


@dataclass
class ServiceProcess:
    """One instance of a service; `generation` counts its starts."""

    name: str
    instance: int
    env: dict[str, str]
    log_dir: Path
    generation: int = 0
    popen: subprocess.Popen[bytes] | None = None
    log_file: Path | None = None
    health_port: int | None = None
    expected_down: bool = False
    history: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.instance}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.label} is already running")
        self.generation += 1
        self.health_port = None
        self.expected_down = False
        self.log_file = self.log_dir / f"{self.label}.{self.generation}.log"
        with self.log_file.open("wb") as sink:
            # The child keeps its own copy of the descriptor; ours can close at once.
            self.popen = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.history.append(f"{_now()} started pid {self.popen.pid} (log {self.log_file.name})")
        log.info("started %s pid %s", self.label, self.popen.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, open transactions stay open until fenced or timed out."""
        popen = self._running()
        self.expected_down = True
        popen.send_signal(signal.SIGKILL)
        popen.wait(timeout=STOP_TIMEOUT_S)
        self.history.append(f"{_now()} SIGKILLed pid {popen.pid}")
        log.warning("SIGKILLed %s pid %s", self.label, popen.pid)

    def terminate(self) -> None:
        """Send SIGTERM (a clean stop) without waiting; a no-op when not running or already asked to stop.

        Once is enough: a second SIGTERM met after the loop's handlers are gone ends the process before
        it exports what it still buffers.
        """
        if self.popen is not None and self.alive() and not self.expected_down:
            self.expected_down = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; a no-op when not running."""
        if self.popen is None or not self.alive():
            return
        self.terminate()
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        self.history.append(f"{_now()} stopped, exit code {self.popen.returncode}")

    def log_tail(self, lines: int = 20) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines this incarnation wrote so far (other lines are skipped)."""
        if self.log_file is None or not self.log_file.exists():
            return []
        records = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    async def health(self) -> tuple[int, dict[str, Any]] | None:
        """(status, body) of GET /health, or None while the endpoint is not up."""
        port = self.health_port or self._find_health_port()
        if port is None:
            return None
        self.health_port = port
        raw = await get_health(port)
        if raw is None:
            return None
        head, _, body = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
            return status, json.loads(body)
        except (IndexError, ValueError):
            return None

    async def wait_healthy(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /health until it answers 200 (the instance owns partitions); the body it answered."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ProcessDiedError(f"{self.label} exited with {self._exit_code()}; log tail:\n{self.log_tail()}")
            answer = await self.health()
            if answer is not None and answer[0] == 200:
                self.history.append(f"{_now()} healthy: {answer[1]}")
                return answer[1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.label} not healthy within {timeout} s (last answer {answer}); log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.2)

    def _find_health_port(self) -> int | None:
        for record in self.log_records():
            if record.get("message") in (HEALTH_MESSAGE, MONITOR_MESSAGE) and isinstance(record.get("port"), int):
                port: int = record["port"]
                return port
        return None

    def _running(self) -> subprocess.Popen[bytes]:
        if self.popen is None or not self.alive():
            raise ProcessDiedError(f"{self.label} is not running (exit code {self._exit_code()})")
        return self.popen

    def _exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None


def _now() -> str:
    return time.strftime("%H:%M:%S")


def service_env(settings: ChoreoSettings, name: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one service process: the test's broker, prefix and partitions, no inherited CHOREO_*."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHOREO_")}
    env.update(
        {
            "CHOREO_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "CHOREO_TOPIC_PREFIX": settings.topic_prefix,
            "CHOREO_PARTITIONS": str(settings.partitions),
            "CHOREO_REPLICATION_FACTOR": str(settings.replication_factor),
            "CHOREO_ENVIRONMENT": "test",
            "CHOREO_HEALTH_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if name == "approval":
        env["CHOREO_APPROVAL_TOKEN"] = TEST_TOKEN
        env["CHOREO_APPROVAL_HTTP_PORT"] = "0"
    env.update(overrides or {})
    return env


class ProcessStack:
    """Service processes of one test; `close()` stops whatever is still running."""

    def __init__(
        self, settings: ChoreoSettings, log_dir: Path, overrides: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.overrides = overrides or {}
        self.processes: list[ServiceProcess] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str) -> ServiceProcess:
        instance = 1 + sum(1 for process in self.processes if process.name == name)
        process = ServiceProcess(
            name, instance, service_env(self.settings, name, self.overrides.get(name)), self.log_dir
        )
        self.processes.append(process)
        return process

    def instances(self, name: str) -> list[ServiceProcess]:
        return [process for process in self.processes if process.name == name]

    async def start(self, names: Iterable[str], *, instances: int = 1, timeout: float = 90.0) -> None:
        """Start `instances` of each service and wait until every one of them is healthy."""
        started = []
        for name in names:
            for _ in range(instances):
                process = self.add(name)
                process.start()
                started.append(process)
        await asyncio.gather(*(process.wait_healthy(timeout) for process in started))

    async def restart(self, process: ServiceProcess, timeout: float = 90.0) -> dict[str, Any]:
        process.start()
        return await process.wait_healthy(timeout)

    async def partitions_by_instance(self, name: str) -> dict[str, list[int]]:
        """What each running instance of `name` says it owns; an instance that does not answer owns nothing."""
        owned: dict[str, list[int]] = {}
        for process in self.instances(name):
            answer = await process.health() if process.alive() else None
            owned[process.label] = list(answer[1].get("partitions", [])) if answer and answer[0] == 200 else []
        return owned

    def check_alive(self) -> None:
        """Fail if a process the test did not kill has exited."""
        for process in self.processes:
            if process.popen is not None and not process.alive() and not process.expected_down:
                raise ProcessDiedError(
                    f"{process.label} exited unexpectedly with {process.popen.returncode}; log tail:\n"
                    f"{process.log_tail()}"
                )

    def report(self) -> str:
        lines = []
        for process in self.processes:
            lines.append(f"{process.label}:")
            lines.extend(f"  {entry}" for entry in process.history)
        return "\n".join(lines)

    def logged(self, *, level: str | None = None, message: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Log records of every incarnation so far (all of their files), filtered by level and/or message."""
        found = []
        for path in sorted(self.log_dir.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if level is not None and record.get("level") != level:
                    continue
                if message is not None and record.get("message") != message:
                    continue
                found.append((path.name, record))
        return found

    def close(self) -> None:
        # Everyone gets SIGTERM first, so the stops overlap instead of adding up.
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.stop()


async def get_health(port: int) -> bytes | None:
    """The whole HTTP answer to GET /health on a local port, or None while nothing answers there."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
