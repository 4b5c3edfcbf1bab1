"""The management operations, each declared once: name, arguments, handler, result, one doc line.

`OPERATIONS` is the registry the control server and snapctl's direct mode dispatch through
(`dispatch`), and the source of the operations table in docs/control-protocol.md
(scripts/gen_docs.py; a test fails when the two differ). A new operation is one `@operation`
declaration here and, for snapctl, one click command.

Arguments are checked against their declarations before the handler runs, so a handler sees
only well-typed values with defaults filled in, and a bad argument is one `invalid_argument`
error naming it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from . import standby
from .core import Progress
from .errors import InvalidArgument, ProtocolError
from .names import DEFAULT_VOLUME
from .protocol import PROTOCOL_VERSION
from .snapshot_ops import DEFAULT_HOLD_TAG, SnapshotInfo

if TYPE_CHECKING:
    from .engine import Engine


class Kind(Enum):
    """How an argument is checked (and what the document says it is)."""

    TEXT = "string"
    NAMES = "list"
    FLAG = "bool"
    COUNT = "count >= 0"
    SIZE = "bytes > 0"
    BYTES = "bytes"
    HEX = "hex"


@dataclass(frozen=True)
class Arg:
    name: str
    kind: Kind = Kind.TEXT
    required: bool = False
    default: Any = None
    doc: str = ""


class FdUse(Enum):
    NONE = ""
    REQUIRED = "required"
    OPTIONAL = "optional"


@dataclass
class Call:
    """One request, checked: what a handler receives."""

    engine: Engine
    args: dict[str, Any]
    progress: Progress | None
    fd: int | None


@dataclass(frozen=True)
class Operation:
    name: str
    run: Callable[[Call], Any]
    doc: str
    args: tuple[Arg, ...]
    result: str
    progress: bool
    fd: FdUse


OPERATIONS: dict[str, Operation] = {}


def operation(
    name: str,
    doc: str,
    *,
    result: str,
    args: Sequence[Arg] = (),
    progress: bool = False,
    fd: FdUse = FdUse.NONE,
) -> Callable[[Callable[[Call], Any]], Callable[[Call], Any]]:
    """Declare an operation; the decorated function is its handler."""

    def register(run: Callable[[Call], Any]) -> Callable[[Call], Any]:
        assert name not in OPERATIONS, f"operation {name} declared twice"
        OPERATIONS[name] = Operation(name, run, doc, tuple(args), result, progress, fd)
        return run

    return register


def dispatch(
    engine: Engine,
    op: str,
    args: dict[str, Any],
    progress: Progress | None,
    fd: int | None = None,
) -> Any:
    """Run one management operation; raises DittoError on failure. fd: a file descriptor the
    caller passed along, for the streaming operations (send writes to it, receive reads it)."""
    spec = OPERATIONS.get(op)
    if spec is None:
        raise ProtocolError(f"unknown operation {_shown(op)}")
    checked = {a.name: _check(a, args.get(a.name)) for a in spec.args}
    if spec.fd is FdUse.REQUIRED and fd is None:
        raise ProtocolError(f"'{op}' needs a file descriptor passed with the request")
    return spec.run(Call(engine, checked, progress if spec.progress else None, fd))


def _check(arg: Arg, value: Any) -> Any:
    if value is None:
        if arg.required:
            raise InvalidArgument(f"argument '{arg.name}' must be {_expected(arg)}")
        return arg.default
    kind = arg.kind
    number = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        Kind.TEXT: isinstance(value, str),
        Kind.NAMES: isinstance(value, list) and all(isinstance(v, str) for v in value),
        Kind.FLAG: isinstance(value, bool),
        Kind.COUNT: number and value >= 0,
        Kind.SIZE: number and value > 0,
        Kind.BYTES: number,
        Kind.HEX: isinstance(value, str) and _is_hex(value),
    }[kind]
    if not ok:
        raise InvalidArgument(f"argument '{arg.name}' must be {_expected(arg)}")
    return bytes.fromhex(value) if kind is Kind.HEX else value


def _expected(arg: Arg) -> str:
    return {
        Kind.TEXT: "a string",
        Kind.NAMES: f"a list of {arg.doc or 'names'}",
        Kind.FLAG: "true or false",
        Kind.COUNT: "a count >= 0",
        Kind.SIZE: "a size in bytes > 0",
        Kind.BYTES: "a byte count",
        Kind.HEX: "a hex string",
    }[arg.kind]


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def _shown(text: str) -> str:
    """A client-supplied string, bounded and escaped for an error message."""
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    # not dataclasses.asdict: its deep copy took two thirds of listing 10,000 snapshots, and
    # these fields are flat (the two lists are the info's own)
    d = dict(vars(info))
    d["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_ns / 1e9))
    return d


def required(name: str, kind: Kind = Kind.TEXT, doc: str = "") -> Arg:
    return Arg(name, kind, True, doc=doc)


def optional(name: str, kind: Kind = Kind.TEXT, default: Any = None, doc: str = "") -> Arg:
    if default is None:
        default = {Kind.FLAG: False, Kind.COUNT: 0}.get(kind)
    return Arg(name, kind, False, default, doc)


VOLUME = optional("volume", default=DEFAULT_VOLUME, doc="default `live`")
SNAPSHOT_FIELDS = (
    "`{name, id, guid, created (ISO 8601 UTC), created_ns, volumes, used_bytes, "
    "referenced_bytes, written_bytes, holds}`"
)
VOLUME_FIELDS = (
    "`{name, size_bytes, allocated_bytes, snapshots, origin, clones, flattening, connections}`"
)


# --- the pool --------------------------------------------------------------------------------


@operation("hello", "who is serving", result='`{"protocol": 1, "pid": N}`')
def _hello(c: Call) -> Any:
    return {"protocol": PROTOCOL_VERSION, "pid": os.getpid()}


@operation(
    "info",
    "the pool",
    result="`disk`, `format_version`, `pool_guid`, `block_size`, `capacity_bytes`, `growable`, "
    "`used_bytes`, `free_bytes`, `deferred_free_bytes` (freed, reusable after the deferral "
    "window of two commits), `host_allocated_bytes`, `generation`, `volumes` (`{name, "
    "size_bytes, allocated_bytes, unmerged_blocks, snapshots, connections}`: unmerged_blocks "
    "are partial writes whose merge idle time will do), `snapshot_count`, "
    "`newest_snapshot`, `pending_deletes`, `role`, `peer`, `last_common`, `superseded`, `cow`, "
    "`snapshot_min_free`, `server_pid`, `errors` (`{read, write, checksum, failed_commits, "
    "healed}` since the pool was opened), `metadata_copies`, `read_only_reason` (null, or why a "
    "degraded pool is served read-only), `time`",
)
def _info(c: Call) -> Any:
    return c.engine.info()


@operation(
    "tune",
    "pool settings: the free space below which new snapshots are refused",
    args=[optional("snapshot_min_free", Kind.BYTES)],
    result="`{snapshot_min_free, free_bytes}`",
)
def _tune(c: Call) -> Any:
    return c.engine.tune(c.args["snapshot_min_free"])


@operation(
    "commit",
    "make everything written so far durable (a supervisor stopping the server)",
    result="`{generation}`",
)
def _commit(c: Call) -> Any:
    return {"generation": c.engine.commit_now()}


@operation(
    "check",
    "commit, then check the committed state (fsimpl/checker.py); repair needs the server "
    "stopped (`snapctl check --repair`)",
    result='`{"clean", "fatal" (count), "healable" (count: bad copies with a good twin), '
    '"healed" (bad copies healed since the server opened the pool), "defects": [{"kind", '
    '"fatal", "where", "message", "healable"}], "stats"}`',
)
def _check_pool(c: Call) -> Any:
    return c.engine.check_committed()


SCRUB_STATUS = (
    "`{state (never run|running|stopped|finished), pass (metadata|data), rate, started_ns, "
    "ended_ns, bytes, healed, errors, checksums, found: [what, ...]}`"
)


@operation(
    "scrub",
    "verify both copies of every metadata block (a bad copy is rewritten from its good twin "
    "by the commit that ends the pass), then read every data block of live and every "
    "snapshot, verifying it on a pool with checksums",
    result="`{metadata_blocks, metadata_healed, metadata_lost: [{tree, address, error}], "
    "blocks, bytes, checksums, bad: [{map, block, address, error}]}`",
    progress=True,
)
def _scrub(c: Call) -> Any:
    return c.engine.scrub(c.progress)


@operation(
    "scrub_start",
    "start a background scrub (or resume a stopped one): both copies of every metadata block, "
    "then every data block, in bounded steps of the server's ticker",
    args=[optional("rate", Kind.BYTES, 0, "bytes per second; 0: as fast as it can")],
    result=SCRUB_STATUS,
)
def _scrub_start(c: Call) -> Any:
    return c.engine.scrub_start(c.args["rate"])


@operation("scrub_stop", "stop the running scrub (scrub_start resumes it)", result=SCRUB_STATUS)
def _scrub_stop(c: Call) -> Any:
    return c.engine.scrub_stop()


@operation("scrub_status", "where the scrub is and what it found", result=SCRUB_STATUS)
def _scrub_status(c: Call) -> Any:
    return c.engine.scrub_status()


@operation(
    "exports",
    "every export with its description, as `nbdinfo --list` shows them",
    result='`[{"name", "description"}]`',
)
def _exports(c: Call) -> Any:
    return [{"name": n, "description": d} for n, d in c.engine.export_names()]


# --- snapshots -------------------------------------------------------------------------------


@operation("list", "the active snapshots, oldest first", result=f"`[snapshot]`: {SNAPSHOT_FIELDS}")
def _list(c: Call) -> Any:
    return [snapshot_json(s) for s in c.engine.list_snapshots()]


@operation("names", "the active snapshots' names (shell completion)", result="`[name]`")
def _names(c: Call) -> Any:
    return c.engine.snapshot_names()


@operation(
    "create",
    "a new snapshot of the volumes (all of them by default: one point in time for all)",
    args=[
        required("name"),
        optional("volumes", Kind.NAMES, doc="volume names"),
        optional("writable", Kind.FLAG),
    ],
    result="the new snapshot, as in `list`",
)
def _create(c: Call) -> Any:
    a = c.args
    return snapshot_json(c.engine.create_snapshot(a["name"], a["volumes"], a["writable"]))


@operation(
    "delete",
    "delete snapshots, all or none",
    args=[
        optional("name", doc="one snapshot"),
        optional("names", Kind.NAMES, doc="snapshot names"),
        optional("dry_run", Kind.FLAG),
        optional("if_exists", Kind.FLAG),
    ],
    result='`{"results": [{"name", "missing", "deleted", "freed_bytes"}], "freed_bytes"}`',
    progress=True,
)
def _delete(c: Call) -> Any:
    a = c.args
    names = a["names"]
    if names is None:
        if a["name"] is None:
            raise InvalidArgument("argument 'name' must be a string")
        names = [a["name"]]
    results = c.engine.delete_snapshots(names, c.progress, a["dry_run"], a["if_exists"])
    return {"results": results, "freed_bytes": sum(r["freed_bytes"] for r in results)}


@operation("rename", "rename a snapshot", args=[required("old"), required("new")], result="`{}`")
def _rename(c: Call) -> Any:
    c.engine.rename_snapshot(c.args["old"], c.args["new"])
    return {}


@operation(
    "hold",
    "protect a snapshot from delete, prune and rollback --destroy-newer",
    args=[required("name"), optional("tag", default=DEFAULT_HOLD_TAG, doc="default `hold`")],
    result='`{"holds": [...]}`',
)
def _hold(c: Call) -> Any:
    return {"holds": c.engine.hold(c.args["name"], c.args["tag"])}


@operation(
    "release",
    "remove a hold",
    args=[required("name"), optional("tag", default=DEFAULT_HOLD_TAG, doc="default `hold`")],
    result='`{"holds": [...]}`',
)
def _release(c: Call) -> Any:
    return {"holds": c.engine.release(c.args["name"], c.args["tag"])}


@operation(
    "rollback",
    "make a volume read what a snapshot held",
    args=[
        required("name"),
        VOLUME,
        optional("destroy_newer", Kind.FLAG),
        optional("force", Kind.FLAG),
    ],
    result='`{"destroyed": [...]}`',
    progress=True,
)
def _rollback(c: Call) -> Any:
    a = c.args
    destroyed = c.engine.rollback(
        a["name"], a["volume"], a["destroy_newer"], a["force"], c.progress
    )
    return {"destroyed": destroyed}


@operation(
    "diff",
    "the byte ranges that may differ between two snapshots (or a snapshot and live)",
    args=[required("from"), optional("to", doc="default: live"), VOLUME],
    result='`{"ranges": [[offset, length], ...], "changed_bytes": N}`',
)
def _diff(c: Call) -> Any:
    a = c.args
    ranges = c.engine.diff_blocks(a["from"], a["to"], a["volume"])
    return {"ranges": ranges, "changed_bytes": sum(n for _, n in ranges)}


@operation(
    "du",
    "space per snapshot and live; with a range, what deleting it would free",
    args=[optional("from"), optional("to"), VOLUME],
    result='`{"volume", "snapshots": [{"name", "used_bytes", "owned_bytes"}], "live_bytes", '
    '"snapshots_bytes", "range"?}`',
)
def _du(c: Call) -> Any:
    a = c.args
    return c.engine.space(a["from"], a["to"], a["volume"])


@operation(
    "prune",
    "apply a retention policy (held snapshots stay)",
    args=[
        optional("keep_last", Kind.COUNT),
        optional("keep_hourly", Kind.COUNT),
        optional("keep_daily", Kind.COUNT),
        optional("prefix", default=""),
        optional("dry_run", Kind.FLAG),
    ],
    result='`[{"name", "keep", "reasons", "freed_bytes"}]`',
)
def _prune(c: Call) -> Any:
    a = c.args
    return c.engine.prune(
        a["keep_last"], a["keep_hourly"], a["keep_daily"], a["prefix"], a["dry_run"]
    )


@operation(
    "set",
    "a snapshot's property: writable",
    args=[required("name"), required("writable", Kind.FLAG)],
    result="`{}`",
)
def _set(c: Call) -> Any:
    c.engine.set_writable(c.args["name"], c.args["writable"])
    return {}


# --- volumes and clones ----------------------------------------------------------------------


@operation(
    "volume_create",
    "a new, empty volume",
    args=[required("name"), required("size", Kind.SIZE)],
    result=f"the volume: {VOLUME_FIELDS}",
)
def _volume_create(c: Call) -> Any:
    return c.engine.create_volume(c.args["name"], c.args["size"])


@operation("volume_list", "every volume", result="`[volume]`")
def _volume_list(c: Call) -> Any:
    return c.engine.list_volumes()


@operation(
    "volume_resize",
    "grow a volume, or shrink it past space it does not use (force)",
    args=[required("name"), required("size", Kind.SIZE), optional("force", Kind.FLAG)],
    result="the volume",
)
def _volume_resize(c: Call) -> Any:
    a = c.args
    return c.engine.resize_volume(a["name"], a["size"], a["force"])


@operation(
    "volume_delete",
    "delete a volume (recursive: with its snapshots and clones)",
    args=[required("name"), optional("recursive", Kind.FLAG)],
    result='`{"deleted": [...]}`',
    progress=True,
)
def _volume_delete(c: Call) -> Any:
    a = c.args
    return {"deleted": c.engine.delete_volume(a["name"], a["recursive"], c.progress)}


@operation(
    "clone",
    "a new volume reading a snapshot until written (O(1))",
    args=[required("source", doc="`VOL@SNAP`"), required("name")],
    result="the new volume",
)
def _clone(c: Call) -> Any:
    return c.engine.clone(c.args["source"], c.args["name"])


@operation(
    "flatten",
    "copy what a clone still reads from its origin, so it stands alone",
    args=[required("name")],
    result="the volume",
    progress=True,
)
def _flatten(c: Call) -> Any:
    return c.engine.flatten(c.args["name"], c.progress)


@operation(
    "promote",
    "make a clone independent of its origin (as flatten)",
    args=[required("name")],
    result="the volume",
    progress=True,
)
def _promote(c: Call) -> Any:
    return c.engine.promote(c.args["name"], c.progress)


# --- replication streams ---------------------------------------------------------------------


@operation(
    "send_size",
    "what a send would write (`send -n`)",
    args=[optional("from"), required("to")],
    result="`{records, data_bytes, hole_blocks, stream_bytes}`",
)
def _send_size(c: Call) -> Any:
    return c.engine.stream_size(c.args["from"], c.args["to"])


@operation(
    "send",
    "write the stream from one snapshot to another (full without `from`) to the passed fd",
    args=[
        optional("from"),
        optional("to", default=""),
        optional("resume", doc="a resume token"),
        optional("key", Kind.HEX, doc="MAC key"),
    ],
    result="`{records, blocks}`",
    progress=True,
    fd=FdUse.REQUIRED,
)
def _send(c: Call) -> Any:
    a = c.args
    assert c.fd is not None
    with os.fdopen(os.dup(c.fd), "wb") as sink:
        return c.engine.send(a["from"], a["to"], sink, a["key"], a["resume"], c.progress)


@operation(
    "receive",
    "apply the stream read from the passed fd",
    args=[optional("force", Kind.FLAG), optional("key", Kind.HEX, doc="MAC key")],
    result="`{name, guid, volumes}`",
    progress=True,
    fd=FdUse.REQUIRED,
)
def _receive(c: Call) -> Any:
    assert c.fd is not None
    with os.fdopen(os.dup(c.fd), "rb") as source:
        return c.engine.receive(source, c.args["key"], c.args["force"], c.progress)


@operation(
    "resume_token",
    "the token to resume a receive that stopped",
    result="`{token}` (null: none in progress)",
)
def _resume_token(c: Call) -> Any:
    return {"token": c.engine.resume_token()}


@operation("receive_abort", "discard a partial receive", result="`{discarded}`")
def _receive_abort(c: Call) -> Any:
    return c.engine.abort_receive()


# --- standby ---------------------------------------------------------------------------------

IDENTITY = required("identity", doc="PSK identity")
KEY = required("key", Kind.HEX, doc="the pre-shared key")
ME = optional("me", doc="this pool's endpoint, as the peer reaches it")


def _me(c: Call) -> str:
    endpoint = c.engine.endpoint
    return str(c.args["me"] or (endpoint.address if endpoint else ""))


@operation(
    "standby_status",
    "role, peer, snapshots with GUIDs, last common snapshot, lag (with the key: asks the peer)",
    args=[optional("identity"), optional("key", Kind.HEX)],
    result="`{pool_guid, role, peer, superseded, snapshots, last_common, last_common_guid, "
    "last_common_created_ns, live_has_data, lag_bytes, lag_seconds, endpoint}`",
)
def _standby_status(c: Call) -> Any:
    return standby.status_with_lag(c.engine, c.args["identity"], c.args["key"])


@operation(
    "standby_serve",
    "start the replication endpoint inside the server",
    args=[required("listen", doc="HOST:PORT"), IDENTITY, KEY],
    result="`{listen}`",
)
def _standby_serve(c: Call) -> Any:
    engine = c.engine
    if engine.endpoint is None:
        engine.endpoint = standby.ReplicationEndpoint(
            engine, c.args["listen"], c.args["identity"], c.args["key"]
        )
        engine.endpoint.start()
    return {"listen": engine.endpoint.address}


@operation(
    "standby_attach",
    "make the peer this pool's standby and bring it up to date (FIG. 15A)",
    args=[required("address"), IDENTITY, KEY, ME, optional("force", Kind.FLAG)],
    result="`{snapshot, base, peer, received}`",
)
def _standby_attach(c: Call) -> Any:
    a = c.args
    return standby.attach(c.engine, a["address"], a["identity"], a["key"], _me(c), a["force"])


@operation(
    "standby_sync",
    "one round: snapshot, send the change, retire older replication snapshots",
    args=[IDENTITY, KEY],
    result="`{snapshot, base, seconds, received}`",
)
def _standby_sync(c: Call) -> Any:
    return standby.sync(c.engine, c.args["identity"], c.args["key"])


@operation(
    "standby_promote",
    "the primary is lost: restore the last complete snapshot, become primary (FIG. 15B)",
    args=[IDENTITY, KEY, optional("force", Kind.FLAG)],
    result="`{role, restored, peer}`",
)
def _standby_promote(c: Call) -> Any:
    a = c.args
    return standby.promote(c.engine, a["identity"], a["key"], a["force"])


@operation(
    "standby_failback",
    "hand the primary role back: final snapshot, send it, swap roles (FIG. 15D)",
    args=[IDENTITY, KEY, ME, optional("force", Kind.FLAG)],
    result="`{role, final, peer}`",
)
def _standby_failback(c: Call) -> Any:
    a = c.args
    return standby.failback(c.engine, a["identity"], a["key"], _me(c), a["force"])


@operation(
    "standby_demote",
    "rejoin as standby: live goes back to the last common snapshot (FIG. 15C); with an fd, "
    "the discarded change is saved there as a stream",
    args=[IDENTITY, KEY],
    result="`{role, restored, discarded_bytes, destroyed, saved}`",
    fd=FdUse.OPTIONAL,
)
def _standby_demote(c: Call) -> Any:
    engine, fd = c.engine, c.fd
    if fd is None:
        return standby.demote(engine, c.args["identity"], c.args["key"])

    def save(base: str, tip: str) -> None:
        with os.fdopen(os.dup(fd), "wb") as sink:
            engine.send(base, tip, sink)

    return standby.demote(engine, c.args["identity"], c.args["key"], save)


# --- the document ----------------------------------------------------------------------------


def describe_operations() -> str:
    """The operations table of docs/control-protocol.md."""
    lines = ["| op | args | result | what it does |", "|---|---|---|---|"]
    for spec in OPERATIONS.values():
        args = []
        for a in spec.args:
            detail = [a.kind.value] if a.kind is not Kind.TEXT else []
            detail += [a.doc] if a.doc else []
            text = f"`{a.name}`" + (f" ({': '.join(detail)})" if detail else "")
            args.append(text if a.required else f"optional {text}")
        if spec.fd is FdUse.REQUIRED:
            args.append("**fd**")
        elif spec.fd is FdUse.OPTIONAL:
            args.append("optional **fd**")
        result = spec.result + ("; sends progress" if spec.progress else "")
        lines.append(f"| `{spec.name}` | {', '.join(args) or '–'} | {result} | {spec.doc} |")
    return "\n".join(lines) + "\n"
