"""Pre-shared keys in nbdkit's PSK file format (`identity:hexkey` lines), so one file serves
both TLS for the exports and the authentication of replication peers."""

from __future__ import annotations

from .errors import InvalidArgument, NotFound


def read_psk(path: str) -> tuple[str, bytes]:
    """(identity, key) from the first entry of a PSK file."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        raise NotFound(f"key file {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read key file {path}: {e.strerror}") from None
    if not lines:
        raise InvalidArgument(f"key file {path} is empty: it needs a line 'identity:hexkey'")
    identity, sep, hexkey = lines[0].partition(":")
    try:
        key = bytes.fromhex(hexkey)
    except ValueError:
        key = b""
    if not sep or not identity or len(key) < 16:
        raise InvalidArgument(
            f"key file {path}: expected 'identity:hexkey' with at least 128 bits of key "
            '(e.g. made with: echo "dittofs:$(head -c 32 /dev/urandom | xxd -p -c 64)")'
        )
    return identity, key
