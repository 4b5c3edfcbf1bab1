"""Running snapctl: the one runner every test uses.

snapctl runs as the installed console script (.venv/bin/snapctl), never imported, so what the
tests see is what a user sees: exit codes, one-line errors, JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SNAPCTL = REPO / ".venv" / "bin" / "snapctl"


def snapctl(
    *args: str,
    disk: Path | str | None = None,
    env: dict[str, str] | None = None,
    check: bool = False,
    timeout: float = 120,
    stdin: Any = subprocess.DEVNULL,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """snapctl [-d DISK] ARGS...; with check, a failure raises AssertionError with its output.
    prefix runs it under another command (`ip netns exec NS`, a user switch)."""
    argv = [*prefix, str(SNAPCTL)]
    if disk is not None:
        argv += ["-d", str(disk)]
    argv += list(args)
    cp = subprocess.run(
        argv,
        env=env if env is not None else dict(os.environ),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"{shown(cp)}\n(failed)")
    return cp


def snapctl_json(*args: str, **kw: Any) -> Any:
    """The JSON snapctl ARGS... --json prints (the command must succeed)."""
    cp = snapctl(*args, "--json", check=True, **kw)
    return json.loads(cp.stdout)


def shown(cp: subprocess.CompletedProcess[str]) -> str:
    """A finished command and its output, for assertion messages."""
    argv = [str(a) for a in cp.args]
    if str(SNAPCTL) in argv:
        argv = ["snapctl", *argv[argv.index(str(SNAPCTL)) + 1 :]]
    return f"{' '.join(argv)} -> {cp.returncode}\n{cp.stdout}{cp.stderr}"
