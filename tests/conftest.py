"""Shared fixtures: servers are started per test and always stopped, by PID, at the end; and
every test fails if the engine logs a warning or an error it did not declare (support.logcheck).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import NbdkitServer
from support.logcheck import EngineLogWatch


@pytest.fixture(autouse=True)
def engine_log(request: pytest.FixtureRequest) -> Iterator[EngineLogWatch]:
    """Fails the test when the engine logs a warning or an error nobody declared: in-process,
    or in the log of an nbdkit server the test used. Declare with @pytest.mark.engine_log(...)
    or engine_log.expect(...)."""
    watch = EngineLogWatch()
    for mark in request.node.iter_markers("engine_log"):
        watch.expect(*mark.args)
    watch.start()
    yield watch
    unexpected = watch.stop()
    if unexpected:
        shown = "\n".join(f"  {u[:2000]}" for u in unexpected[:20])
        pytest.fail(
            f"the engine logged {len(unexpected)} warning(s) or error(s) this test did not "
            f"declare (@pytest.mark.engine_log):\n{shown}",
            pytrace=False,
        )


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
