"""The whole stack on this machine: the local broker, the topics and one process per service.

`choreo run` keeps it in the foreground (Ctrl-C stops all of it); `choreo up --detach` leaves it
running with logs and pid files under the run folder, and `choreo down` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.broker import REPO_ROOT, BrokerSettings, LocalCluster
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics

log = logging.getLogger(__name__)

# Start order follows the saga, so downstream consumers are up before upstream ones emit.
SERVICES: tuple[str, ...] = ("audit", "monitor", "shipping", "approval", "payment", "inventory")
DEFAULT_RUN_DIR = REPO_ROOT / ".run"


def run_dir() -> Path:
    """Where `choreo up --detach` keeps pid files and logs (`CHOREO_RUN_DIR`, default `.run/`)."""
    return Path(os.environ.get("CHOREO_RUN_DIR", DEFAULT_RUN_DIR))


STOP_TIMEOUT_S = 15.0
RESTART_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_file: Path | None


def available_services() -> list[str]:
    """The services of this checkout that can run as `python -m services.<name>`."""
    return [name for name in SERVICES if _runnable(name)]


def _runnable(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"services.{name}.__main__") is not None
    except ModuleNotFoundError:  # the service's package itself does not exist in this checkout
        return False


def _pid_file(name: str) -> Path:
    return run_dir() / "pids" / f"{name}.pid"


def _log_file(name: str) -> Path:
    return run_dir() / "logs" / f"{name}.log"


def prepare(settings: ChoreoSettings, broker: LocalCluster, *, start_broker: bool) -> ChoreoSettings:
    """Start the local broker or cluster (unless told to use the configured one) and provision the topics."""
    if start_broker:
        result = broker.start()
        log.warning(
            "broker ready at %s (%s, %.1f s)",
            result.bootstrap,
            "already running" if result.already_running else "started",
            result.elapsed_s,
        )
        update: dict[str, object] = {"bootstrap_servers": result.bootstrap}
        if "replication_factor" not in settings.model_fields_set:
            update["replication_factor"] = broker.replication
        settings = settings.model_copy(update=update)
    asyncio.run(ensure_topics(settings, update=True))
    return settings


def spawn(settings: ChoreoSettings, names: Sequence[str], *, detach: bool) -> list[ServiceProcess]:
    env = {
        **os.environ,
        "CHOREO_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CHOREO_REPLICATION_FACTOR": str(settings.replication_factor),
    }
    started = []
    for name in names:
        log_file = _log_file(name) if detach else None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        output = open(log_file, "ab") if log_file is not None else None  # noqa: SIM115 - handed to the child
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=detach,
            )
        finally:
            if output is not None:
                output.close()
        if detach:
            _pid_file(name).parent.mkdir(parents=True, exist_ok=True)
            _pid_file(name).write_text(str(process.pid))
        started.append(ServiceProcess(name, process, log_file))
        log.warning("started %s (pid %d)", name, process.pid)
    return started


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_POLL_S = 0.1


class StopRequest:
    """SIGINT or SIGTERM received; `wait` sleeps until then. While `interrupting`, a signal also aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupting = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            log.warning("%s received; stopping the stack", signal.Signals(signum).name)
        self.signum = signum
        if self.interrupting:
            raise KeyboardInterrupt

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, less if a stop is requested meanwhile; whether one is."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(STOP_POLL_S, left))
        return self.requested


def run_foreground(settings: ChoreoSettings, broker_settings: BrokerSettings, *, start_broker: bool) -> int:
    """Run everything until SIGINT (Ctrl-C) or SIGTERM, then stop the services and the broker cleanly.

    Both handlers are installed whatever was inherited: started with `&` from a script, SIGINT
    arrives ignored, and the services (which handle it themselves) would stop on a SIGINT to the
    group while the supervisor restarted them for ever. A service found exited after a stop was
    requested is not restarted: it stopped on the same signal.
    """
    broker = LocalCluster(broker_settings)
    stop = StopRequest()
    previous = {signum: signal.signal(signum, stop.handle) for signum in STOP_SIGNALS}
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        # Starting the broker can take a while: a signal meanwhile aborts it, as Ctrl-C would.
        stop.interrupting = True
        try:
            settings = prepare(settings, broker, start_broker=start_broker)
        finally:
            stop.interrupting = False
        if not stop.requested:
            names = available_services()
            running = {service.name: service.process for service in spawn(settings, names, detach=False)}
            log.warning("stack running: %s; Ctrl-C stops it", ", ".join(names))
        _supervise(settings, running, stop)
    except KeyboardInterrupt:
        pass  # a stop requested while the broker started; everything started so far is stopped below
    finally:
        _terminate([p.pid for p in running.values() if p.poll() is None])
        for process in running.values():
            process.wait()
        if start_broker:
            broker.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.warning("stack stopped")
    return 0


def _supervise(settings: ChoreoSettings, running: dict[str, subprocess.Popen[bytes]], stop: StopRequest) -> None:
    """Restart a service that exits, until a stop is requested."""
    restarts: dict[str, int] = {}
    while not stop.wait(0.5):
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            # The signal reaches the supervisor as soon as the services, which take longer to exit.
            if stop.requested:
                return
            # A crashed or fenced service starts again from its committed state, like a
            # container under a restart policy; the backoff keeps a crash loop cheap.
            restarts[name] = restarts.get(name, 0) + 1
            delay = min(RESTART_BACKOFF_MAX_S, 0.5 * 2 ** min(restarts[name], 6))
            log.error("%s exited with %s; restarting in %.1f s", name, process.returncode, delay)
            if stop.wait(delay):
                return
            [service] = spawn(settings, [name], detach=False)
            running[name] = service.process


def up_detached(
    settings: ChoreoSettings, broker_settings: BrokerSettings, *, start_broker: bool
) -> list[ServiceProcess]:
    broker = LocalCluster(broker_settings)
    settings = prepare(settings, broker, start_broker=start_broker)
    running = {name for name in available_services() if _running_pid(name) is not None}
    return spawn(settings, [name for name in available_services() if name not in running], detach=True)


def down(broker_settings: BrokerSettings, *, stop_broker: bool) -> list[str]:
    stopped = []
    pids = {name: pid for name in SERVICES if (pid := _running_pid(name)) is not None}
    _terminate(list(pids.values()))
    for name in pids:
        _pid_file(name).unlink(missing_ok=True)
        stopped.append(name)
    if stop_broker:
        LocalCluster(broker_settings).stop()
        stopped.append("broker")
    return stopped


def _running_pid(name: str) -> int | None:
    try:
        pid = int(_pid_file(name).read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def _terminate(pids: Sequence[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", pid, STOP_TIMEOUT_S)
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to probing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
