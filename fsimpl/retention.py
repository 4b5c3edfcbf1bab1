"""Retention: which snapshots a prune keeps and why (a pure function, like sanoid's policy).

Among the snapshots whose names start with the prefix, a snapshot is kept when it is one of the
newest `keep_last`, the newest of one of the `keep_hourly` most recent hours that have
snapshots, the newest of one of the `keep_daily` most recent days, or held. Everything else
goes. Hours and days are UTC.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Candidate:
    name: str
    created_ns: int
    holds: list[str]


@dataclass
class Verdict:
    name: str
    keep: bool
    reasons: list[str]


def plan(
    snapshots: list[Candidate],
    keep_last: int,
    keep_hourly: int = 0,
    keep_daily: int = 0,
    prefix: str = "",
) -> list[Verdict]:
    """A verdict for every snapshot matching prefix, newest first."""
    mine = sorted(
        (s for s in snapshots if s.name.startswith(prefix)),
        key=lambda s: s.created_ns,
        reverse=True,
    )
    reasons: dict[str, list[str]] = {s.name: [] for s in mine}
    for i, s in enumerate(mine[:keep_last]):
        reasons[s.name].append(f"one of the last {keep_last} (#{i + 1})")
    for label, fmt, count in (
        ("hourly", "%Y-%m-%dT%H:00Z", keep_hourly),
        ("daily", "%Y-%m-%d", keep_daily),
    ):
        seen: list[str] = []
        for s in mine:
            bucket = time.strftime(fmt, time.gmtime(s.created_ns / 1e9))
            if bucket in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(bucket)
            reasons[s.name].append(f"{label} {bucket}")
    for s in mine:
        if s.holds:
            reasons[s.name].append("held (" + ", ".join(s.holds) + ")")
    return [
        Verdict(s.name, bool(reasons[s.name]), reasons[s.name] or ["kept by no rule"]) for s in mine
    ]
