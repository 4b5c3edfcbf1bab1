"""dittofs as an nbdkit Python plugin: translate nbdkit callbacks into engine calls.

    nbdkit python plugin/plugin.py disk=PATH [size=SIZE] [control=SOCKET] [cow=move|copy]
                                   [merge=deferred|immediate] [block-size=SIZE] [cache=SIZE]
                                   [threads=parallel|serialize] [nbd=ENDPOINT] [checksum=on]

Exports: `live` (default, read-write), `live@NAME` (read-only snapshot), `live@latest` (the newest
snapshot when the client connects). Engine errors become errno values for the client (EPERM for
writes to read-only exports, ENOSPC for a full pool, EIO otherwise) and one line in nbdkit's log
naming the export, the offset and the error; an engine error at start (a bad parameter, a disk
that is no pool or cannot be opened) is one line ending in its code, `[not_a_pool]`, and nbdkit
exits non-zero. Only a bug, an exception that is not an engine error, prints a traceback.
Nothing here decides anything: the engine does.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
import traceback
from typing import Any

import nbdkit

# nbdkit embeds /usr/bin/python3: make the repository and its .venv importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
for _site in glob.glob(os.path.join(_ROOT, ".venv", "lib", "python3*", "site-packages")):
    sys.path.append(_site)

from fsimpl import rundir  # noqa: E402
from fsimpl.control import ControlServer  # noqa: E402
from fsimpl.engine import Engine, Export  # noqa: E402
from fsimpl.errors import DittoError, InvalidArgument  # noqa: E402
from fsimpl.layout import DEFAULT_BLOCK_SIZE, DEFAULT_METADATA_COPIES  # noqa: E402
from fsimpl.txn import DEFAULT_CACHE_BYTES  # noqa: E402
from fsimpl.units import parse_size  # noqa: E402

API_VERSION = 2

_config: dict[str, str] = {}
_KEYS = (
    "disk",
    "size",
    "control",
    "cow",
    "merge",
    "block-size",
    "cache",
    "threads",
    "nbd",
    "checksum",
    "metadata-copies",
    "rewind",
)
_engine: Engine | None = None
_control: ControlServer | None = None
_stop = threading.Event()
_ticker: threading.Thread | None = None


def _log(msg: str) -> None:
    print(f"nbdkit: dittofs: {msg}", file=sys.stderr, flush=True)


class _EngineLog(logging.Handler):
    """The engine's warnings and errors, in nbdkit's log as `nbdkit: dittofs: LEVEL: ...`."""

    def emit(self, record: logging.LogRecord) -> None:
        _log(f"{record.levelname.lower()}: {record.getMessage()}")


_engine_log = logging.getLogger("dittofs")
_engine_log.addHandler(_EngineLog(logging.WARNING))
_engine_log.propagate = False


class _Reported(Exception):
    """An engine error said in one line: nbdkit logs its message, not a traceback."""


_format_exception = traceback.format_exception


def _format_reported(exc: Any, /, *args: Any, **kw: Any) -> list[str]:
    # nbdkit's Python plugin logs a failed callback as traceback.format_exception(type, value,
    # tb) joined; for an engine error that is one line, the error itself.
    value = args[0] if args else exc
    if isinstance(value, _Reported):
        return [str(value)]
    return _format_exception(exc, *args, **kw)


traceback.format_exception = _format_reported


def _fail(e: DittoError, where: str) -> None:
    """Report an engine error from a request: errno for the client, one line for the log."""
    nbdkit.set_error(e.errno)
    message = str(e)
    head = where.split(",")[0] + ": "  # "export NAME: ", which the engine may have said already
    raise _Reported(where + ": " + message.removeprefix(head)) from None


def _refuse(e: DittoError) -> None:
    """Report an engine error at start: one line with its code, and nbdkit exits non-zero."""
    raise _Reported(f"{e} [{e.code}]") from None


def config(key: str, value: str) -> None:
    if key == "faults":  # tests only: a device that fails reads, writes or syncs on demand
        if os.environ.get("DITTOFS_TEST_FAULTS") != "1":
            _refuse(
                InvalidArgument(
                    "faults= is a test-only parameter (it makes the disk fail on purpose); it "
                    "is refused unless the test environment sets DITTOFS_TEST_FAULTS=1"
                )
            )
        _config[key] = value
        return
    if key not in _KEYS:
        _refuse(
            InvalidArgument(
                f"unknown parameter '{key}'; dittofs takes {', '.join(k + '=' for k in _KEYS)}"
            )
        )
    _config[key] = value


def config_complete() -> None:
    if "disk" not in _config:
        _refuse(InvalidArgument("disk=PATH is required (an image file or a block device)"))


def _copies() -> int:
    value = _config.get("metadata-copies", str(DEFAULT_METADATA_COPIES))
    if value not in ("1", "2"):
        raise InvalidArgument(f"metadata-copies={value}: use 1 or 2")
    return int(value)


def _rewind() -> int | None:
    value = _config.get("rewind")
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise InvalidArgument(
            f"rewind={value}: give a generation number ('snapctl rewind --list' shows them)"
        )
    return int(value)


def _size(key: str, default: str) -> int:
    # fsimpl's parser, not nbdkit.parse_size: that one logs its own error line first
    return parse_size(_config.get(key, default), f"{key}=")


def thread_model() -> int:
    # Measured (docs/bench-2026-11-25-threads.txt; rerun with scripts/bench.py --threads
    # parallel, then serialize): with the GIL, parallel request
    # threads only contend for it; serialized requests ran 4K random I/O about 2x faster for
    # dittofs and for a bare pass-through plugin alike. The engine has its own lock either way
    # (the control and ticker threads run beside the requests), so both models are correct.
    if _config.get("threads", "serialize") == "parallel":
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def get_ready() -> None:
    """Open (or create) the pool before nbdkit forks, so a bad disk fails the command itself."""
    global _engine
    if "faults" in _config:
        sys.path.insert(0, os.path.join(_ROOT, "tests"))
        from support.faults import FileArmedFaultyDevice

        from fsimpl import opening

        FileArmedFaultyDevice.spec_path = _config["faults"]
        opening.Device = FileArmedFaultyDevice  # type: ignore[misc]
    try:
        _engine = Engine.open(
            _config["disk"],
            cow=_config.get("cow", "move"),
            merge=_config.get("merge", "deferred"),
            create_size=_size("size", "0") if "size" in _config else None,
            block_size=_size("block-size", str(DEFAULT_BLOCK_SIZE)),
            cache_bytes=_size("cache", str(DEFAULT_CACHE_BYTES)),
            claim=False,
            serve=True,
            checksums=_config.get("checksum", "off") in ("on", "yes", "1", "true"),
            metadata_copies=_copies(),
            rewind=_rewind(),
        )
    except DittoError as e:
        _refuse(e)


def after_fork() -> None:
    """In the serving process: claim the pool, start the control socket and the ticker."""
    global _control, _ticker
    assert _engine is not None
    disk = _config["disk"]
    path = _config.get("control") or rundir.default_control_path(disk)
    try:
        _engine.claim(os.getpid())
        _control = ControlServer(_engine, path, _log)
    except DittoError as e:
        _refuse(e)
    except OSError as e:
        _refuse(DittoError(f"cannot make the control socket {path}: {e.strerror}"))
    assert _control is not None
    _control.start()
    state = {"pid": os.getpid(), "disk": os.path.realpath(disk), "control": os.path.abspath(path)}
    if "nbd" in _config:  # where clients reach the exports (informational: snapctl serve sets it)
        state["nbd"] = _config["nbd"]
    rundir.write_state(disk, state)
    _ticker = threading.Thread(target=_tick_loop, name="dittofs-ticker", daemon=True)
    _ticker.start()


def _tick_loop() -> None:
    """Periodic commits and background reclaim, in bounded steps."""
    while not _stop.is_set():
        try:
            more = _engine.tick() if _engine else False
        except Exception as e:  # noqa: BLE001 - the ticker must outlive any one failure
            _log(f"error: background work failed: {e}")
            more = False
        _stop.wait(0.001 if more else 1.0)


def cleanup() -> None:
    _stop.set()
    if _ticker is not None:
        _ticker.join(timeout=5)
    if _control is not None:
        _control.stop()
    if _engine is not None:
        _engine.close()
        rundir.remove_state(_config["disk"], os.getpid())


# --- exports ---------------------------------------------------------------------------------


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    assert _engine is not None
    try:
        return _engine.export_names()
    except DittoError as e:
        _fail(e, "list of exports")
        raise


def default_export(readonly: bool, is_tls: bool) -> str:
    return "live"


def open(readonly: bool) -> Export:  # noqa: A001 - nbdkit's callback name
    assert _engine is not None
    name = nbdkit.export_name()
    try:
        return _engine.open_export(name, readonly, client=True)
    except DittoError as e:
        _fail(e, f"export '{name}'")
        raise


def close(h: Export) -> None:
    if _engine is not None:
        _engine.close_export(h)


def export_description(h: Export) -> str:
    return h.description


def get_size(h: Export) -> int:
    return h.size


def can_write(h: Export) -> bool:
    return not h.readonly


def can_flush(h: Export) -> bool:
    return True


def can_fua(h: Export) -> int:
    return nbdkit.FUA_NATIVE


def can_trim(h: Export) -> bool:
    return not h.readonly


def can_zero(h: Export) -> bool:
    return True


def can_fast_zero(h: Export) -> bool:
    return True


def can_extents(h: Export) -> bool:
    return True


def can_multi_conn(h: Export) -> bool:
    # One engine serves every connection and FLUSH commits all of it.
    return True


def can_cache(h: Export) -> int:
    return nbdkit.CACHE_NONE


def is_rotational(h: Export) -> bool:
    return False


# --- requests --------------------------------------------------------------------------------


def _where(h: Export, what: str, offset: int, length: int) -> str:
    return f"export {h.name}, {what} at offset {offset}, length {length}"


def pread(h: Export, buf: bytearray, offset: int, flags: int) -> None:
    try:
        _engine.read(h, memoryview(buf), offset)  # type: ignore[union-attr]
    except DittoError as e:
        _fail(e, _where(h, "read", offset, len(buf)))


def pwrite(h: Export, buf: bytes, offset: int, flags: int) -> None:
    try:
        _engine.write(h, memoryview(buf), offset, bool(flags & nbdkit.FLAG_FUA))  # type: ignore[union-attr]
    except DittoError as e:
        _fail(e, _where(h, "write", offset, len(buf)))


def flush(h: Export, flags: int) -> None:
    try:
        _engine.flush(h)  # type: ignore[union-attr]
    except DittoError as e:
        _fail(e, f"export {h.name}, flush")


def trim(h: Export, count: int, offset: int, flags: int) -> None:
    try:
        _engine.trim(h, offset, count, bool(flags & nbdkit.FLAG_FUA))  # type: ignore[union-attr]
    except DittoError as e:
        _fail(e, _where(h, "trim", offset, count))


def zero(h: Export, count: int, offset: int, flags: int) -> None:
    try:
        _engine.zero(  # type: ignore[union-attr]
            h,
            offset,
            count,
            fua=bool(flags & nbdkit.FLAG_FUA),
            may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
        )
    except DittoError as e:
        _fail(e, _where(h, "zero", offset, count))


def extents(h: Export, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        runs = _engine.extents(h, offset, count)  # type: ignore[union-attr]
    except DittoError as e:
        _fail(e, _where(h, "extents", offset, count))
        raise
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(o, n, hole if is_hole else 0) for o, n, is_hole in runs]
