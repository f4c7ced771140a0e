"""Where the CPU goes: py-spy samples of each service during one step of load, grouped by kind of work.

`choreo bench --profile DIR` runs one extra step at the highest flat rate with `py-spy record` attached
to every service, keeps each raw profile (collapsed stacks, `DIR/<service>.txt`, readable by
flamegraph tools and speedscope) and sums each sample under the kind of work its innermost
recognised frame belongs to.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 100


def compiled(patterns: tuple[tuple[str, str], ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """(kind, regular expression) pairs with each expression compiled."""
    return tuple((kind, re.compile(pattern)) for kind, pattern in patterns)


# (kind of work, pattern of a frame's "function (file:line)"), tried from the innermost frame out:
# the first frame that matches any pattern names the sample's kind.
KINDS = compiled(
    (
        ("socket writes", r"_SelectorSocketTransport\.write|socket\.send"),
        ("waiting in select", r"\(selectors\.py"),
        ("logging", r"\(logging/|services/common/logs\.py"),
        ("JSON and validation", r"pydantic|\(json/|orjson|msgspec"),
        ("state store", r"rocksdict|services/common/state/"),
        ("Kafka client (aiokafka)", r"aiokafka/"),
        ("Kafka client (confluent-kafka)", r"confluent_kafka/"),
        ("handlers and saga rules", r"services/(inventory|payment|approval|shipping|audit)/|services/common/saga\.py"),
        ("runner", r"services/common/processor\.py"),
        ("event loop", r"\(asyncio/|uvloop"),
    )
)
OTHER = "other"


@dataclass
class Profile:
    """One process's samples by kind of work, and the functions that spent the most samples themselves."""

    samples: int = 0
    kinds: dict[str, float] = field(default_factory=dict)  # share of samples
    top_self: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def of(cls, kinds: Counter[str], own: Counter[str], top: int = 12) -> Profile:
        """Shares from sample counts by kind and by the function each sample was in."""
        total = sum(kinds.values())
        if total == 0:
            return cls()
        return cls(
            samples=total,
            kinds={kind: count / total for kind, count in kinds.most_common()},
            top_self=[(name, count / total) for name, count in own.most_common(top)],
        )


def kind_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for kind, pattern in KINDS:
            if pattern.search(frame):
                return kind
    return OTHER


def summarize(collapsed: str, top: int = 12) -> Profile:
    """A py-spy `--format raw` profile (one `frame;frame;... count` line per stack) summed up."""
    kinds: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        kinds[kind_of(frames)] += samples
        own[_short(frames[-1])] += samples
    return Profile.of(kinds, own, top)


def _short(frame: str) -> str:
    """`function (path:line)` with the site-packages or repository prefix and the line number dropped."""
    frame = re.sub(r"\(.*?/site-packages/", "(", frame)
    frame = re.sub(r"\(.*?/lib/python3\.\d+/", "(", frame)
    return re.sub(r":\d+\)$", ")", frame)


@contextlib.contextmanager
def recording(pids: Mapping[str, int], out_dir: Path) -> Iterator[dict[str, Path]]:
    """py-spy attached to each process while the block runs; yields where each raw profile goes."""
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy is not installed: run make setup (it is a dev dependency)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.txt" for name in pids}
    options = ["--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--nonblocking"]
    recorders = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), *options, "--output", str(paths[name])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield paths
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for recorder in recorders:
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                log.warning("py-spy (pid %d) did not stop; its profile may be missing", recorder.pid)


def read_profiles(paths: Mapping[str, Path]) -> dict[str, Profile]:
    found = {}
    for name, path in paths.items():
        if path.exists():
            found[name] = summarize(path.read_text())
        else:
            log.warning("no profile of %s was written", name)
    return found


def render(profiles: Mapping[str, Profile]) -> list[str]:
    """A table: share of each kind of work per process, then each process's top functions by own time."""
    if not profiles:
        return []
    names = list(profiles)
    order = [kind for kind, _ in KINDS] + [OTHER]
    lines = ["", f"  {'profile (share of samples)':<32}" + "".join(f"{name[:10]:>11}" for name in names)]
    for kind in order:
        shares = [profiles[name].kinds.get(kind, 0.0) for name in names]
        if any(share >= 0.005 for share in shares):
            lines.append(f"  {kind:<32}" + "".join(f"{share:>11.1%}" for share in shares))
    for name in names:
        lines.append(f"  {name}: most own time in")
        lines += [f"    {share:6.1%}  {function[:100]}" for function, share in profiles[name].top_self[:6]]
    return lines
