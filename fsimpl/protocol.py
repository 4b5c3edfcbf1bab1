"""The control protocol's constants, shared by the server (control.py) and its clients.

Kept apart from the engine so that a client talking to a running server (snapctl's usual
mode) does not import the engine at all: that import was a fifth of a second of every command.
docs/control-protocol.md describes the messages.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20  # a request: what a client may make the server read
MAX_REPLY = 256 << 20  # a reply: `list` of 100,000 snapshots is some 40 MB
