"""Where the broker's CPU goes: a JDK Flight Recorder recording of the broker JVM during one step of
load, its samples grouped by the request they serve.

`choreo bench --profile DIR` starts a recording with `jcmd <pid> JFR.start` (the JDK's own tools, no
agent), keeps it as `DIR/broker.jfr` (open it in JDK Mission Control) and reads it back with `jfr
print --json`. A sample on a request handler thread counts under the Kafka API it serves (the
outermost `KafkaApis.handle…Request` frame); any other sample, under its thread's job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.profile import Profile, compiled

log = logging.getLogger(__name__)

RECORDING = "choreo-bench"
# Java and native samples every 5 ms per thread: enough for a profile of a step, cheap for the broker.
SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<configuration version="2.0" label="choreo bench">
  <event name="jdk.ExecutionSample">
    <setting name="enabled">true</setting><setting name="period">5 ms</setting>
  </event>
  <event name="jdk.NativeMethodSample">
    <setting name="enabled">true</setting><setting name="period">5 ms</setting>
  </event>
</configuration>
"""
REQUEST = re.compile(r"^handle(\w+?)(Request)?$")
API_KINDS = {
    "Produce": "produce",
    "Fetch": "fetch",
    "AddPartitionsToTxn": "transactions: add partitions",
    "AddOffsetsToTxn": "transactions: add offsets",
    "TxnOffsetCommit": "transactions: offset commit",
    "EndTxn": "transactions: end",
    "WriteTxnMarkers": "transactions: write markers",
    "InitProducerId": "transactions: init producer",
}
# (job, pattern of the thread's name) for samples outside a request handler.
THREAD_KINDS = compiled(
    (
        ("network threads (sockets)", r"network-thread"),
        ("transactions: marker sender", r"TxnMarkerSender"),
        ("transactions: verification sender", r"AddPartitionsToTxnSender"),
        ("log cleaner", r"log-cleaner"),
        ("KRaft controller and metadata", r"raft|controller|metadata|quorum"),
    )
)
# A native sample of a thread parked in one of these is waiting, not spending CPU.
IDLE = re.compile(r"EPoll\.wait|epollWait|Net\.poll|Net\.accept|Unsafe\.park|Thread\.sleep|Object\.wait")
GROUPS = "consumer groups and offsets"
GROUP_APIS = {"JoinGroup", "SyncGroup", "Heartbeat", "LeaveGroup", "OffsetFetch", "OffsetCommit", "FindCoordinator"}
OTHER = "other"


def jdk_tool(name: str) -> str | None:
    return shutil.which(name)


@contextlib.contextmanager
def recording(pid: int, out_dir: Path) -> Iterator[Path | None]:
    """JFR on the broker while the block runs; yields where the recording goes (None without a JDK)."""
    jcmd = jdk_tool("jcmd")
    if jcmd is None or jdk_tool("jfr") is None:
        log.warning("jcmd or jfr not found (a JDK, not only a JRE, has them): no broker profile")
        yield None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    settings, path = out_dir / "broker.jfc", out_dir / "broker.jfr"
    settings.write_text(SETTINGS)
    started = subprocess.run(
        [jcmd, str(pid), "JFR.start", f"name={RECORDING}", f"settings={settings}", f"filename={path}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if started.returncode != 0:
        log.warning("could not start JFR on the broker: %s", started.stdout + started.stderr)
        yield None
        return
    try:
        yield path
    finally:
        stopped = subprocess.run(
            [jcmd, str(pid), "JFR.stop", f"name={RECORDING}"], check=False, capture_output=True, text=True, timeout=120
        )
        if stopped.returncode != 0:
            log.warning("could not stop JFR on the broker: %s", stopped.stdout + stopped.stderr)


def kind_of(thread: str, methods: list[tuple[str, str]]) -> str:
    """The job of one sample: `methods` are its frames' (class, method), innermost first."""
    for class_name, method in reversed(methods):
        if class_name.endswith("KafkaApis"):
            match = REQUEST.match(method)
            if match is not None and match.group(1) != "":
                api = match.group(1)
                if api in API_KINDS:
                    return API_KINDS[api]
                return GROUPS if api in GROUP_APIS else f"other requests ({api})"
    for job, pattern in THREAD_KINDS:
        if pattern.search(thread):
            return job
    return OTHER


def summarize(events: list[dict[str, Any]], top: int = 12) -> Profile:
    """`jfr print --json` execution and native samples summed up by job."""
    kinds: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for event in events:
        values = event.get("values", {})
        thread = (values.get("sampledThread") or {}).get("javaName") or ""
        frames = (values.get("stackTrace") or {}).get("frames") or []
        methods = [_method(frame) for frame in frames]
        if methods and IDLE.search(f"{methods[0][0]}.{methods[0][1]}"):
            continue
        kinds[kind_of(thread, methods)] += 1
        if methods:
            own[f"{methods[0][0]}.{methods[0][1]}"] += 1
    return Profile.of(kinds, own, top)


def _method(frame: dict[str, Any]) -> tuple[str, str]:
    method = frame.get("method") or {}
    return str((method.get("type") or {}).get("name", "")).replace("/", "."), str(method.get("name", ""))


def read(path: Path | None) -> Profile | None:
    """The recording at `path` summed up, or None if there is none."""
    jfr = jdk_tool("jfr")
    if path is None or jfr is None or not path.exists():
        return None
    printed = subprocess.run(
        [jfr, "print", "--json", "--stack-depth", "64", "--events", "ExecutionSample,NativeMethodSample", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if printed.returncode != 0:
        log.warning("could not read %s: %s", path, printed.stderr)
        return None
    events: list[dict[str, Any]] = json.loads(printed.stdout).get("recording", {}).get("events", [])
    return summarize(events)


def render(broker: Profile | None) -> list[str]:
    """The broker's samples by job, then the methods with the most samples of their own."""
    if broker is None or broker.samples == 0:
        return []
    lines = ["", f"  broker profile (JFR, {broker.samples} samples; share by request or thread)"]
    lines += [f"    {share:6.1%}  {kind}" for kind, share in broker.kinds.items() if share >= 0.005]
    lines.append("  broker: most own time in")
    lines += [f"    {share:6.1%}  {method[:100]}" for method, share in broker.top_self[:6]]
    return lines
