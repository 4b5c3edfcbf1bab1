"""The management client: one call interface, through a running server or straight to the disk.

`connect(disk)` finds the pool's server from its run-state file (or an explicit control socket)
and talks JSON lines to it; with no server running it opens the disk itself, under the same
exclusive lock, and runs the very same `dispatch()` the server would. snapctl sees no
difference except speed.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from . import rundir
from .errors import ERRORS_BY_CODE, DittoError, NotFound, ProtocolError, ServerUnavailable
from .protocol import MAX_REPLY, PROTOCOL_VERSION

if TYPE_CHECKING:  # the engine is imported only in direct mode: see protocol.py
    from .engine import Engine, Progress


class PoolClient(ABC):
    mode = "?"

    @abstractmethod
    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        progress: Progress | None = None,
        fd: int | None = None,
    ) -> Any:
        """Run one operation (operations.OPERATIONS' names); raise DittoError on failure."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (or the pool, in direct mode)."""

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketClient(PoolClient):
    mode = "server"

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ServerUnavailable(
                f"cannot reach the pool's server at {path}: {e.strerror or e}; is it running?"
            ) from None
        # Buffered: a raw socket file's readline takes one byte per recv, which made a
        # multi-megabyte reply (a list of thousands of snapshots) cost seconds.
        self.reader = self.sock.makefile("rb")
        self.ids = itertools.count(1)

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        progress: Progress | None = None,
        fd: int | None = None,
    ) -> Any:
        rid = next(self.ids)
        req: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args or {}}
        if fd is not None:
            req["fd"] = True
        msg = json.dumps(req).encode() + b"\n"
        try:
            if fd is None:
                self.sock.sendall(msg)
            else:  # the descriptor rides along with the request (SCM_RIGHTS)
                socket.send_fds(self.sock, [msg], [fd])
            while True:
                line = self.reader.readline(MAX_REPLY + 1)
                if not line:
                    raise ServerUnavailable(
                        f"the server at {self.path} closed the connection during '{op}'"
                    )
                reply = json.loads(line)
                if "progress" in reply:
                    if progress:
                        progress(reply["progress"]["done"], reply["progress"]["total"])
                    continue
                break
        except OSError as e:
            raise ServerUnavailable(f"lost the server at {self.path}: {e}") from None
        except ValueError:
            raise ProtocolError(f"the server at {self.path} sent a malformed reply") from None
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        cls = ERRORS_BY_CODE.get(err.get("code", ""), DittoError)
        exc = cls(err.get("message", "the server reported an error"))
        if cls is DittoError and "exit_code" in err:
            exc.exit_code = int(err["exit_code"])
        raise exc

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class DirectClient(PoolClient):
    mode = "direct"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        progress: Progress | None = None,
        fd: int | None = None,
    ) -> Any:
        from .operations import dispatch

        result = dispatch(self.engine, op, args or {}, progress, fd)
        return json.loads(json.dumps(result))  # the same shapes the socket would deliver

    def close(self) -> None:
        # Finish reclaiming what this session deleted, but leave deferred merges to a server's
        # idle time: a command that only reads must not spend minutes merging (and writing)
        # every incomplete block of a large pool.
        while self.engine.tick(merges=False):
            pass
        self.engine.close()


def connect(disk: str | None, control: str | None = None) -> PoolClient:
    """A client for the pool on disk: its running server if there is one, else the disk."""
    if control:
        return SocketClient(control)
    if not disk:
        raise NotFound("no pool given: use -d DISK (or set DITTOFS_DISK)")
    state = rundir.read_state(disk)
    if state and state.get("control"):
        return SocketClient(state["control"])
    if not os.path.exists(disk):
        raise NotFound(f"{disk} does not exist")
    # Direct mode holds the lock but does not claim the pool: a command that only reads, or
    # is refused, leaves the disk byte-identical.
    from .engine import Engine

    return DirectClient(Engine.open(disk, claim=False))
