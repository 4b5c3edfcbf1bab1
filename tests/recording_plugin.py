"""An nbdkit plugin script for tests: plugin/plugin.py, unchanged, over a device that also logs
every write, sync, discard and truncate it performs to the file named by $DITTOFS_RECORD.

    DITTOFS_RECORD=/tmp/io.log nbdkit python tests/recording_plugin.py disk=pool.img ...

It is the idea of tests/crashsim.py's RecordingDevice inside a real nbdkit: the log, replayed
onto the image as it was before the server started, rebuilds the disk as a power cut would have
left it at any point (test_t8_powercut_nbdkit.py). Each operation is appended after it completed
(a sync only once it returned), as one write(2) of a header and the data, so a client that has
its acknowledgement knows the log already holds everything that led to it: the log's size then
is a position in it.

Record: kind (1 write, 2 sync, 3 discard, 4 truncate), offset, length (u64 each), then for a
write `length` bytes of data. A kill -9 may leave the last record incomplete; readers drop it.
"""

from __future__ import annotations

import os
import struct
import sys
import threading

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from fsimpl import opening as _opening  # noqa: E402
from fsimpl.device import Device  # noqa: E402

RECORD = struct.Struct("<BQQ")
WRITE, SYNC, DISCARD, TRUNCATE = 1, 2, 3, 4


class LoggingDevice(Device):
    _log_fd = -1
    _log_lock = threading.Lock()

    def _log(self, kind: int, offset: int, length: int, data: bytes = b"") -> None:
        if LoggingDevice._log_fd < 0:
            path = os.environ["DITTOFS_RECORD"]
            LoggingDevice._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        rec = RECORD.pack(kind, offset, length) + data
        with LoggingDevice._log_lock:
            done = 0
            while done < len(rec):
                done += os.write(LoggingDevice._log_fd, rec[done:])

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        super().pwrite(data, offset)
        if not getattr(self, "_in_pwritev", False):
            self._log(WRITE, offset, len(data), bytes(data))

    def pwritev(self, parts: list[memoryview], offset: int) -> None:
        self._in_pwritev = True  # a short pwritev finishes through pwrite: log it once
        try:
            super().pwritev(parts, offset)
        finally:
            self._in_pwritev = False
        data = b"".join(parts)
        self._log(WRITE, offset, len(data), data)

    def sync(self) -> None:
        super().sync()
        self._log(SYNC, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        super().discard(offset, length)
        if not self.readonly and length > 0:
            self._log(DISCARD, offset, length)

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self._log(TRUNCATE, 0, size)


_opening.Device = LoggingDevice  # type: ignore[misc]  # what Engine.open opens disks with

# Run the real plugin in this module's namespace, so nbdkit finds its callbacks here.
__file__ = os.path.join(_ROOT, "plugin", "plugin.py")
with open(__file__) as _f:
    exec(compile(_f.read(), __file__, "exec"))
