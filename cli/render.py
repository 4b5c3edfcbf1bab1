"""Rendering for snapctl: sizes, tables and progress, rich on a terminal and plain when piped."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from fsimpl.errors import InvalidArgument

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'64K', '10G', '1.5T', '4096' -> bytes (binary units, like nbdkit and zfs)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidArgument(f"'{text}' is not a size: use a number with K, M, G or T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human_size(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n /= 1024  # type: ignore[assignment]
    return str(n)


SNAPSHOT_COLUMNS = [
    ("name", "NAME"),
    ("id", "ID"),
    ("created", "CREATED"),
    ("used_bytes", "USED"),
    ("referenced_bytes", "REFER"),
    ("written_bytes", "WRITTEN"),
    ("holds", "HOLDS"),
]


class Renderer:
    def __init__(self, no_header: bool = False, parsable: bool = False) -> None:
        self.tty = sys.stdout.isatty()
        self.no_header = no_header
        self.parsable = parsable
        self.console = Console()

    def _cell(self, key: str, value: Any, row: dict[str, Any]) -> str:
        if key.endswith("_bytes"):
            return str(value) if self.parsable else human_size(int(value))
        if key == "holds":
            return ",".join(value) if value else "-"
        if key == "created" and self.parsable:
            return str(int(row["created_ns"]) // 1_000_000_000)
        return str(value)

    def table(self, columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> None:
        cells = [[self._cell(k, r[k], r) for k, _ in columns] for r in rows]
        if self.tty and not self.no_header:
            t = Table(box=None, header_style="bold")
            for _, title in columns:
                t.add_column(title)
            for c in cells:
                t.add_row(*c)
            self.console.print(t)
            return
        if not self.no_header:
            click.echo("\t".join(title for _, title in columns))
        for c in cells:
            click.echo("\t".join(c))

    def snapshots(self, snaps: list[dict[str, Any]]) -> None:
        self.table(SNAPSHOT_COLUMNS, snaps)

    def pool_info(self, d: dict[str, Any]) -> None:
        lines = [
            ("disk", d["disk"]),
            ("format version", d["format_version"]),
            ("block size", human_size(d["block_size"])),
            ("capacity", human_size(d["capacity_bytes"]) + (" (grows)" if d["growable"] else "")),
            ("used", human_size(d["used_bytes"])),
            ("free", human_size(d["free_bytes"])),
            ("snapshots", d["snapshot_count"]),
            ("role", d["role"]),
            ("server", f"pid {d['server_pid']}" if d["mode"] == "server" else "none (direct)"),
        ]
        for v in d["volumes"]:
            lines.append(
                (
                    f"volume {v['name']}",
                    f"{human_size(v['size_bytes'])}, {human_size(v['allocated_bytes'])} allocated",
                )
            )
        width = max(len(k) for k, _ in lines)
        for k, v in lines:
            click.echo(f"{k:<{width}}  {v}")

    @contextlib.contextmanager
    def progress(self, what: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar on a terminal (shown once work takes a moment); silent when piped."""
        if not self.tty:
            yield lambda done, total: None
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        ) as bar:
            task = bar.add_task(what, total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total or None)

            yield advance
