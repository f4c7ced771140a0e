"""`choreo run` as a real process on the test's broker: its services, their /health and their log records.

The supervisor and the services it starts share one output file, as they share a terminal under
`make run`: the services write one JSON object per line, the supervisor `LEVEL logger: message`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.settings import ChoreoSettings
from services.common.stack import available_services
from tests.e2e.processes import REPO_ROOT, get_health, service_env

SUPERVISOR_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
SERVICE_MODULE = re.compile(r"^services\.([a-z]+)$")


@dataclass(frozen=True)
class LogRecord:
    level: str
    logger: str
    message: str
    fields: Mapping[str, Any]


class ChoreoRun:
    """One `choreo run --external-broker`, in a process group of its own."""

    def __init__(self, settings: ChoreoSettings, log_file: Path, overrides: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.log_file = log_file
        # Every service's own settings in one environment: they ignore the others' variables.
        self.env = service_env(settings, "approval", {"CHOREO_RUN_DIR": str(log_file.parent), **(overrides or {})})
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def start(self, *, ignore_sigint: bool = False) -> None:
        """Start the supervisor; with `ignore_sigint` it inherits SIGINT ignored, as `cmd &` in a script does."""

        def inherited_dispositions() -> None:
            if ignore_sigint:
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        with self.log_file.open("ab") as sink:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "run", "--external-broker"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=inherited_dispositions,  # noqa: PLW1509 - only signal.signal, no locks taken
            )

    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def services(self) -> dict[int, str]:
        """The supervisor's children now: pid -> service name."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            parent = int(stat.rpartition(")")[2].split()[1])
            module = argv[2].decode() if len(argv) > 2 and argv[1] == b"-m" else ""
            name = SERVICE_MODULE.match(module)
            if parent == self.pid and name is not None:
                found[int(entry.name)] = name.group(1)
        return found

    def records(self) -> list[LogRecord]:
        """Every log record written so far, the services' (JSON) and the supervisor's."""
        found = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            record = _parse(line)
            if record is not None:
                found.append(record)
        return found

    def unparsed(self) -> list[str]:
        """Output lines that are no log record at all (a traceback printed raw, say)."""
        lines = self.log_file.read_text(errors="replace").splitlines()
        return [line for line in lines if line.strip() and _parse(line) is None and not line.startswith(" ")]

    def health_ports(self) -> dict[str, int]:
        ports = {}
        for record in self.records():
            port = record.fields.get("port")
            if record.message == "health endpoint listening" and isinstance(port, int):
                ports[str(record.fields["service"])] = port
            elif record.message == "monitor started" and isinstance(port, int):
                ports["monitor"] = port
        return ports

    async def wait_healthy(self, timeout: float = 120.0) -> dict[str, int]:
        """Poll until every service answers 200 on /health; their health ports."""
        wanted = set(available_services())
        deadline = time.monotonic() + timeout
        while True:
            if self.exit_code() is not None:
                raise AssertionError(f"choreo run exited with {self.exit_code()}:\n{self.tail()}")
            ports = self.health_ports()
            healthy = {name for name, port in ports.items() if await _health_status(port) == 200}
            if healthy >= wanted:
                return ports
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy within {timeout} s: {sorted(wanted - healthy)}\n{self.tail()}")
            await asyncio.sleep(0.5)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.pid, signum)

    def signal_supervisor(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float, *, watch: Callable[[], None] = lambda: None) -> int:
        """Wait for the supervisor to exit, calling `watch` on the way; its exit code."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"choreo run still running {timeout} s after the signal:\n{self.tail()}")
            watch()
            time.sleep(0.1)
        return code

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop whatever is left of the group (a failed test's supervisor and services)."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive_in_group(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def alive_in_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _parse(line: str) -> LogRecord | None:
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return None
        if isinstance(entry, dict) and "level" in entry:
            return LogRecord(str(entry["level"]), str(entry.get("logger")), str(entry.get("message")), entry)
        return None
    match = SUPERVISOR_LINE.match(line)
    if match is None:
        return None
    return LogRecord(match.group(1), match.group(2), match.group(3), {})


async def _health_status(port: int) -> int | None:
    raw = await get_health(port)
    try:
        return int(raw.split(b" ", 2)[1]) if raw is not None else None
    except (IndexError, ValueError):
        return None
