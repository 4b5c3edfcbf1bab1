"""snapctl attach / detach: an export as a kernel block device, optionally mounted, and undone
exactly.

    snapctl -d DISK attach [EXPORT] [--mount DIR] [--read-only]      (EXPORT defaults to live)
    snapctl -d DISK detach EXPORT|DIR|DEVICE
    snapctl attach --list [--json]

The NBD endpoint comes from the server's run state (the `nbd` field `snapctl serve` records), or
from --socket. Where the kernel has its NBD driver loaded (/dev/nbdN and /sys/module/nbd) the
export is connected with `nbd-client`; elsewhere `nbdfuse` (started in a session of its own, so
it outlives snapctl) shows it as a file that `losetup` turns into a loop device. Snapshots are
always read-only and mounted `ro,noload` (ext2/3/4) or `ro,norecovery,nouuid` (xfs), by the
type blkid finds.

Every resource is recorded in RUNDIR/attachments.json (written atomically, under a lock) as soon
as it exists, before the next one is made, so `detach` (or a failed attach cleaning up after
itself) undoes exactly what was made, in reverse: umount (and rmdir a mount point it made),
`losetup -d` of the loop devices backed by our nbdfuse file, `fusermount3 -u` and waiting for
that nbdfuse to exit (killed only if it will not, and only if it is still ours), or
`nbd-client -d`. A step that fails leaves the record of what remains, so detach can be retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click
from click.shell_completion import CompletionItem

from fsimpl import rundir
from fsimpl.errors import (
    DittoError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Refused,
    ServerUnavailable,
)

from .app import Context, complete_snapshot, main, run
from .render import Renderer, human_size
from .serve import Endpoint, psk_user

STATE_NAME = "attachments.json"
TIMEOUT = 30.0
# Where each tool comes from on Debian, for the message when one is missing.
PACKAGES = {
    "nbdfuse": "libnbd-bin",
    "nbdinfo": "libnbd-bin",
    "fusermount3": "fuse3",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "blkid": "util-linux",
    "nbd-client": "nbd-client",
}
EXT_TYPES = ("ext2", "ext3", "ext4")


# --- tools ---------------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise DittoError(f"{name} is not installed: apt-get install {PACKAGES.get(name, name)}")
    return path


def sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool and return what it did (never raises for a nonzero exit)."""
    try:
        return subprocess.run(
            [tool(args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(args), 124, "", f"timed out after {timeout}s")


def said(cp: subprocess.CompletedProcess[str]) -> str:
    text = (cp.stderr or cp.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit status {cp.returncode}"


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


# --- what the kernel has -------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, type) of every mount, from /proc/mounts."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                out.append((_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return out


def mounted_at(path: str) -> str | None:
    """The source mounted on path (the topmost), or None."""
    real = os.path.realpath(path)
    found = None
    for src, mp, _ in mounts():
        if mp == real:
            found = src
    return found


def loops_backed_by(path: str) -> list[str]:
    """The loop devices whose backing file is path (from sysfs, like `losetup -j`)."""
    out = []
    for d in Path("/sys/block").glob("loop*"):
        try:
            if (d / "loop" / "backing_file").read_text().strip() == path:
                out.append(f"/dev/{d.name}")
        except OSError:
            continue
    return sorted(out)


def nbd_devices() -> list[str]:
    return sorted(
        (f"/dev/{d.name}" for d in Path("/sys/block").glob("nbd*") if d.name[3:].isdigit()),
        key=lambda p: int(p[8:]),
    )


def nbd_connected(dev: str) -> bool:
    sysdir = Path("/sys/block") / Path(dev).name
    try:
        return (sysdir / "pid").exists() or (sysdir / "size").read_text().strip() != "0"
    except OSError:
        return False


def nbd_pid(dev: str) -> int | None:
    try:
        return int((Path("/sys/block") / Path(dev).name / "pid").read_text())
    except (OSError, ValueError):
        return None


def kernel_nbd_ready() -> bool:
    return bool(nbd_devices()) and Path("/sys/module/nbd").is_dir()


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_our_nbdfuse(pid: int, fuse_dir: str) -> bool:
    args = cmdline(pid)
    return bool(args) and os.path.basename(args[0]) == "nbdfuse" and fuse_dir in args


# --- the record of what is attached ------------------------------------------------------------


def state_path() -> str:
    return os.path.join(rundir.rundir(), STATE_NAME)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold RUNDIR/attachments.lock: one attach or detach at a time changes the record."""
    fd = os.open(state_path() + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load() -> list[dict[str, Any]]:
    try:
        with open(state_path()) as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise DittoError(f"cannot read {state_path()}: {e}") from None
    entries: list[dict[str, Any]] = data.get("attachments", [])
    return entries


def save(entries: list[dict[str, Any]]) -> None:
    """Replace the record atomically (write, fsync, rename, fsync the directory)."""
    path = state_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "attachments": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def entry_state(e: dict[str, Any]) -> str:
    """attached | incomplete (an attach was interrupted) | broken (a part of it is gone)."""
    if not e.get("complete"):
        return "incomplete"
    dev = e.get("device")
    if e.get("method") == "nbdfuse":
        ok = bool(dev) and dev in loops_backed_by(e.get("nbd_file") or "")
        ok = ok and bool(e.get("nbdfuse_pid")) and rundir.pid_alive(int(e["nbdfuse_pid"]))
    else:
        ok = isinstance(dev, str) and bool(dev) and nbd_connected(dev)
    if e.get("mountpoint"):
        ok = ok and mounted_at(e["mountpoint"]) == dev
    return "attached" if ok else "broken"


# --- attach --------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt, so a half-done attach is still undone."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def resolve_endpoint(disk: str | None, sock: str | None) -> Endpoint:
    if sock:
        return Endpoint(unix=os.path.abspath(sock))
    if not disk:
        raise NotFound("no pool given: use -d DISK (or set DITTOFS_DISK), or --socket PATH")
    state = rundir.read_state(disk)
    if not state:
        raise NotFound(
            f"no server is running for {disk}: start one with 'snapctl serve {disk} "
            "--background', or give --socket PATH"
        )
    if not state.get("nbd"):
        raise InvalidArgument(
            f"the server for {disk} (pid {state.get('pid')}) was not started by 'snapctl "
            "serve', so its NBD socket is unknown: give --socket PATH"
        )
    return Endpoint.parse(str(state["nbd"]))


def probe_export(endpoint: Endpoint, export: str) -> dict[str, Any]:
    """nbdinfo's facts about the export (size, read-only); a missing export is NotFound."""
    cp = sh("nbdinfo", "--json", "--no-content", endpoint.uri(export), timeout=60)
    if cp.returncode != 0:
        lines = [re.sub(r"^\S*nbdinfo: ", "", ln) for ln in cp.stderr.strip().splitlines()]
        if any("No such file or directory for export" in ln for ln in lines):
            raise NotFound(f"no export {export} on {endpoint} ('snapctl list' shows snapshots)")
        msg = lines[0] if lines else f"nbdinfo exit status {cp.returncode}"
        raise ServerUnavailable(f"cannot reach {export} on {endpoint}: {msg}")
    try:
        info: dict[str, Any] = json.loads(cp.stdout)["exports"][0]
    except (ValueError, KeyError, IndexError):
        raise DittoError(f"nbdinfo said something unexpected about {export}") from None
    return info


def choose_method(endpoint: Endpoint, forced: str) -> str:
    if forced == "nbd-client":
        if not kernel_nbd_ready():
            raise DittoError("the kernel NBD driver is not loaded (no /dev/nbd0): modprobe nbd")
        if endpoint.tls_psk:
            raise InvalidArgument("nbd-client cannot do TLS-PSK: use --method nbdfuse")
        return forced
    if forced == "nbdfuse" or endpoint.tls_psk:
        return "nbdfuse"
    if kernel_nbd_ready() and (
        shutil.which("nbd-client") or os.path.exists("/usr/sbin/nbd-client")
    ):
        return "nbd-client"
    return "nbdfuse"


def nbdfuse_source(endpoint: Endpoint, export: str, read_only: bool) -> list[str]:
    """nbdfuse's arguments after MOUNTPOINT: the export's URI, or for TLS-PSK (libnbd refuses
    a tls-psk-file in nbdfuse's URI) an nbdkit nbd-plugin client on nbdfuse's stdio."""
    if not endpoint.tls_psk:
        return [endpoint.uri(export)]
    nbdkit = shutil.which("nbdkit") or tool("nbdkit")
    args = ["--command", nbdkit, "-s", "--exit-with-parent", *(["-r"] if read_only else [])]
    args += ["nbd", f"hostname={endpoint.host}", f"port={endpoint.port}", f"export={export}"]
    args += ["tls=require", f"tls-psk={endpoint.tls_psk}"]
    user = psk_user(endpoint.tls_psk)
    return args + ([f"tls-username={user}"] if user else [])


class Attacher:
    """Makes one attachment, recording each resource in the state file as it comes to exist."""

    def __init__(self, entries: list[dict[str, Any]], entry: dict[str, Any]) -> None:
        self.entries = entries
        self.e = entry

    def record(self, **fields: Any) -> None:
        self.e.update(fields)
        save(self.entries)

    def nbdfuse(self, endpoint: Endpoint) -> None:
        for t in ("nbdfuse", "losetup", "fusermount3"):
            tool(t)
        if not os.path.exists("/dev/fuse"):
            raise DittoError("/dev/fuse is missing: modprobe fuse")
        workdir = os.path.join(rundir.rundir(), "attach", self.e["id"])
        os.makedirs(workdir, mode=0o700)
        fuse_dir = os.path.join(workdir, "fuse")
        os.mkdir(fuse_dir, 0o700)
        self.record(workdir=workdir, fuse_dir=fuse_dir)
        pidfile = os.path.join(workdir, "nbdfuse.pid")
        log = os.path.join(workdir, "nbdfuse.log")
        args = [tool("nbdfuse"), "-P", pidfile]
        if self.e["read_only"]:
            args.append("-r")
        args += [fuse_dir, *nbdfuse_source(endpoint, self.e["export"], self.e["read_only"])]
        with open(log, "ab") as f:
            # A session of its own (setsid): it must outlive snapctl, and no terminal's signals
            # reach it. detach waits for it to exit after fusermount3 -u.
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        self.record(nbdfuse_pid=proc.pid)
        nbd_file = os.path.join(fuse_dir, "nbd")

        def ready() -> bool:
            if proc.poll() is not None:
                with open(log, errors="replace") as text:
                    lines = text.read().strip().splitlines() or [f"exit status {proc.returncode}"]
                raise DittoError(f"nbdfuse failed for {self.e['export']}: {lines[-1]}")
            try:
                with open(pidfile) as text:
                    if not text.read().strip():
                        return False
            except FileNotFoundError:
                return False
            return mounted_at(fuse_dir) is not None and os.path.exists(nbd_file)

        if not wait_for(ready, TIMEOUT):
            raise DittoError(f"nbdfuse did not come up in {TIMEOUT:.0f}s (log: {log})")
        with open(pidfile) as text:
            pid = int(text.read().strip())
        self.record(nbdfuse_pid=pid, nbd_file=nbd_file)
        args = ["losetup", "--find", "--show"]
        if self.e["read_only"]:
            args.append("--read-only")
        cp = sh(*args, nbd_file)
        if cp.returncode != 0:
            raise DittoError(f"losetup failed: {said(cp)}")
        self.record(device=cp.stdout.strip())

    def nbd_client(self, endpoint: Endpoint) -> None:
        tool("nbd-client")
        last = "no free /dev/nbdN (modprobe nbd nbds_max=16 makes more)"
        for dev in nbd_devices():
            if nbd_connected(dev):
                continue
            args = endpoint.nbd_client_args(self.e["export"], dev)
            assert args is not None
            if self.e["read_only"]:
                args.append("-readonly")
            self.record(device=dev)  # first: even a half-connected device gets nbd-client -d
            cp = sh("nbd-client", *args, timeout=TIMEOUT)
            if cp.returncode == 0:
                if not wait_for(functools.partial(nbd_connected, dev), TIMEOUT):
                    raise DittoError(f"{dev} did not get a size after nbd-client")
                self.record(nbd_client_pid=nbd_pid(dev))
                return
            last = f"nbd-client {dev}: {said(cp)}"
            sh("nbd-client", "-d", dev)
            self.record(device=None)
        raise DittoError(last)

    def mount(self, mountpoint: str) -> None:
        dev = self.e["device"]
        cp = sh("blkid", "-p", "-o", "value", "-s", "TYPE", dev)
        fstype = cp.stdout.strip()
        if cp.returncode != 0 or not fstype:
            raise DittoError(
                f"{self.e['export']} ({dev}) holds no file system blkid recognises: attach it "
                "without --mount and make one (mkfs)"
            )
        if self.e["read_only"]:
            options = {"xfs": "ro,norecovery,nouuid"}.get(fstype, "ro")
            if fstype in EXT_TYPES:
                options = "ro,noload"
        else:
            options = "rw"
        if not os.path.isdir(mountpoint):
            os.makedirs(mountpoint)
            self.record(made_mountpoint=True)
        self.record(mountpoint=os.path.realpath(mountpoint), fstype=fstype, mount_options=options)
        cp = sh("mount", "-t", fstype, "-o", options, dev, mountpoint, timeout=120)
        if cp.returncode != 0:
            raise DittoError(f"mount -t {fstype} -o {options} {dev} {mountpoint}: {said(cp)}")


# --- detach --------------------------------------------------------------------------------------


def undo(entries: list[dict[str, Any]], e: dict[str, Any], timeout: float = TIMEOUT) -> None:
    """Undo what e records, newest first; forget e once everything is gone. A busy mount stops
    it (Refused, nothing below it touched); another failure leaves e recording what remains."""

    def record(**fields: Any) -> None:
        e.update(fields)
        save(entries)

    problems: list[str] = []
    mp, dev = e.get("mountpoint"), e.get("device")
    if mp:
        src = mounted_at(mp)
        if src is not None and src == dev:

            def unmounted() -> bool:
                return sh("umount", mp).returncode == 0 or mounted_at(mp) != dev

            if not wait_for(unmounted, min(timeout, 5), step=0.5):
                raise Refused(
                    f"cannot unmount {mp}: {said(sh('umount', mp))}; close what uses it "
                    f"(fuser -vm {mp}) and run detach again"
                )
        elif src is not None:
            problems.append(f"{mp} now has {src} mounted on it, not {dev}: left alone")
        if e.get("made_mountpoint") and mounted_at(mp) is None:
            with contextlib.suppress(OSError):
                os.rmdir(mp)
        record(mountpoint=None)

    if e.get("method") == "nbdfuse":
        nbd_file, fuse_dir = e.get("nbd_file"), e.get("fuse_dir")
        if nbd_file:
            for loop in loops_backed_by(nbd_file):
                sh("losetup", "-d", loop)
            # losetup -d of a busy device only sets autoclear: wait for the kernel to let go.
            if not wait_for(lambda: not loops_backed_by(nbd_file), timeout):
                still = ", ".join(loops_backed_by(nbd_file))
                raise DittoError(f"{still} still attached to {nbd_file} after losetup -d")
        record(device=None)
        if fuse_dir and mounted_at(fuse_dir) is not None:

            def fuse_gone() -> bool:
                sh("fusermount3", "-u", fuse_dir)
                return mounted_at(fuse_dir) is None

            if not wait_for(fuse_gone, timeout / 2, step=0.2):
                sh("fusermount3", "-u", "-z", fuse_dir)
                problems.append(f"{fuse_dir} needed a lazy unmount")
        pid = e.get("nbdfuse_pid")
        if pid:
            pid = int(pid)

            def exited() -> bool:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # our own child when a failed attach undoes
                if not rundir.pid_alive(pid):
                    return True
                # An empty command line is a process on its way out: wait for it to go.
                return bool(cmdline(pid)) and not is_our_nbdfuse(pid, fuse_dir or "")

            if not wait_for(exited, timeout / 2):
                problems.append(f"nbdfuse {pid} did not exit after the unmount: stopped")
                for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                    if exited():
                        break
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    wait_for(exited, wait)
            if exited():
                record(nbdfuse_pid=None)
            else:
                problems.append(f"nbdfuse {pid} is still running")
        workdir = e.get("workdir")
        if workdir and not (fuse_dir and mounted_at(fuse_dir)) and not e.get("nbdfuse_pid"):
            shutil.rmtree(workdir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(workdir))  # RUNDIR/attach, when nothing else is in it
            record(workdir=None, fuse_dir=None, nbd_file=None)
    elif dev:
        recorded = e.get("nbd_client_pid")
        current = nbd_pid(dev)
        if recorded and current and current != recorded:
            problems.append(f"{dev} is now connected by nbd-client {current}, not ours: left alone")
        elif nbd_connected(dev):
            sh("nbd-client", "-d", dev)
            if not wait_for(lambda: not nbd_connected(dev), timeout):
                raise DittoError(f"{dev} is still connected after nbd-client -d")
        record(device=None, nbd_client_pid=None)

    if problems and (e.get("device") or e.get("nbdfuse_pid") or e.get("workdir")):
        raise DittoError("detach incomplete: " + "; ".join(problems))
    entries.remove(e)
    save(entries)
    for p in problems:
        click.echo(f"snapctl: warning: {p}", err=True)


def find_entries(
    entries: list[dict[str, Any]], target: str, disk: str | None
) -> list[dict[str, Any]]:
    real = os.path.realpath(target)
    by_path = [
        e for e in entries if e.get("mountpoint") == real or e.get("device") in (target, real)
    ]
    if by_path:
        return by_path
    pool = os.path.realpath(disk) if disk else None
    return [
        e
        for e in entries
        if e.get("export") == target and (pool is None or e.get("disk") in (pool, None))
    ]


def describe(e: dict[str, Any]) -> str:
    where = f" on {e['mountpoint']}" if e.get("mountpoint") else ""
    return f"{e['export']} as {e.get('device') or '?'}{where}"


def complete_export(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """live, live@latest and live@NAME for every snapshot (asked of the pool, when it can)."""
    names = ["live", "live@latest"] + [
        f"live@{item.value}" for item in complete_snapshot(ctx, param, "")
    ]
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_attached(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """What detach can take: attached exports, their mount points and devices."""
    try:
        entries = load()
    except Exception:
        return []
    names: list[str] = []
    for e in entries:
        names += [v for v in (e.get("export"), e.get("mountpoint"), e.get("device")) if v]
    return [CompletionItem(n) for n in dict.fromkeys(names) if n.startswith(incomplete)]


# --- the commands --------------------------------------------------------------------------------


@main.command(
    short_help="Connect an export to the kernel as a block device, and mount it.",
    epilog="Examples: snapctl -d pool.img attach live --mount /mnt/live; "
    "snapctl -d pool.img attach live@nightly-1 --mount /mnt/snap; snapctl attach --list",
)
@click.argument("export", required=False, shell_complete=complete_export)
@click.option("--mount", "mountpoint", metavar="DIR", help="Mount the file system on DIR.")
@click.option("--read-only", is_flag=True, help="Attach read-only (snapshots always are).")
@click.option("--socket", "sock", metavar="PATH", help="The server's NBD Unix socket.")
@click.option(
    "--method",
    type=click.Choice(["auto", "nbd-client", "nbdfuse"]),
    default="auto",
    show_default=True,
    help="nbd-client where the kernel NBD driver is loaded, else nbdfuse + a loop device.",
)
@click.option("--list", "list_", is_flag=True, help="Show what is attached.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def attach(
    obj: Context,
    export: str | None,
    mountpoint: str | None,
    read_only: bool,
    sock: str | None,
    method: str,
    list_: bool,
    as_json: bool,
) -> None:
    """Connect EXPORT (default live; live@NAME for a snapshot) to the kernel as a block device,
    and mount it with --mount. Snapshots are read-only and mounted ro,noload (ext4) or
    ro,norecovery,nouuid (xfs). `snapctl detach` undoes exactly what this did."""
    if list_:
        if export or mountpoint or read_only or sock:
            raise click.UsageError("--list takes no export or attach options")
        run(lambda: _list(obj, as_json))
        return

    def body() -> None:
        exp = export or "live"
        read_only_ = read_only or "@" in exp
        if os.geteuid() != 0:
            raise PermissionDenied("attach needs root (losetup, mount, nbd-client): use sudo")
        endpoint = resolve_endpoint(obj.disk, sock)
        if mountpoint and os.path.exists(mountpoint) and not os.path.isdir(mountpoint):
            raise InvalidArgument(f"--mount {mountpoint}: not a directory")
        if mountpoint and mounted_at(mountpoint) is not None:
            raise Refused(f"{mountpoint} is already a mount point")
        how = choose_method(endpoint, method)
        info = probe_export(endpoint, exp)
        disk = os.path.realpath(obj.disk) if obj.disk else None
        with sigterm_as_interrupt(), locked():
            entries = load()
            for e in entries:
                if e.get("nbd") == str(endpoint) and e.get("export") == exp:
                    raise Refused(f"{exp} is already attached ({describe(e)}); detach it first")
                if mountpoint and e.get("mountpoint") == os.path.realpath(mountpoint):
                    raise Refused(f"{mountpoint} is in use by {describe(e)}")
            entry: dict[str, Any] = {
                "id": f"{re.sub(r'[^A-Za-z0-9_.-]', '_', exp)}-{uuid.uuid4().hex[:8]}",
                "export": exp,
                "disk": disk,
                "nbd": str(endpoint),
                "read_only": read_only_,
                "size_bytes": info.get("export-size"),
                "method": how,
                "device": None,
                "mountpoint": None,
                "fstype": None,
                "mount_options": None,
                "made_mountpoint": False,
                "nbdfuse_pid": None,
                "fuse_dir": None,
                "nbd_file": None,
                "workdir": None,
                "nbd_client_pid": None,
                "attached_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": False,
            }
            entries.append(entry)
            save(entries)
            a = Attacher(entries, entry)
            try:
                if how == "nbdfuse":
                    a.nbdfuse(endpoint)
                else:
                    a.nbd_client(endpoint)
                if mountpoint:
                    a.mount(mountpoint)
                a.record(complete=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    undo(entries, entry)
                raise
        if as_json:
            click.echo(json.dumps(_public(entry), indent=2))
            return
        pid = entry.get("nbdfuse_pid") or entry.get("nbd_client_pid")
        msg = f"attached {exp} as {entry['device']} ({how}{f', pid {pid}' if pid else ''}"
        msg += ", read-only)" if read_only_ else ")"
        if entry.get("mountpoint"):
            msg += f", mounted on {entry['mountpoint']} ({entry['fstype']}, "
            msg += f"{entry['mount_options']})"
        click.echo(msg)

    run(body)


def _public(e: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in e.items() if k not in ("complete",)}
    out["state"] = entry_state(e)
    return out


def _list(obj: Context, as_json: bool) -> None:
    entries = load()
    if obj.disk:
        pool = os.path.realpath(obj.disk)
        entries = [e for e in entries if e.get("disk") in (pool, None)]
    rows = [_public(e) for e in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cells = [
        [
            r["export"],
            r.get("device") or "-",
            r.get("mountpoint") or "-",
            "ro" if r["read_only"] else "rw",
            human_size(int(r["size_bytes"])) if r.get("size_bytes") is not None else "-",
            r["method"] + (f" {r['nbdfuse_pid'] or r['nbd_client_pid'] or ''}").rstrip(),
            r["state"],
            r.get("disk") or r["nbd"],
        ]
        for r in rows
    ]
    Renderer().rows(
        ["EXPORT", "DEVICE", "MOUNTPOINT", "MODE", "SIZE", "VIA", "STATE", "POOL"], cells
    )


@main.command(epilog="Examples: snapctl detach /mnt/snap; snapctl -d pool.img detach live")
@click.argument("target", metavar="EXPORT|DIR|DEVICE", shell_complete=complete_attached)
@click.pass_obj
def detach(obj: Context, target: str) -> None:
    """Undo an attach: unmount, remove the loop or nbd device, stop its nbdfuse."""

    def body() -> None:
        with sigterm_as_interrupt(), locked():
            entries = load()
            found = find_entries(entries, target, obj.disk)
            if not found:
                raise NotFound(
                    f"nothing is attached as {target} ('snapctl attach --list' shows what is)"
                )
            if len(found) > 1:
                raise InvalidArgument(
                    f"{target} is attached {len(found)} times ("
                    + "; ".join(describe(e) for e in found)
                    + "): name the mount point or device"
                )
            if os.geteuid() != 0:
                raise PermissionDenied("detach needs root (umount, losetup): use sudo")
            e = found[0]
            what = describe(e)
            undo(entries, e)
        click.echo(f"detached {what}")

    run(body)
