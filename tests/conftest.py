"""Shared fixtures: servers are started per test and always stopped, by PID, at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import NbdkitServer


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., NbdkitServer]]:
    """A factory of NbdkitServer; every server it made is killed when the test ends."""
    made: list[NbdkitServer] = []

    def make(disk: Path | None = None, **kw: object) -> NbdkitServer:
        srv = NbdkitServer(tmp_path, disk or tmp_path / "pool.img", name=f"srv{len(made)}", **kw)  # type: ignore[arg-type]
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.kill()
