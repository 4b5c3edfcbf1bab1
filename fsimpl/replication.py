"""Replication streams: send the change between two snapshots; receive it on another pool.

A stream (record layouts in layout.py) is BEGIN (JSON: version, block size, from/to snapshot
GUIDs, the snapshot's name, the volumes with their sizes), then DATA and HOLE records per volume
in block order, then END (counts). It is computed from the shadow maps: an incremental stream
holds exactly the blocks that may differ between the two snapshots (invariant 4), at a cost
proportional to the change; a full stream walks the snapshot's view of every volume. Records are
numbered, checksummed and, with a key, MAC'd; the order is deterministic, so a receive that
stopped after record n resumes from n.

Receiving applies records to the target's live volumes (move-on-write keeps the base snapshot
intact), commits its progress with the data, and finally creates the snapshot with the sender's
name and GUID. Until then the volumes' exports read the base snapshot (OP_RECEIVE), so every
observer sees the target at its last complete snapshot; `abort` rolls live back to the base.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from . import snapshots as snapops
from .core import EngineCore, OperationModule, Progress
from .errors import InvalidArgument, NotFound, Refused, StreamError
from .layout import (
    KIND_ADDR,
    MAC_SIZE,
    OP_NONE,
    OP_RECEIVE,
    REC_BEGIN,
    REC_DATA,
    REC_END,
    REC_HOLE,
    RECF_MAC,
    SNAP_ACTIVE,
    SNAPF_REPLICATION,
    SNAPF_WRITABLE,
    STREAM_HEADER,
    STREAM_TRAILER,
    STREAM_VERSION,
    SnapshotRecord,
    check_record,
    pack_data_head,
    pack_hole,
    pack_record,
    unpack_data_head,
    unpack_hole,
    unpack_record_header,
)
from .snapshot_ops import SnapshotOps
from .volume import Volume


class ByteSink(Protocol):
    def write(self, data: bytes, /) -> Any: ...
    def flush(self) -> Any: ...


class ByteSource(Protocol):
    def read(self, n: int, /) -> bytes: ...


BLOCKS_PER_RECORD_BYTES = 1 << 20
COMMIT_EVERY = 64  # records between progress commits while receiving


@dataclass
class Piece:
    """One DATA or HOLE record to come: blocks [first, first + count) of volume index vol."""

    rtype: int
    vol: int
    first: int
    count: int


def make_token(to_guid: bytes, from_guid: bytes, records: int, name: str) -> str:
    raw = json.dumps(
        {"to": to_guid.hex(), "from": from_guid.hex(), "records": records, "name": name}
    ).encode()
    return base64.urlsafe_b64encode(raw).decode()


def parse_token(token: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.encode()))
        bytes.fromhex(data["to"])
        bytes.fromhex(data["from"])
        int(data["records"])
        return data
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(
            "not a resume token: take it from 'snapctl receive --resume-token'"
        ) from None


class ReplicationStreams(OperationModule):
    """Send and receive."""

    def __init__(self, core: EngineCore, snapshots: SnapshotOps) -> None:
        super().__init__(core)
        self.snapshots = snapshots  # abort_receive rolls the volumes back to their base

    # --- sending --------------------------------------------------------------------------------

    def _plan(
        self, base: SnapshotRecord | None, to: SnapshotRecord
    ) -> tuple[dict[str, Any], list[Piece]]:
        """The stream's BEGIN fields and its records, in order. Caller holds the lock."""
        if to.flags & SNAPF_WRITABLE:
            raise Refused(
                f"snapshot '{to.name}' is writable and could change while it is "
                f"sent; 'snapctl set {to.name} writable=off' first"
            )
        vols = sorted(self.pool.covering(to.id), key=lambda v: v.name)
        for vol in vols:  # a degraded pool: never a stream of what it cannot read exactly
            for rec in (to, base):
                if rec is not None:
                    self.core.require_readable(vol, rec)
        if base is not None:
            if base.id >= to.id:
                raise InvalidArgument(f"'{base.name}' must be older than '{to.name}'")
            missing = [v.name for v in vols if base.id not in v.shadows]
            if missing:
                raise Refused(
                    f"'{base.name}' does not cover {', '.join(missing)}: send "
                    "those volumes in full (without --from)"
                )
        bs = self.pool.block_size
        per = max(1, BLOCKS_PER_RECORD_BYTES // bs)
        pieces: list[Piece] = []
        for i, vol in enumerate(vols):
            size = vol.shadows[to.id].inode.size
            nblocks = (size + bs - 1) // bs
            if base is None:
                blocks = range(nblocks)
                kinds = self._kinds(vol, to.id, 0, nblocks)
            else:
                changed = [b for b in snapops.changed_blocks(vol, base.id, to.id) if b < nblocks]
                blocks = changed  # type: ignore[assignment]
                kinds = {}
                for first, count in snapops.block_runs(changed):
                    kinds.update(self._kinds(vol, to.id, first, count))
            run: Piece | None = None
            for b in blocks:
                rtype = REC_DATA if kinds[b] else REC_HOLE
                if (
                    run is not None
                    and run.rtype == rtype
                    and run.first + run.count == b
                    and (rtype == REC_HOLE or run.count < per)
                ):
                    run.count += 1
                    continue
                run = Piece(rtype, i, b, 1)
                pieces.append(run)
        begin = {
            "version": STREAM_VERSION,
            "block_size": bs,
            "from_guid": base.guid.hex() if base else "",
            "from_name": base.name if base else "",
            "to_guid": to.guid.hex(),
            "to_name": to.name,
            "created_ns": to.created_ns,
            "volumes": [{"name": v.name, "size": v.shadows[to.id].inode.size} for v in vols],
            "records": len(pieces) + 2,
            "replication": bool(to.flags & SNAPF_REPLICATION),
        }
        return begin, pieces

    def _kinds(self, vol: Volume, sid: int, first: int, count: int) -> dict[int, bool]:
        """block -> does snapshot sid's view hold data there."""
        out: dict[int, bool] = {}
        step = vol.live.capacity
        for start in range(first, first + count, step):
            n = min(step, first + count - start)
            for i, e in enumerate(vol.resolve_range(sid, start, n)):
                out[start + i] = e.kind == KIND_ADDR
        return out

    def stream_size(self, from_name: str | None, to_name: str) -> dict[str, int]:
        """What `send -n` prints: records, data bytes, hole blocks."""
        with self.lock:
            to = self.core.snapshot(to_name)
            base = self.core.snapshot(from_name) if from_name else None
            _, pieces = self._plan(base, to)
            bs = self.pool.block_size
            data = sum(p.count for p in pieces if p.rtype == REC_DATA)
            holes = sum(p.count for p in pieces if p.rtype == REC_HOLE)
            return {
                "records": len(pieces) + 2,
                "data_bytes": data * bs,
                "hole_blocks": holes,
                "stream_bytes": data * bs + (len(pieces) + 2) * 64 + 512,
            }

    def send(
        self,
        from_name: str | None,
        to_name: str,
        sink: ByteSink,
        mac_key: bytes | None = None,
        resume: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, int]:
        """Write the stream from_name -> to_name (full without from_name) to sink."""
        with self.lock:
            start = 0
            if resume:
                tok = parse_token(resume)
                to = self.core.snapshot_by_guid(bytes.fromhex(tok["to"]))
                base = (
                    self.core.snapshot_by_guid(bytes.fromhex(tok["from"])) if tok["from"] else None
                )
                start = int(tok["records"])
            else:
                to = self.core.snapshot(to_name)
                base = self.core.snapshot(from_name) if from_name else None
            begin, pieces = self._plan(base, to)
            begin["resume_from"] = start
            pinned = [to.id] + ([base.id] if base else [])
            for sid in pinned:
                self.core.pins[sid] = self.core.pins.get(sid, 0) + 1
        sent = 0
        try:
            sink.write(pack_record(REC_BEGIN, 0, json.dumps(begin).encode(), mac_key))
            for seq, piece in enumerate(pieces, start=1):
                if seq < start:
                    continue
                sink.write(self._piece_record(to, piece, seq, mac_key))
                sent += piece.count
                if progress:
                    progress(seq, len(pieces))
            end = {"records": len(pieces) + 2, "blocks": sum(p.count for p in pieces)}
            sink.write(pack_record(REC_END, len(pieces) + 1, json.dumps(end).encode(), mac_key))
            sink.flush()
        except OSError as e:
            raise StreamError(f"the stream's reader went away: {e.strerror or e}") from None
        finally:
            with self.lock:
                for sid in pinned:
                    self.core.pins[sid] -= 1
        return {"records": len(pieces) + 2 - start, "blocks": sent}

    def _piece_record(
        self, to: SnapshotRecord, piece: Piece, seq: int, mac_key: bytes | None
    ) -> bytes:
        with self.lock:
            if piece.rtype == REC_HOLE:
                return pack_record(
                    REC_HOLE, seq, pack_hole(piece.vol, piece.first, piece.count), mac_key
                )
            vol = sorted(self.pool.covering(to.id), key=lambda v: v.name)[piece.vol]
            bs = self.pool.block_size
            buf = bytearray(piece.count * bs)
            vol.read(self.pool.ctx, to.id, memoryview(buf), piece.first * bs)
            payload = pack_data_head(piece.vol, piece.first, piece.count) + bytes(buf)
        return pack_record(REC_DATA, seq, payload, mac_key)

    # --- receiving -------------------------------------------------------------------------------

    def resume_token(self) -> str | None:
        with self.lock:
            sb = self.pool.sb
            if sb.recv_to_guid == bytes(16):
                return None
            return make_token(sb.recv_to_guid, sb.recv_from_guid, sb.recv_records, sb.recv_name)

    def receive(
        self,
        source: ByteSource,
        mac_key: bytes | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Apply a stream from source; returns the snapshot it created."""
        reader = _Reader(source, mac_key)
        rtype, seq, payload = reader.next()
        if rtype != REC_BEGIN or seq != 0:
            raise StreamError("the stream does not start with its BEGIN record")
        try:
            begin = json.loads(payload)
        except ValueError:
            raise StreamError("the stream's BEGIN record is not valid") from None
        if begin.get("version") != STREAM_VERSION:
            raise StreamError(f"stream version {begin.get('version')} is not supported")
        with self.lock:
            vols = self._start_receive(begin, force)
        expected = int(begin.get("resume_from", 0)) or 1
        total = int(begin["records"])
        applied = 0
        try:
            while True:
                rtype, seq, payload = reader.next()
                if seq != expected:
                    raise StreamError(
                        f"record {seq} arrived where {expected} was due: the "
                        "stream is out of order or incomplete"
                    )
                if rtype == REC_END:
                    break
                with self.lock:
                    self._apply(vols, rtype, payload)
                    expected += 1
                    applied += 1
                    if applied % COMMIT_EVERY == 0:
                        self.pool.sb.recv_records = expected
                        self.core.commit()
                if progress:
                    progress(expected, total)
        except (StreamError, EOFError) as e:
            with self.lock:
                self.pool.sb.recv_records = expected
                self.pool.sb_dirty = True
                self.core.commit()
            why = "the stream ended early" if isinstance(e, EOFError) else str(e)
            raise StreamError(
                f"receive of '{begin['to_name']}' stopped at record {expected}: {why}; the "
                "target stays at its last complete snapshot. Resume with 'snapctl send "
                "--resume TOKEN' (TOKEN from 'snapctl receive --resume-token') or discard "
                "with 'snapctl receive --abort'"
            ) from None
        with self.lock:
            return self._finish_receive(begin, vols)

    def _start_receive(self, begin: dict[str, Any], force: bool) -> list[Volume]:
        pool = self.pool
        sb = pool.sb
        if begin["block_size"] != pool.block_size:
            raise StreamError(
                f"the stream has {begin['block_size']}-byte blocks, this pool "
                f"{pool.block_size}: receive into a pool of the same block size"
            )
        to_guid = bytes.fromhex(begin["to_guid"])
        from_guid = bytes.fromhex(begin["from_guid"]) if begin["from_guid"] else bytes(16)
        if any(r.guid == to_guid and r.state == SNAP_ACTIVE for r in pool.snapshots.values()):
            raise StreamError(
                f"this pool already has snapshot '{begin['to_name']}' "
                f"({begin['to_guid']}): nothing to receive"
            )
        resume_from = int(begin.get("resume_from", 0))
        in_progress = sb.recv_to_guid != bytes(16)
        if in_progress and (sb.recv_to_guid != to_guid or sb.recv_from_guid != from_guid):
            raise StreamError(
                f"another receive ('{sb.recv_name}') is in progress; finish it with 'snapctl "
                "send --resume' or discard it with 'snapctl receive --abort'"
            )
        if resume_from and (not in_progress or resume_from != sb.recv_records):
            raise StreamError(
                f"this stream resumes at record {resume_from}, but the pool "
                + (
                    f"stopped at record {sb.recv_records}"
                    if in_progress
                    else "has no receive to resume"
                )
                + ": ask for the right token"
            )
        base = None
        if from_guid != bytes(16):
            base = next(
                (
                    r
                    for r in pool.snapshots.values()
                    if r.guid == from_guid and r.state == SNAP_ACTIVE
                ),
                None,
            )
            if base is None:
                raise StreamError(
                    f"the stream's base snapshot '{begin['from_name']}' "
                    f"({begin['from_guid']}) is not in this pool"
                )
        found: list[Volume | None] = []
        for spec in begin["volumes"]:
            vol = next((v for v in pool.volumes.values() if v.name == spec["name"]), None)
            if base is not None:
                if vol is None or base.id not in vol.shadows:
                    raise StreamError(f"volume {spec['name']} is not in this pool's '{base.name}'")
                newest = [s for s in vol.chain if pool.snapshots[s].state == SNAP_ACTIVE]
                if newest[-1] != base.id:
                    raise StreamError(
                        f"the stream's base '{base.name}' is not the newest snapshot of "
                        f"{vol.name} here (that is '{pool.snapshots[newest[-1]].name}'); roll "
                        "back to it first, or send from the newest common snapshot"
                    )
            elif (
                vol is not None
                and not in_progress
                and (vol.chain or vol.inode.owned_blocks)
                and not force
            ):
                raise StreamError(
                    f"volume {vol.name} holds data or snapshots of its own: a full stream "
                    "would overwrite it; add --force"
                )
            found.append(vol)
        vols = [  # every check passed: only now create what is missing
            vol if vol is not None else pool.create_volume(spec["name"], spec["size"])
            for vol, spec in zip(found, begin["volumes"], strict=True)
        ]
        for vol, spec in zip(vols, begin["volumes"], strict=True):
            if vol.inode.op not in (OP_NONE, OP_RECEIVE):
                raise Refused(f"volume {vol.name} is busy (rollback, delete or flatten)")
            vol.inode.size = spec["size"]
            vol.inode.op = OP_RECEIVE
            vol.inode.op_target = base.id if base else 0
            pool.touch_inode(vol.inode)
        if not in_progress:
            sb.recv_to_guid, sb.recv_from_guid = to_guid, from_guid
            sb.recv_records, sb.recv_name = 1, begin["to_name"]
        pool.sb_dirty = True
        self.core.commit()
        return vols

    def _apply(self, vols: list[Volume], rtype: int, payload: bytes) -> None:
        bs = self.pool.block_size
        ctx = self.pool.ctx
        if rtype == REC_DATA:
            vi, first, count = unpack_data_head(payload)
            data = memoryview(payload)[16:]
            if vi >= len(vols) or len(data) != count * bs:
                raise StreamError("a DATA record does not fit the stream's volumes")
            vol = vols[vi]
            self.core.making_room(lambda: vol.write(ctx, data, first * bs, self.core.cow))
        elif rtype == REC_HOLE:
            vi, first, count = unpack_hole(payload)
            if vi >= len(vols):
                raise StreamError("a HOLE record names a volume the stream does not have")
            vols[vi].deallocate(ctx, first, count)
        else:
            raise StreamError(f"unexpected record type {rtype} inside the stream")
        self.core.keep_commit_room()

    def _finish_receive(self, begin: dict[str, Any], vols: list[Volume]) -> dict[str, Any]:
        pool = self.pool
        for vol in vols:
            vol.inode.op = OP_NONE
            vol.inode.op_target = 0
            pool.touch_inode(vol.inode)
        flags = SNAPF_REPLICATION if begin.get("replication") else 0
        rec = pool.create_snapshot(begin["to_name"], vols, flags, bytes.fromhex(begin["to_guid"]))
        rec.created_ns = int(begin["created_ns"])
        sb = pool.sb
        sb.recv_to_guid = sb.recv_from_guid = bytes(16)
        sb.recv_records, sb.recv_name = 0, ""
        pool.sb_dirty = True
        self.core.commit()
        return {"name": rec.name, "guid": rec.guid.hex(), "volumes": [v.name for v in vols]}

    def abort_receive(self) -> dict[str, Any]:
        """Discard a partial receive: every volume it touched reads its base again."""
        with self.lock:
            sb = self.pool.sb
            if sb.recv_to_guid == bytes(16):
                raise NotFound("no receive is in progress")
            name = sb.recv_name
            vols = [v for v in self.pool.volumes.values() if v.inode.op == OP_RECEIVE]
            plans = []
            for vol in vols:
                base = vol.inode.op_target
                vol.inode.op = OP_NONE
                vol.inode.op_target = 0
                self.pool.touch_inode(vol.inode)
                plans.append((vol, base))
            sb.recv_to_guid = sb.recv_from_guid = bytes(16)
            sb.recv_records, sb.recv_name = 0, ""
            self.pool.sb_dirty = True
            self.core.commit()
        for vol, base in plans:
            if base:
                self.snapshots.rollback(self.pool.snapshots[base].name, vol.name, force=True)
            else:
                with self.lock:
                    vol.deallocate(
                        self.pool.ctx,
                        0,
                        (vol.inode.size + self.pool.block_size - 1) // self.pool.block_size,
                    )
                    self.core.commit()
        return {"discarded": name}


class _Reader:
    """Records from a byte stream, checked (CRC, MAC when keyed, framing)."""

    def __init__(self, source: ByteSource, mac_key: bytes | None) -> None:
        self.source = source
        self.mac_key = mac_key
        self.started = time.monotonic()

    def _exact(self, n: int) -> bytes:
        parts = []
        while n:
            chunk = self.source.read(n)
            if not chunk:
                raise EOFError
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def next(self) -> tuple[int, int, bytes]:
        head = self._exact(STREAM_HEADER.size)
        try:
            rtype, flags, length, seq = unpack_record_header(head)
        except ValueError as e:
            raise StreamError(str(e)) from None
        payload = self._exact(length)
        trailer = self._exact(STREAM_TRAILER.size)
        mac = b""
        if flags & RECF_MAC:
            mac = self._exact(MAC_SIZE)
        elif self.mac_key is not None:
            raise StreamError("the stream is not authenticated but a key was given")
        if flags & RECF_MAC and self.mac_key is None:
            raise StreamError("the stream is authenticated: give --key-file to verify it")
        try:
            check_record(head, payload, trailer, mac, self.mac_key)
        except ValueError as e:
            raise StreamError(str(e)) from None
        return rtype, seq, payload
