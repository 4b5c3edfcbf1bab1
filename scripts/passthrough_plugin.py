"""The Python ceiling: an nbdkit Python plugin that only preads and pwrites an image file.

    nbdkit python scripts/passthrough_plugin.py file=IMAGE [threads=parallel|serialize]

The benchmark serves the same image through it and through dittofs, so the ratio shows what
dittofs's engine costs on top of nbdkit's Python plugin itself.
"""

import os

import nbdkit

API_VERSION = 2
_cfg = {"threads": "parallel"}
_fd = -1


def config(key, value):
    if key not in ("file", "threads"):
        raise RuntimeError(f"unknown parameter {key}")
    _cfg[key] = value


def config_complete():
    if "file" not in _cfg:
        raise RuntimeError("file=IMAGE is required")


def thread_model():
    if _cfg["threads"] == "serialize":
        return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    global _fd
    _fd = os.open(_cfg["file"], os.O_RDWR)


def open(readonly):
    return 1


def get_size(h):
    return os.fstat(_fd).st_size


def can_flush(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    view = memoryview(buf)
    got = 0
    while got < len(view):
        n = os.preadv(_fd, [view[got:]], offset + got)
        if n == 0:
            view[got:] = bytes(len(view) - got)
            return
        got += n


def pwrite(h, buf, offset, flags):
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwrite(_fd, view[done:], offset + done)


def flush(h, flags):
    os.fsync(_fd)
