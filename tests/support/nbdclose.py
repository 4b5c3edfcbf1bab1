"""Closing an NBD client connection: the one helper every test uses.

A test often ends, or kills a server, with clients still connected. Shutting such a client down
can find its connection already dropped by the server (killed, stopped, reloaded): libnbd then
reports the handle dead or closed, or the socket broken. That is expected and ignored; any other
error is not, and fails the test.
"""

from __future__ import annotations

import errno

import nbd

_BROKEN = {"EPIPE", "ECONNRESET", "ENOTCONN", "ESHUTDOWN"}


def dropped(e: nbd.Error) -> bool:
    """Does e say only that the server had already dropped the connection?"""
    text = e.string or ""
    if "invalid state: DEAD" in text or "invalid state: CLOSED" in text:
        return True
    code = e.errno
    name = errno.errorcode.get(code, "") if isinstance(code, int) else str(code or "")
    return name in _BROKEN and "invalid state: START" not in text


def disconnect(h: nbd.NBD | None) -> None:
    """Shut h down politely; a connection the server already dropped just goes away."""
    if h is None:
        return
    try:
        h.shutdown()
    except nbd.Error as e:
        if not dropped(e):
            raise
