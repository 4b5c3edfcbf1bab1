"""Watching what the engine logs during a test: a warning or an error nobody expected fails it.

Two sources:
* the engine in the test's own process: records of the `dittofs` logger at WARNING or above;
* the log of every nbdkit server the test started (or that a longer-lived fixture started and
  the test used): entries whose level is warning or error, and Python tracebacks. The plugin
  writes the engine's records there as `nbdkit: dittofs: LEVEL: message`.

A test declares what it provokes with the marker `@pytest.mark.engine_log(r"regex", ...)` or,
for cases known only at run time, `engine_log.expect(r"regex")` on the fixture. An entry is
explained when any declared pattern matches anywhere in it (re.search).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

# log files of nbdkit servers started so far in this pytest process (harness.NbdkitServer)
SERVER_LOGS: list[Path] = []

_ENTRY_START = re.compile(r"^nbdkit: |^Traceback \(most recent call last\)|^Exception in thread")
_PROBLEM = re.compile(
    r"^nbdkit: [^:]+: (error|warning|critical):|^Traceback|^Exception in thread", re.I
)


def register_server_log(path: Path) -> None:
    if path not in SERVER_LOGS:
        SERVER_LOGS.append(path)


def log_entries(text: str) -> list[str]:
    """A server log cut into entries: a line that starts one, with the lines that follow it."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if _ENTRY_START.match(line) or not entries:
            entries.append([line])
        else:
            entries[-1].append(line)
    return ["\n".join(e) for e in entries]


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.entries: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(f"{record.levelname.lower()}: {record.getMessage()}")


@dataclass
class EngineLogWatch:
    expected: list[re.Pattern[str]] = field(default_factory=list)
    _collector: _Collector = field(default_factory=_Collector)
    _offsets: dict[Path, int] = field(default_factory=dict)

    def expect(self, *patterns: str) -> None:
        """Declare log entries this test provokes on purpose."""
        self.expected.extend(re.compile(p) for p in patterns)

    def start(self) -> None:
        logging.getLogger("dittofs").addHandler(self._collector)
        self._offsets = {p: _size(p) for p in SERVER_LOGS}

    def stop(self) -> list[str]:
        """Every problem entry since start() that no declared pattern explains."""
        logging.getLogger("dittofs").removeHandler(self._collector)
        problems = [f"in-process engine: {e}" for e in self._collector.entries]
        for path in SERVER_LOGS:
            start = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                continue
            problems += [
                f"{path.name}: {e}" for e in log_entries(text) if _PROBLEM.search(e.split("\n")[0])
            ]
        return [p for p in problems if not any(x.search(p) for x in self.expected)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# What the engine logs for conditions tests provoke on purpose (patterns for engine_log).
SLOT_UNUSABLE = r"superblock slot \d \(byte \d+, type superblock\) is unusable"
COMMIT_FAILED = r"commit failed \(.*\); reverting to the last durable state"
READ_ONLY_REQUEST = r"write request on readonly connection"  # nbdkit refuses it before us
SNAPSHOT_GONE = r"the snapshot was deleted while this connection was open"
VOLUME_CHANGED = r"the volume changed under this connection"
NO_SUCH_SNAPSHOT = r"no snapshot named '[^']*'"
NO_SUCH_VOLUME = r"no volume named '[^']*'"
# an open within two generations of a repair that rebuilt a damaged bitmap: the ring's older
# bitmap is the damaged one
OLD_BITMAP_UNREADABLE = r"the free-space bitmap of generation \d+ cannot be read"
READ_ONLY_POOL = r"the pool is read-only: metadata it needs for writing is damaged"
# a degraded pool refuses an export it cannot read exactly, or whose name its damage lost
CANNOT_READ_EXACTLY = r"cannot be (read exactly|named): "
BAD_METADATA = r"metadata block \d+ \([^)]*\) (failed its checksum|claims address)"
# a bad copy found beside a good twin (rewritten, or in a read-only check left for scrub)
HEALED_COPY = (
    r"at block \d+(, and rewritten from it at the next commit"
    r"|; 'snapctl scrub' or 'check --repair' rewrites the bad one)"
)
POOL_SPANS_MORE = r"is \d+ bytes but its pool spans \d+"
NOT_A_POOL = r"holds no dittofs pool"
IN_USE = r"is in use by process \d+"
