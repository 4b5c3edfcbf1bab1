"""An nbdkit plugin script for tests: plugin/plugin.py, unchanged, over a device that also logs
every write, sync, discard and truncate it performs to the file named by $DITTOFS_RECORD.

    DITTOFS_RECORD=/tmp/io.log nbdkit python tests/recording_plugin.py disk=pool.img ...

The device is support.iolog's RecordingDevice, the one crashsim.py replays in-process, here
inside a real nbdkit: the log, replayed onto the image as it was before the server started,
rebuilds the disk as a power cut would have left it at any point (test_t8_powercut_nbdkit.py).
Each operation is appended after it completed (a sync only once it returned), so a client that
has its acknowledgement knows the log already holds everything that led to it: the log's size
then is a position in it.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_ROOT, os.path.join(_ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from support.iolog import RecordingDevice  # noqa: E402

from fsimpl import opening as _opening  # noqa: E402

RecordingDevice.log_path = os.environ["DITTOFS_RECORD"]
_opening.Device = RecordingDevice  # type: ignore[misc]  # what Engine.open opens disks with

# Run the real plugin in this module's namespace, so nbdkit finds its callbacks here.
__file__ = os.path.join(_ROOT, "plugin", "plugin.py")
with open(__file__) as _f:
    exec(compile(_f.read(), __file__, "exec"))
