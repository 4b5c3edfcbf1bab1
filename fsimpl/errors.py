"""The engine's one exception hierarchy.

Every error the engine raises is a `DittoError`. Each subclass carries three translations, so the
edges never guess: `code` (a stable string for the control protocol), `exit_code` (snapctl's exit
status) and `errno` (what the nbdkit plugin hands to `nbdkit.set_error`). Messages say what went
wrong and what to do about it. `nbd_only` marks the errors only requests on exports raise: NBD
clients see their errno, never their code (docs/control-protocol.md lists them apart). The
first line of each class's docstring is its row in that document.
"""

from __future__ import annotations

import errno as _errno

# snapctl exit codes (docs/control-protocol.md)
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4


class DittoError(Exception):
    """Any other failure."""

    code = "failed"
    exit_code = EXIT_FAILED
    errno = _errno.EIO
    nbd_only = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- raised when opening a disk --------------------------------------------------------------


class NotAPool(DittoError):
    """The disk holds no dittofs pool (or something else entirely)."""

    code = "not_a_pool"
    exit_code = EXIT_NOT_FOUND
    errno = _errno.EINVAL


class UnsupportedFormat(DittoError):
    """The pool was written by a newer or unknown format version."""

    code = "unsupported_format"


class MissingDependency(DittoError):
    """The pool needs a package this machine lacks (the message names it)."""

    code = "missing_dependency"


class PoolTruncated(DittoError):
    """The disk is smaller than the pool recorded on it."""

    code = "truncated"


class CorruptMetadata(DittoError):
    """A metadata block failed its checksum, type or self-address check."""

    code = "corrupt"

    def __init__(self, message: str, address: int = -1, block_type: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.block_type = block_type


class CorruptData(DittoError):
    """A data block failed its checksum (pools formatted with data checksums)."""

    code = "corrupt_data"


class ReadOnlyDisk(DittoError):
    """The disk is a read-only device: the pool on it can be read and checked, not served or
    changed."""

    code = "read_only_disk"
    exit_code = EXIT_REFUSED
    errno = _errno.EROFS


class DamagedPool(DittoError):
    """Metadata that writing depends on (the free-space bitmap, the inode or snapshot table) is
    damaged beyond its copies: the pool is served read-only, what can be read exactly."""

    code = "damaged"
    exit_code = EXIT_REFUSED
    errno = _errno.EROFS


class PoolBusy(DittoError):
    """Another process holds the pool open."""

    code = "busy"
    exit_code = EXIT_REFUSED
    errno = _errno.EBUSY


# --- raised by requests on exports -----------------------------------------------------------


class NoSpace(DittoError):
    """The pool (or the file system under an image) is full."""

    code = "no_space"
    errno = _errno.ENOSPC


class ReadOnlyExport(DittoError):
    """A write reached a read-only export (a snapshot, or live during a rollback)."""

    code = "read_only"
    exit_code = EXIT_REFUSED
    errno = _errno.EPERM
    nbd_only = True


class ExportGone(DittoError):
    """The snapshot or volume behind an open connection was deleted or rolled back."""

    code = "gone"
    errno = _errno.EIO
    nbd_only = True


class OutOfRange(DittoError):
    """A request reaches past the end of the export."""

    code = "out_of_range"
    errno = _errno.EINVAL
    nbd_only = True


# --- raised by management operations ---------------------------------------------------------


class InvalidName(DittoError):
    """A snapshot, volume or export name breaks the naming rules."""

    code = "invalid_name"
    exit_code = EXIT_USAGE
    errno = _errno.EINVAL


class InvalidArgument(DittoError):
    """An argument is out of range or contradicts the pool."""

    code = "invalid_argument"
    exit_code = EXIT_USAGE
    errno = _errno.EINVAL


class NotFound(DittoError):
    """A named snapshot, volume or export does not exist."""

    code = "not_found"
    exit_code = EXIT_NOT_FOUND
    errno = _errno.ENOENT


class NameTaken(DittoError):
    """A snapshot or volume of that name already exists."""

    code = "exists"
    exit_code = EXIT_REFUSED
    errno = _errno.EEXIST


class Refused(DittoError):
    """The operation would break a rule the user set (holds, newer snapshots, busy exports)."""

    code = "refused"
    exit_code = EXIT_REFUSED
    errno = _errno.EBUSY


# --- raised at the control plane -------------------------------------------------------------


class ProtocolError(DittoError):
    """A control-socket message was malformed, too large or of an unknown version."""

    code = "protocol"
    exit_code = EXIT_FAILED
    errno = _errno.EPROTO


class ServerUnavailable(DittoError):
    """The pool's server could not be reached."""

    code = "unavailable"
    exit_code = EXIT_FAILED


class PermissionDenied(DittoError):
    """The caller may not manage this pool."""

    code = "permission"
    exit_code = EXIT_REFUSED
    errno = _errno.EACCES


class StreamError(DittoError):
    """A replication stream was refused: wrong base, truncated, corrupted, out of order or
    unauthenticated."""

    code = "stream"


ERRORS_BY_CODE: dict[str, type[DittoError]] = {
    cls.code: cls
    for cls in (
        DittoError,
        NotAPool,
        UnsupportedFormat,
        MissingDependency,
        PoolTruncated,
        CorruptMetadata,
        CorruptData,
        ReadOnlyDisk,
        DamagedPool,
        PoolBusy,
        NoSpace,
        ReadOnlyExport,
        ExportGone,
        OutOfRange,
        InvalidName,
        InvalidArgument,
        NotFound,
        NameTaken,
        Refused,
        ProtocolError,
        ServerUnavailable,
        PermissionDenied,
        StreamError,
    )
}


def describe_errors() -> str:
    """The error tables of docs/control-protocol.md: codes that cross the control socket (with
    snapctl's exit status), then those only NBD clients see (as an errno)."""
    import errno as errnos

    def when(cls: type[DittoError]) -> str:
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    control = ["| code | exit | when |", "|---|---:|---|"]
    nbd = ["| code | errno | when |", "|---|---|---|"]
    for code, cls in ERRORS_BY_CODE.items():
        if cls.nbd_only:
            nbd.append(f"| `{code}` | {errnos.errorcode[cls.errno]} | {when(cls)} |")
        else:
            control.append(f"| `{code}` | {cls.exit_code} | {when(cls)} |")
    return (
        "### Error codes and exit codes\n\n"
        + "\n".join(control)
        + "\n\n### Errors only NBD clients see\n\n"
        "Requests on exports fail with an errno (nbdkit sends it to the client); these never "
        "cross the control socket.\n\n" + "\n".join(nbd) + "\n"
    )
