"""The control plane: management operations as JSON lines over a Unix socket.

The operations themselves are declared in operations.py; its `dispatch()` maps a name and its
arguments to an engine call and a JSON-ready result. The socket server here and snapctl's direct
mode both go through it, so a command answers the same with or without a server.

The protocol (docs/control-protocol.md): one JSON object per line, a request at most
MAX_MESSAGE bytes (a reply at most MAX_REPLY: a listing of many snapshots is long);
a request {"v": 1, "id": N, "op": OP, "args": {...}} gets zero or more {"v": 1, "id": N,
"progress": {"done": D, "total": T}} lines, then exactly one reply {"v": 1, "id": N, "ok": true,
"result": ...} or {"v": 1, "id": N, "ok": false, "error": {"code", "message", "exit_code"}}.

Only root and the server's own user may connect: the socket is mode 0600 inside a 0700
directory, and each connection's peer uid is checked with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from .engine import Engine
from .errors import DittoError, PermissionDenied, ProtocolError
from .operations import dispatch
from .protocol import MAX_MESSAGE, PROTOCOL_VERSION


def error_json(e: DittoError) -> dict[str, Any]:
    return {"code": e.code, "message": e.message, "exit_code": e.exit_code}


class ControlServer:
    """Serves dispatch() on a Unix socket, one thread per client connection."""

    def __init__(self, engine: Engine, path: str, log: Callable[[str], None] = lambda m: None):
        self.engine = engine
        self.path = path
        self.log = log
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.owner_uid = os.getuid()
        self.stopping = False
        self.thread = threading.Thread(
            target=self._accept_loop, name="dittofs-control", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid == 0 or uid == self.owner_uid

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            f = _Channel(conn)
            if not self._peer_allowed(conn):
                denied = PermissionDenied(
                    "only root or the user running the server may manage this pool"
                )
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    f.readline(MAX_MESSAGE + 1)  # take the request, so the reply is read
                    reply = {
                        "v": PROTOCOL_VERSION,
                        "id": None,
                        "ok": False,
                        "error": error_json(denied),
                    }
                    _send(f, reply)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # let the client read the reply before the close
                return
            try:
                while not self.stopping:
                    line = f.readline(MAX_MESSAGE + 1)
                    if not line:
                        return
                    if len(line) > MAX_MESSAGE:
                        err = ProtocolError(f"message longer than {MAX_MESSAGE} bytes; closing")
                        msg = {
                            "v": PROTOCOL_VERSION,
                            "id": None,
                            "ok": False,
                            "error": error_json(err),
                        }
                        _send(f, msg)
                        return
                    self._handle(conn, f, line)
            finally:
                f.close_fds()

    def _handle(self, conn: socket.socket, f: _Channel, line: bytes) -> None:
        rid: Any = None
        try:
            try:
                req = json.loads(line)
            except (ValueError, RecursionError):
                raise ProtocolError("a request must be one JSON object per line") from None
            if not isinstance(req, dict):
                raise ProtocolError("a request must be a JSON object")
            rid = req.get("id")
            if req.get("v") != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {req.get('v')!r} not supported (server speaks "
                    f"{PROTOCOL_VERSION}); use the snapctl of the same dittofs release"
                )
            op = req.get("op")
            args = req.get("args") or {}
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ProtocolError("'op' must be a string and 'args' an object")

            def progress(done: int, total: int) -> None:
                # dropped, not queued, when the client is not reading: never block the work
                if select.select([], [conn], [], 0)[1]:
                    msg = {
                        "v": PROTOCOL_VERSION,
                        "id": rid,
                        "progress": {"done": done, "total": total},
                    }
                    _send(f, msg)

            fd = f.take_fd() if req.get("fd") else None
            try:
                result = dispatch(self.engine, op, args, progress, fd)
            finally:
                if fd is not None:
                    os.close(fd)
            _send(f, {"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result})
        except DittoError as e:
            _send(f, {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": error_json(e)})
        except Exception as e:  # a bug: report it instead of killing the connection silently
            self.log(f"error: control: internal error: {e!r}")
            err = DittoError(f"internal error in the server: {e!r}")
            _send(f, {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": error_json(err)})


class _Channel:
    """One control connection: JSON lines in, with file descriptors riding along (SCM_RIGHTS)
    for operations that stream (send to a pipe, receive from one)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self.buf and len(self.buf) < limit:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 4)
            self.fds.extend(fds)
            if not data:
                return b""
            self.buf += data
        line, sep, self.buf = self.buf.partition(b"\n")
        return line + sep

    def take_fd(self) -> int:
        if not self.fds:
            raise ProtocolError("the request announced a file descriptor but none came with it")
        return self.fds.pop(0)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _send(f: Any, obj: dict[str, Any]) -> None:
    try:
        f.write(json.dumps(obj).encode() + b"\n")
    except OSError:
        pass  # the client went away; the operation itself has completed
