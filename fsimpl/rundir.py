"""Run state: where a pool's server publishes its control socket and PID.

A server writes `RUNDIR/ID.json` (ID derived from the disk's real path) holding its PID, the
disk, the control socket and its NBD endpoints, so `snapctl -d DISK` finds the server even when
it was started with `control=` somewhere else. RUNDIR is `/run/dittofs`, or `$DITTOFS_RUNDIR`;
it is created mode 0700 because the control socket inside it manages the pool.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

DEFAULT_RUNDIR = "/run/dittofs"


def rundir() -> str:
    path = os.environ.get("DITTOFS_RUNDIR") or DEFAULT_RUNDIR
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def pool_id(disk: str) -> str:
    return hashlib.sha256(os.path.realpath(disk).encode()).hexdigest()[:16]


def default_control_path(disk: str) -> str:
    return os.path.join(rundir(), pool_id(disk) + ".sock")


def state_path(disk: str) -> str:
    return os.path.join(rundir(), pool_id(disk) + ".json")


def write_state(disk: str, state: dict[str, Any]) -> None:
    path = state_path(disk)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_state(disk: str) -> dict[str, Any] | None:
    """The state of a running server for disk, or None (no file, or its process is gone)."""
    try:
        with open(state_path(disk)) as f:
            state: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    pid = int(state.get("pid", 0))
    if pid <= 0 or not pid_alive(pid):
        return None
    return state


def pid_alive(pid: int) -> bool:
    """A running process (a zombie counts as gone: its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def remove_state(disk: str, pid: int) -> None:
    """Remove the state file if it is still ours."""
    path = state_path(disk)
    try:
        with open(path) as f:
            if int(json.load(f).get("pid", 0)) != pid:
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass
