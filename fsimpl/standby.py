"""Standby pools (FIG. 15A-15D): the replication endpoint, its peer protocol and the roles.

Two pools share a pre-shared key (nbdkit's PSK file format). Every connection starts with a
mutual challenge-response: each side proves it holds the key by a MAC over both nonces, and both
derive a session key from it. Every message after that carries a MAC under the session key and
a sequence number, and streamed records are MAC'd with it too, so an unauthenticated, replayed
or tampered connection is refused before it changes anything.

Roles live in the superblock: `none` (a primary without a peer), `primary` (live writable, feeds
the peer) and `standby` (live read-only, fed by streams). The primary drives replication:
  attach   snapshot, find the newest snapshot both pools hold (by GUID), send the change since
           it (everything when none), and make the peer the standby;
  sync     snapshot N+1, send N -> N+1; older replication snapshots go on both sides once a
           newer common one exists (the common one is held on both sides);
  failback final snapshot, send it, become the standby and make the peer primary (FIG. 15D).
The standby's side:
  promote  when the primary is lost: live goes back to the last complete snapshot and the pool
           becomes primary (refused while the old primary still answers as primary);
  demote   on a returning old primary: live goes back to the last snapshot the peer holds
           (optionally saving what it discards as a stream file) and it becomes a standby.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import (
    DittoError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Refused,
    ServerUnavailable,
    StreamError,
)
from .layout import (
    ROLE_NAMES,
    ROLE_PRIMARY,
    ROLE_STANDBY,
)

if TYPE_CHECKING:
    from .engine import Engine

_FRAME = struct.Struct("<IQ")  # payload length, sequence
_MAX_FRAME = 1 << 20
_TIMEOUT = 30.0


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join(parts), hashlib.sha256).digest()


class PeerConnection:
    """An authenticated connection: JSON messages and raw stream bytes, both under MAC."""

    def __init__(self, sock: socket.socket, key: bytes, identity: str, server: bool) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb", buffering=0)
        self.key = key
        self.identity = identity
        self.server = server
        self.session = b""
        self.sent = 0
        self.received = 0

    # the handshake: nonces both ways, a MAC from each side over both, a session key from both
    def handshake(self) -> None:
        mine = os.urandom(32)
        try:
            if self.server:
                theirs = self._raw_read(32)
                self._raw_write(mine + _mac(self.key, b"server", theirs, mine))
                proof = self._raw_read(32)
                if not hmac.compare_digest(proof, _mac(self.key, b"client", mine, theirs)):
                    raise PermissionDenied("the peer does not hold the replication key")
                client_nonce, server_nonce = theirs, mine
            else:
                self._raw_write(mine)
                reply = self._raw_read(64)
                theirs, proof = reply[:32], reply[32:]
                if not hmac.compare_digest(proof, _mac(self.key, b"server", mine, theirs)):
                    raise PermissionDenied(
                        "the peer does not hold the replication key (or is not a dittofs "
                        "replication endpoint)"
                    )
                self._raw_write(_mac(self.key, b"client", theirs, mine))
                client_nonce, server_nonce = mine, theirs
        except EOFError:
            raise PermissionDenied(
                "the peer closed the connection during authentication (wrong key?)"
            ) from None
        self.session = _mac(self.key, b"session", client_nonce, server_nonce)

    def _raw_write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)  # a timed-out socket's write() may send only part
        except OSError as e:
            raise ServerUnavailable(f"lost the peer: {e.strerror or e}") from None

    def _raw_read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            try:
                chunk = self.file.read(n - len(out))
            except OSError as e:
                raise ServerUnavailable(f"lost the peer: {e.strerror or e}") from None
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def send(self, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        head = _FRAME.pack(len(payload), self.sent)
        direction = b"s" if self.server else b"c"
        self._raw_write(head + payload + _mac(self.session, direction, head, payload))
        self.sent += 1

    def recv(self) -> dict[str, Any]:
        try:
            head = self._raw_read(_FRAME.size)
        except EOFError:
            raise ServerUnavailable("the peer closed the connection") from None
        length, seq = _FRAME.unpack(head)
        if length > _MAX_FRAME or seq != self.received:
            raise StreamError("a message from the peer is out of sequence or too large")
        payload = self._raw_read(length)
        mac = self._raw_read(32)
        direction = b"c" if self.server else b"s"
        if not hmac.compare_digest(mac, _mac(self.session, direction, head, payload)):
            raise StreamError("a message from the peer failed its MAC (tampered connection)")
        self.received += 1
        data: dict[str, Any] = json.loads(payload)
        return data

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.send({"op": op, **args})
        reply = self.recv()
        if not reply.get("ok"):
            raise DittoError(f"the peer refused '{op}': {reply.get('error', '?')}")
        return reply

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"'{address}' is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def connect_peer(address: str, identity: str, key: bytes) -> PeerConnection:
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=_TIMEOUT)
    except OSError as e:
        raise ServerUnavailable(f"cannot reach the peer at {address}: {e.strerror or e}") from None
    conn = PeerConnection(sock, key, identity, server=False)
    conn.handshake()
    return conn


# --- the endpoint (runs on either pool) ------------------------------------------------------


class ReplicationEndpoint:
    """Accepts authenticated peers and serves status, receive, prune and role changes."""

    def __init__(
        self,
        engine: Engine,
        listen: str,
        identity: str,
        key: bytes,
        log: Callable[[str], None] = lambda m: None,
    ) -> None:
        self.engine = engine
        self.identity = identity
        self.key = key
        self.log = log
        host, port = parse_address(listen)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, name="dittofs-standby", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def serve_forever(self) -> None:
        self._accept()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                s, addr = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                continue
            s.settimeout(_TIMEOUT * 4)
            threading.Thread(target=self._serve, args=(s, addr), daemon=True).start()

    def _serve(self, s: socket.socket, addr: Any) -> None:
        conn = PeerConnection(s, self.key, self.identity, server=True)
        try:
            conn.handshake()
            while True:
                try:
                    req = conn.recv()
                except ServerUnavailable:
                    return
                try:
                    result = self._handle(conn, req)
                    conn.send({"ok": True, **result})
                except DittoError as e:
                    conn.send({"ok": False, "error": str(e), "code": e.code})
        except (DittoError, OSError, ValueError) as e:
            self.log(f"standby: connection from {addr[0]} refused or lost: {e}")
        finally:
            conn.close()

    def _handle(self, conn: PeerConnection, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        engine = self.engine
        if op == "status":
            return engine.roles.status()
        if op == "receive":
            if engine.resume_token() is not None:
                # a transfer from our primary broke off earlier; each sync sends a new
                # snapshot, so the leftover cannot be resumed: start again from the base
                engine.abort_receive()
            result = engine.receive(_StreamSource(conn), conn.session, bool(req.get("force")))
            with engine.lock:
                rec = engine.snapshot_by_guid(bytes.fromhex(result["guid"]))
                engine.roles.hold_for_replication(rec.name)
                engine.roles.set_last_common(rec.guid)
            return {"received": result}
        if op == "retire":  # older replication snapshots: the peer holds a newer common one
            keep = bytes.fromhex(str(req["keep"]))
            return {"deleted": engine.roles.retire_older(keep)}
        if op == "set_role":
            role = {v: k for k, v in ROLE_NAMES.items()}.get(str(req.get("role")), -1)
            if role < 0:
                raise InvalidArgument(f"unknown role {req.get('role')!r}")
            engine.roles.set_role(role, str(req.get("peer", "")))
            return {"role": ROLE_NAMES[role]}
        raise InvalidArgument(f"unknown standby operation {op!r}")


class _StreamSource:
    """Raw stream bytes straight off the authenticated socket (records carry their own MAC)."""

    def __init__(self, conn: PeerConnection) -> None:
        self.conn = conn

    def read(self, n: int) -> bytes:
        try:
            return self.conn.file.read(n) or b""
        except OSError:
            return b""  # a lost connection ends the stream early: the receive keeps progress


class _StreamSink:
    def __init__(self, conn: PeerConnection) -> None:
        self.conn = conn

    def write(self, data: bytes) -> None:
        self.conn._raw_write(data)

    def flush(self) -> None:
        pass


# --- status ------------------------------------------------------------------------------------


def status_with_lag(
    engine: Engine, identity: str | None = None, key: bytes | None = None
) -> dict[str, Any]:
    """The pool's standby status plus how far live has moved since the last common snapshot.
    With the key, a primary also asks its peer, and learns so if the peer has been promoted
    meanwhile."""
    if key and identity:
        _learn_superseded(engine, identity, key)
    st = engine.roles.status()
    st["lag_bytes"] = None
    st["lag_seconds"] = None
    if st["last_common"]:
        st["lag_bytes"] = sum(n for _, n in engine.diff_blocks(st["last_common"], None))
        st["lag_seconds"] = round(time.time() - st["last_common_created_ns"] / 1e9, 1)
    st["endpoint"] = engine.endpoint.address if engine.endpoint else None
    return st


def _learn_superseded(engine: Engine, identity: str, key: bytes) -> None:
    state = engine.roles.state()
    if state.role != ROLE_PRIMARY or state.superseded or not state.peer:
        return
    try:
        conn = connect_peer(state.peer, identity, key)
    except (ServerUnavailable, OSError):
        return  # unreachable: nothing learned
    try:
        peer = conn.call("status")
    finally:
        conn.close()
    if peer["role"] == "primary" and not peer["superseded"]:
        engine.roles.set_role(ROLE_PRIMARY, state.peer, superseded=True)


def _newest_common(engine: Engine, peer_status: dict[str, Any]) -> str | None:
    return engine.roles.newest_common({s["guid"] for s in peer_status["snapshots"]})


def _push(
    engine: Engine, conn: PeerConnection, base: str | None, to: str, force: bool
) -> dict[str, Any]:
    conn.send({"op": "receive", "force": force})
    try:
        engine.send(base, to, _StreamSink(conn), conn.session)
    except StreamError:
        pass  # the peer stopped reading: its reply says why
    reply = conn.recv()
    if not reply.get("ok"):
        raise StreamError(f"the peer refused the stream: {reply.get('error')}")
    return reply


def attach(
    engine: Engine, address: str, identity: str, key: bytes, me: str, force: bool = False
) -> dict[str, Any]:
    """FIG. 15A: make the peer at address our standby and bring it up to date."""
    state = engine.roles.state()
    if state.role == ROLE_STANDBY or state.superseded:
        raise Refused(
            "this pool is a standby (or was superseded): it cannot feed a peer; "
            "'snapctl standby promote' or 'demote' first"
        )
    conn = connect_peer(address, identity, key)
    try:
        peer = conn.call("status")
        if peer["pool_guid"] == state.pool_guid.hex():
            raise Refused("the peer is this very pool")
        if peer["role"] == "primary" and not peer["superseded"]:
            raise Refused(
                f"the peer at {address} is a primary itself; demote it first "
                "('snapctl standby demote' there)"
            )
        base = _newest_common(engine, peer)
        if base is None and peer["live_has_data"] and not force:
            raise Refused(
                f"the peer at {address} holds data of its own and shares no "
                "snapshot with this pool; add --force to overwrite it"
            )
        to = engine.roles.new_replication_snapshot()
        reply = _push(engine, conn, base, to, force or base is None)
        conn.call("set_role", role="standby", peer=me)
        engine.roles.set_role(ROLE_PRIMARY, address)
        guid = engine.snapshot(to).guid
        engine.roles.set_last_common(guid)
        conn.call("retire", keep=guid.hex())
        engine.roles.retire_older(guid)
        return {"snapshot": to, "base": base, "peer": address, "received": reply["received"]}
    finally:
        conn.close()


def sync(engine: Engine, identity: str, key: bytes) -> dict[str, Any]:
    """One round of FIG. 15A's steady state: snapshot N+1, send N -> N+1, retire older."""
    state = engine.roles.state()
    if state.role != ROLE_PRIMARY or not state.peer:
        raise Refused("this pool has no standby: 'snapctl standby attach HOST:PORT' first")
    if state.superseded:
        raise Refused("this pool was superseded by its peer: 'snapctl standby demote'")
    address = state.peer
    conn = connect_peer(address, identity, key)
    try:
        peer = conn.call("status")
        if peer["role"] == "primary" and not peer["superseded"]:
            engine.roles.set_role(ROLE_PRIMARY, address, superseded=True)
            raise Refused(
                f"the peer at {address} has become primary: this pool was "
                "superseded; 'snapctl standby demote' to rejoin as its standby"
            )
        return _send_change(engine, conn, peer)
    finally:
        conn.close()


def promote(engine: Engine, identity: str, key: bytes, force: bool = False) -> dict[str, Any]:
    """FIG. 15B: the primary is lost; this standby restores its last complete snapshot and
    becomes primary."""
    state = engine.roles.state()
    if state.is_live_primary:
        raise Refused("this pool is already the primary")
    address = state.peer
    if address and not force:
        try:
            conn = connect_peer(address, identity, key)
        except PermissionDenied:
            raise Refused(
                f"the peer at {address} answers but does not accept this key: it may still "
                "be a live primary; check the key, or use --force if it is really gone"
            ) from None
        except (ServerUnavailable, OSError):
            conn = None
        if conn is not None:
            try:
                peer = conn.call("status")
            finally:
                conn.close()
            if peer["role"] == "primary" and not peer["superseded"]:
                raise Refused(
                    f"the primary at {address} still answers: promoting now would "
                    "make two primaries; use 'standby failback' there, or --force"
                )
    if engine.resume_token() is not None:
        engine.abort_receive()
    last = _newest_snapshot(engine)
    engine.roles.change_role_restoring(ROLE_PRIMARY, last)  # one transaction
    return {"role": "primary", "restored": last, "peer": address}


def demote(
    engine: Engine,
    identity: str,
    key: bytes,
    save_diverged: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """FIG. 15C: an old primary rejoins as standby: live goes back to the last snapshot its
    peer acknowledged; the change it discards can be saved first (save_diverged(base, tip))."""
    state = engine.roles.state()
    try:
        base = engine.snapshot_by_guid(state.last_common_guid).name
    except NotFound:
        raise Refused(
            "this pool knows no snapshot in common with its peer; it cannot rejoin "
            "without a full resync ('standby attach --force' from the primary)"
        ) from None
    diverged = engine.diff_blocks(base, None)
    discarded = sum(n for _, n in diverged)
    newer = [r.name for r in engine.list_snapshots() if r.id > engine.snapshot(base).id]
    saved = None
    if save_diverged is not None and (discarded or newer):
        tip = time.strftime("diverged-%Y%m%d-%H%M%S", time.gmtime())
        engine.create_snapshot(tip)
        save_diverged(base, tip)
        saved = tip
        newer.append(tip)
    # one transaction: the holds off the newer snapshots, the rollback begun, the role
    engine.roles.change_role_restoring(ROLE_STANDBY, base, newer_too=True)
    return {
        "role": "standby",
        "restored": base,
        "discarded_bytes": discarded,
        "destroyed": newer,
        "saved": saved,
    }


def failback(
    engine: Engine, identity: str, key: bytes, me: str, force: bool = False
) -> dict[str, Any]:
    """FIG. 15D: hand the primary role back: final snapshot, send it, swap roles."""
    address = engine.roles.begin_handover(force)  # live is read-only from here on
    try:
        result = sync_as(engine, identity, key, address)
        conn = connect_peer(address, identity, key)
        try:
            conn.call("set_role", role="primary", peer=me)
        finally:
            conn.close()
    except BaseException:
        engine.roles.end_handover(handed=False)  # the handover failed: stay primary
        raise
    engine.roles.end_handover(handed=True)
    return {"role": "standby", "final": result["snapshot"], "peer": address}


def sync_as(engine: Engine, identity: str, key: bytes, address: str) -> dict[str, Any]:
    """A sync that does not depend on our role (failback's last send)."""
    conn = connect_peer(address, identity, key)
    try:
        return _send_change(engine, conn, conn.call("status"))
    finally:
        conn.close()


def _send_change(engine: Engine, conn: PeerConnection, peer: dict[str, Any]) -> dict[str, Any]:
    """One sync step: a new replication snapshot, the change since the newest snapshot both
    pools share sent to the peer, which becomes the common one; older ones retired on both."""
    base = _newest_common(engine, peer)
    if base is None:
        raise Refused(
            "the peer shares no snapshot with this pool any more: 'snapctl standby attach' again"
        )
    to = engine.roles.new_replication_snapshot()
    t0 = time.monotonic()
    reply = _push(engine, conn, base, to, False)
    guid = engine.snapshot(to).guid
    engine.roles.set_last_common(guid)
    conn.call("retire", keep=guid.hex())
    engine.roles.retire_older(guid)
    return {
        "snapshot": to,
        "base": base,
        "seconds": round(time.monotonic() - t0, 3),
        "received": reply["received"],
    }


def _newest_snapshot(engine: Engine) -> str | None:
    snaps = engine.list_snapshots()
    return snaps[-1].name if snaps else None
