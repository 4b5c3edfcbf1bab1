"""The control plane: management operations as JSON lines over a Unix socket.

`dispatch()` maps an operation name and its arguments to an engine call and a JSON-ready result;
the socket server and snapctl's direct mode both go through it, so a command answers the same
with or without a server. The protocol (docs/control-protocol.md): one JSON object per line,
at most MAX_MESSAGE bytes; a request {"v": 1, "id": N, "op": OP, "args": {...}} gets zero or more
{"v": 1, "id": N, "progress": {"done": D, "total": T}} lines, then exactly one reply
{"v": 1, "id": N, "ok": true, "result": ...} or {"v": 1, "id": N, "ok": false, "error": {"code",
"message", "exit_code"}}.

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
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from . import standby
from .engine import Engine
from .errors import DittoError, InvalidArgument, PermissionDenied, ProtocolError
from .management import DEFAULT_HOLD_TAG, Progress, SnapshotInfo
from .names import DEFAULT_VOLUME

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20


def snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    d = asdict(info)
    d["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_ns / 1e9))
    return d


def _str(args: dict[str, Any], key: str, required: bool = True) -> str | None:
    v = args.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str):
        raise InvalidArgument(f"argument '{key}' must be a string")
    return v


def _name(args: dict[str, Any], key: str = "name") -> str:
    return _str(args, key) or ""


def _flag(args: dict[str, Any], key: str) -> bool:
    v = args.get(key, False)
    if not isinstance(v, bool):
        raise InvalidArgument(f"argument '{key}' must be true or false")
    return v


def _count(args: dict[str, Any], key: str) -> int:
    v = args.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise InvalidArgument(f"argument '{key}' must be a count >= 0")
    return v


def _size(args: dict[str, Any]) -> int:
    v = args.get("size")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InvalidArgument("argument 'size' must be a size in bytes > 0")
    return v


def _volume(args: dict[str, Any]) -> str:
    return _str(args, "volume", False) or DEFAULT_VOLUME


def dispatch(
    engine: Engine,
    op: str,
    args: dict[str, Any],
    progress: Progress | None,
    fd: int | None = None,
) -> Any:
    """Run one management operation; raises DittoError on failure. fd: a file descriptor the
    caller passed along, for the streaming operations (send writes to it, receive reads it)."""
    if op == "hello":
        return {"protocol": PROTOCOL_VERSION, "pid": os.getpid()}
    if op == "info":
        return engine.info()
    if op == "tune":
        v = args.get("snapshot_min_free")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise InvalidArgument("snapshot_min_free must be a byte count")
        return engine.tune(v)
    if op == "commit":  # make everything durable now (a supervisor stopping the server)
        engine.flush()
        return {"generation": engine.pool.sb.generation}
    if op == "list":
        return [snapshot_json(s) for s in engine.list_snapshots()]
    if op == "names":
        return engine.snapshot_names()
    if op == "create":
        vols = args.get("volumes")
        if vols is not None and not (
            isinstance(vols, list) and all(isinstance(v, str) for v in vols)
        ):
            raise InvalidArgument("argument 'volumes' must be a list of volume names")
        return snapshot_json(engine.create_snapshot(_name(args), vols, _flag(args, "writable")))
    if op == "delete":  # {"name": N} or {"names": [N, ...]}: all or none
        names = args.get("names")
        if names is None:
            names = [_name(args)]
        elif not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise InvalidArgument("argument 'names' must be a list of snapshot names")
        results = engine.delete_snapshots(
            names, progress, _flag(args, "dry_run"), _flag(args, "if_exists")
        )
        return {"results": results, "freed_bytes": sum(r["freed_bytes"] for r in results)}
    if op == "check":
        return engine.check_committed()
    if op == "scrub":
        return engine.scrub(progress)
    if op == "rename":
        engine.rename_snapshot(_name(args, "old"), _name(args, "new"))
        return {}
    if op == "hold":
        return {"holds": engine.hold(_name(args), _str(args, "tag", False) or DEFAULT_HOLD_TAG)}
    if op == "release":
        tag = _str(args, "tag", False) or DEFAULT_HOLD_TAG
        return {"holds": engine.release(_name(args), tag)}
    if op == "rollback":
        destroyed = engine.rollback(
            _name(args),
            _volume(args),
            _flag(args, "destroy_newer"),
            _flag(args, "force"),
            progress,
        )
        return {"destroyed": destroyed}
    if op == "diff":
        ranges = engine.diff_blocks(_name(args, "from"), _str(args, "to", False), _volume(args))
        return {"ranges": ranges, "changed_bytes": sum(n for _, n in ranges)}
    if op == "du":
        return engine.space(_str(args, "from", False), _str(args, "to", False), _volume(args))
    if op == "prune":
        return engine.prune(
            _count(args, "keep_last"),
            _count(args, "keep_hourly"),
            _count(args, "keep_daily"),
            _str(args, "prefix", False) or "",
            _flag(args, "dry_run"),
        )
    if op == "volume_create":
        return engine.create_volume(_name(args), _size(args))
    if op == "volume_list":
        return engine.list_volumes()
    if op == "volume_resize":
        return engine.resize_volume(_name(args), _size(args), _flag(args, "force"))
    if op == "volume_delete":
        return {"deleted": engine.delete_volume(_name(args), _flag(args, "recursive"), progress)}
    if op == "clone":
        return engine.clone(_name(args, "source"), _name(args))
    if op == "flatten":
        return engine.flatten(_name(args), progress)
    if op == "promote":
        return engine.promote(_name(args), progress)
    if op == "set":
        engine.set_writable(_name(args), _flag(args, "writable"))
        return {}
    if op in ("send", "receive"):
        return _stream(engine, op, args, progress, fd)
    if op == "resume_token":
        return {"token": engine.resume_token()}
    if op == "receive_abort":
        return engine.abort_receive()
    if op == "send_size":
        return engine.stream_size(_str(args, "from", False), _name(args, "to"))
    if op.startswith("standby_"):
        return _standby(engine, op, args, fd)
    if op == "exports":
        return [{"name": n, "description": d} for n, d in engine.export_names()]
    raise ProtocolError(f"unknown operation {_shown(op)}")


def _stream(
    engine: Engine, op: str, args: dict[str, Any], progress: Progress | None, fd: int | None
) -> Any:
    if fd is None:
        raise ProtocolError(f"'{op}' needs a file descriptor passed with the request")
    key = _str(args, "key", False)
    mac_key = bytes.fromhex(key) if key else None
    if op == "send":
        with os.fdopen(os.dup(fd), "wb") as sink:
            return engine.send(
                _str(args, "from", False),
                _str(args, "to", False) or "",
                sink,
                mac_key,
                _str(args, "resume", False),
                progress,
            )
    with os.fdopen(os.dup(fd), "rb") as source:
        return engine.receive(source, mac_key, _flag(args, "force"), progress)


def _standby(engine: Engine, op: str, args: dict[str, Any], fd: int | None) -> Any:
    if op == "standby_status":
        key_hex = _str(args, "key", False)
        return standby.status_with_lag(
            engine, _str(args, "identity", False), bytes.fromhex(key_hex) if key_hex else None
        )
    identity = _str(args, "identity") or ""
    key = bytes.fromhex(_str(args, "key") or "")
    me = _str(args, "me", False) or (engine.endpoint.address if engine.endpoint else "")
    if op == "standby_serve":
        if engine.endpoint is None:
            engine.endpoint = standby.ReplicationEndpoint(
                engine, _name(args, "listen"), identity, key
            )
            engine.endpoint.start()
        return {"listen": engine.endpoint.address}
    if op == "standby_attach":
        return standby.attach(
            engine, _name(args, "address"), identity, key, me, _flag(args, "force")
        )
    if op == "standby_sync":
        return standby.sync(engine, identity, key)
    if op == "standby_promote":
        return standby.promote(engine, identity, key, _flag(args, "force"))
    if op == "standby_failback":
        return standby.failback(engine, identity, key, me, _flag(args, "force"))
    if op == "standby_demote":
        if fd is None:
            return standby.demote(engine, identity, key)

        def save(base: str, tip: str) -> None:
            assert fd is not None
            with os.fdopen(os.dup(fd), "wb") as sink:
                engine.send(base, tip, sink)

        return standby.demote(engine, identity, key, save)
    raise ProtocolError(f"unknown operation {_shown(op)}")


def _shown(text: str) -> str:
    """A client-supplied string, bounded and escaped for an error message."""
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


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
            self.log(f"control: internal error: {e!r}")
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
