"""Files snapctl writes for the user (a stream with `send -o`, the diverged change with
`standby demote --save-diverged`): written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def output_file(path: str) -> Iterator[int]:
    """A descriptor to write path's new contents through. A regular file (or a new one) is
    written beside it and renamed over it only when the block succeeds: a command that fails,
    however late, leaves what was there, or nothing. Anything else (a FIFO, a device,
    /dev/stdout) is opened as it is."""
    target = os.path.realpath(path)
    try:
        regular = stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        regular = True
    if not regular:
        fd = os.open(target, os.O_WRONLY)
        try:
            yield fd
        finally:
            os.close(fd)
        return
    folder, name = os.path.split(target)
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    done = False
    try:
        yield fd
        done = True
    finally:
        os.close(fd)
        if done:
            os.replace(partial, target)
        else:
            os.unlink(partial)
