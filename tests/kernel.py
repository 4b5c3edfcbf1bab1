"""Attach an NBD export on a Unix socket to the kernel, mount it, and undo exactly that.

Two ways to turn an export into a block device:

* `nbd-client` where the kernel has its NBD driver (/dev/nbd0 exists):
  `nbd-client -unix SOCKET /dev/nbdX -N EXPORT [-readonly]`, undone with `nbd-client -d`.
* `nbdfuse` + a loop device everywhere else (FUSE and loop devices only):
  `nbdfuse [-r] DIR nbd+unix:///EXPORT?socket=SOCKET` shows the export as the file DIR/nbd,
  `losetup --find --show [-r] DIR/nbd` makes it a block device. Undone with `losetup -d`,
  `fusermount3 -u DIR` and waiting for the nbdfuse process (our child) to exit.

`KernelExport` records every resource it creates (nbdfuse process, FUSE mount, loop or nbd
device, file-system mount) as it creates it, and `close()` tears down what was recorded in
reverse order, trying every step even when an earlier one failed, then reports all failures.
`leftovers()` says what is still there (it should be empty after `close()`).

DITTOFS_KERNEL_METHOD=nbdfuse|nbd-client overrides the choice. Everything here needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

# Where each tool comes from on Debian, for the message when one is missing.
PACKAGES = {
    "nbdfuse": "libnbd-bin",
    "fusermount3": "fuse3",
    "losetup": "util-linux (mount)",
    "mount": "mount",
    "umount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "fsfreeze": "util-linux",
    "blockdev": "util-linux",
    "nbd-client": "nbd-client",
}


def tool(name: str) -> str:
    """The path of a required tool; a missing one fails loudly with what to install."""
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )
    assert path, (
        f"{name} is not installed: apt-get install {PACKAGES.get(name, name)} "
        f"(or run scripts/setup.sh)"
    )
    return path


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises with its output."""
    cmd = [tool(args[0]), *args[1:]]
    cp = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({cp.returncode}):\n{cp.stdout}{cp.stderr}")
    return cp


def method() -> str:
    """nbd-client where the kernel has its NBD driver, else nbdfuse + loop."""
    forced = os.environ.get("DITTOFS_KERNEL_METHOD")
    if forced:
        assert forced in ("nbdfuse", "nbd-client"), f"DITTOFS_KERNEL_METHOD={forced}?"
        return forced
    return "nbd-client" if Path("/dev/nbd0").exists() else "nbdfuse"


def require_kernel_tools(how: str | None = None) -> None:
    """Fail (never skip) when this machine cannot mount an export through the kernel."""
    assert os.geteuid() == 0, "kernel mounts need root (losetup, mount, nbd-client)"
    how = how or method()
    if how == "nbdfuse":
        for t in ("nbdfuse", "fusermount3", "losetup"):
            tool(t)
        assert Path("/dev/fuse").exists(), "/dev/fuse is missing: modprobe fuse"
        assert Path("/dev/loop-control").exists(), "/dev/loop-control is missing: modprobe loop"
    else:
        tool("nbd-client")
    for t in ("mount", "umount"):
        tool(t)


def _unescape_mount_field(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, fs type) of every line in /proc/mounts."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                out.append(
                    (_unescape_mount_field(fields[0]), _unescape_mount_field(fields[1]), fields[2])
                )
    return out


def is_mounted(path: Path | str) -> bool:
    p = os.path.realpath(path)
    return any(mp == p for _, mp, _ in mounts())


def loop_devices() -> dict[str, str]:
    """Every attached loop device and its backing file, from sysfs."""
    out = {}
    for d in Path("/sys/block").glob("loop*"):
        try:
            out[f"/dev/{d.name}"] = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes (its parent reaps it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def nbd_uri(sock: Path | str, export: str) -> str:
    """nbd+unix URI for an export on a Unix socket (libnbd decodes %XX in both parts)."""
    return f"nbd+unix:///{quote(export, safe='@')}?socket={quote(str(sock), safe='/')}"


class KernelExport:
    """One NBD export as a kernel block device, optionally mounted; a context manager.

    with KernelExport(srv.sock, "live@s1", tmp_path / "k-s1", readonly=True) as k:
        k.mount(options="ro,noload")     # k.device is the block device
    """

    def __init__(
        self,
        sock: Path | str,
        export: str,
        workdir: Path,
        *,
        readonly: bool = False,
        how: str | None = None,
    ) -> None:
        self.sock = Path(sock)
        self.export = export
        self.workdir = Path(workdir)
        self.readonly = readonly
        self.how = how or method()
        # What we created, recorded as soon as it exists; None when not (or no longer) there.
        self.fuse_dir: Path | None = None
        self.fuse_proc: subprocess.Popen[bytes] | None = None
        self.fuse_pid: int | None = None
        self.loop: str | None = None
        self.loop_file: str | None = None
        self.nbd_dev: str | None = None
        self.nbd_pid: int | None = None
        self.mountpoint: Path | None = None
        self._made_dirs: list[Path] = []
        # Everything this object ever created, to check for leftovers after close().
        self._seen_pids: set[int] = set()
        self._seen_dirs: set[str] = set()
        self._seen_devices: set[str] = set()

    # --- context manager -------------------------------------------------------------------

    def __enter__(self) -> KernelExport:
        try:
            self.attach()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise
            # The test's own failure is the interesting one; teardown errors are printed.
            import traceback

            traceback.print_exc()

    @property
    def device(self) -> str:
        dev = self.loop or self.nbd_dev
        assert dev, "not attached"
        return dev

    # --- attach / detach -------------------------------------------------------------------

    def attach(self, timeout: float = 20.0) -> str:
        """Make the export a block device; returns its path (/dev/loopN or /dev/nbdN)."""
        assert self.loop is None and self.nbd_dev is None, "already attached"
        require_kernel_tools(self.how)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.how == "nbd-client":
            return self._attach_nbd_client(timeout)
        return self._attach_nbdfuse(timeout)

    def _mkdir(self, path: Path) -> Path:
        if not path.exists():
            path.mkdir(parents=True)
            self._made_dirs.append(path)
        return path

    def _attach_nbdfuse(self, timeout: float) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.export)
        fuse_dir = self.fuse_dir = self._mkdir(self.workdir / f"fuse-{safe}")
        self._seen_dirs.add(os.path.realpath(fuse_dir))
        pidfile = self.workdir / f"nbdfuse-{safe}.pid"
        logfile = self.workdir / f"nbdfuse-{safe}.log"
        pidfile.unlink(missing_ok=True)
        args = [tool("nbdfuse"), "-P", str(pidfile)]
        if self.readonly:
            args.append("-r")
        args += [str(fuse_dir), nbd_uri(self.sock, self.export)]
        with open(logfile, "ab") as log:
            # nbdfuse stays in the foreground: it is our child, and we reap it.
            self.fuse_proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.fuse_pid = self.fuse_proc.pid
        self._seen_pids.add(self.fuse_pid)
        nbdfile = fuse_dir / "nbd"

        def ready() -> bool:
            if self.fuse_proc is not None and self.fuse_proc.poll() is not None:
                raise RuntimeError(
                    f"nbdfuse exited with {self.fuse_proc.returncode} for {self.export}:\n"
                    + logfile.read_text(errors="replace")
                )
            return (
                pidfile.exists()
                and pidfile.read_text().strip() != ""
                and is_mounted(fuse_dir)
                and nbdfile.exists()
            )

        if not _wait(ready, timeout):
            raise RuntimeError(
                f"nbdfuse did not come up in {timeout}s:\n" + logfile.read_text(errors="replace")
            )
        self.loop_file = str(nbdfile)
        args = ["losetup", "--find", "--show"]
        if self.readonly:
            args.append("--read-only")
        self.loop = run(*args, self.loop_file).stdout.strip()
        self._seen_devices.add(self.loop)
        assert re.fullmatch(r"/dev/loop\d+", self.loop), f"losetup said {self.loop!r}"
        return self.loop

    def _attach_nbd_client(self, timeout: float) -> str:
        if not Path("/sys/block/nbd0").exists() and shutil.which("modprobe"):
            subprocess.run(["modprobe", "nbd"], capture_output=True)
        dev = None
        for d in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
            if not (d / "pid").exists() and (d / "size").read_text().strip() == "0":
                dev = f"/dev/{d.name}"
                break
        assert dev, "no free /dev/nbdN (modprobe nbd nbds_max=16)"
        args = ["nbd-client", "-unix", str(self.sock), dev, "-N", self.export]
        if self.readonly:
            args.append("-readonly")
        # Recorded first: even a failed or timed-out nbd-client gets `nbd-client -d` at close.
        self.nbd_dev = dev
        self._seen_devices.add(dev)
        run(*args, timeout=timeout)
        sysdir = Path("/sys/block") / Path(dev).name
        if not _wait(lambda: (sysdir / "size").read_text().strip() != "0", timeout):
            raise RuntimeError(f"{dev} did not get a size after nbd-client")
        try:
            self.nbd_pid = int((sysdir / "pid").read_text())
            self._seen_pids.add(self.nbd_pid)
        except (OSError, ValueError):
            self.nbd_pid = None  # netlink mode: no process holds the connection
        return dev

    def detach(self, timeout: float = 20.0) -> None:
        """Remove the block device and what made it (loop, then FUSE and nbdfuse; or nbd)."""
        assert self.mountpoint is None, "unmount first"
        errors: list[str] = []
        if self.loop is not None:
            try:
                self._detach_loop(timeout)
            except Exception as e:
                errors.append(str(e))
        if self.fuse_dir is not None or self.fuse_proc is not None:
            try:
                self._stop_nbdfuse(timeout)
            except Exception as e:
                errors.append(str(e))
        if self.nbd_dev is not None:
            try:
                self._detach_nbd_client(timeout)
            except Exception as e:
                errors.append(str(e))
        for d in reversed(list(self._made_dirs)):
            try:
                if not is_mounted(d):
                    d.rmdir()
                    self._made_dirs.remove(d)
            except OSError:
                pass
        if errors:
            raise RuntimeError("detach failed: " + "; ".join(errors))

    def _detach_loop(self, timeout: float) -> None:
        loop, backing = self.loop, self.loop_file
        assert loop is not None
        run("losetup", "-d", loop, check=False)
        # losetup -d of a busy device only sets autoclear: wait for the kernel to let go.
        if not _wait(lambda: loop_devices().get(loop) != backing, timeout):
            raise RuntimeError(f"{loop} still backed by {backing} after losetup -d")
        self.loop = None

    def _stop_nbdfuse(self, timeout: float) -> None:
        """fusermount3 -u (nbdfuse then exits by itself); escalate only if it will not."""
        d, proc = self.fuse_dir, self.fuse_proc
        problems = []
        if d is not None and is_mounted(d):

            def unmounted() -> bool:
                return run(
                    "fusermount3", "-u", str(d), check=False
                ).returncode == 0 or not is_mounted(d)

            if not _wait(unmounted, timeout / 2, step=0.2):
                problems.append(f"fusermount3 -u {d} kept failing")
        if proc is not None:
            try:
                proc.wait(timeout / 2)
            except subprocess.TimeoutExpired:
                problems.append(f"nbdfuse {proc.pid} did not exit after unmount")
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if d is not None and is_mounted(d):
            run("fusermount3", "-u", "-z", str(d), check=False)
            problems.append(f"{d} needed a lazy unmount")
        self.fuse_proc = None
        self.fuse_dir = None
        if problems:
            raise RuntimeError("; ".join(problems))

    def _detach_nbd_client(self, timeout: float) -> None:
        dev = self.nbd_dev
        assert dev is not None
        run("nbd-client", "-d", dev, check=False)
        sysdir = Path("/sys/block") / Path(dev).name

        def gone() -> bool:
            size = (sysdir / "size").read_text().strip()
            return size == "0" and not (sysdir / "pid").exists()

        if not _wait(gone, timeout):
            raise RuntimeError(f"{dev} still connected after nbd-client -d")
        pid = self.nbd_pid
        if pid is not None and not _wait(lambda: not pid_alive(pid), timeout):
            raise RuntimeError(f"nbd-client {pid} still running after -d")
        self.nbd_dev = None
        self.nbd_pid = None

    # --- mount / unmount -------------------------------------------------------------------

    def mount(
        self, mountpoint: Path | None = None, options: str | None = None, fstype: str | None = None
    ) -> Path:
        """Mount the device (read-only exports default to `ro,noload`, right for ext4)."""
        assert self.mountpoint is None, "already mounted"
        if options is None and self.readonly:
            options = "ro,noload"
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.export)
        mp = self._mkdir(Path(mountpoint) if mountpoint else self.workdir / f"mnt-{safe}")
        self._seen_dirs.add(os.path.realpath(mp))
        args = ["mount"]
        if fstype:
            args += ["-t", fstype]
        if options:
            args += ["-o", options]
        run(*args, self.device, str(mp))
        self.mountpoint = mp
        return mp

    def unmount(self, timeout: float = 20.0) -> None:
        mp = self.mountpoint
        if mp is None:
            return
        if is_mounted(mp):

            def unmounted() -> bool:
                return run("umount", str(mp), check=False).returncode == 0 or not is_mounted(mp)

            if not _wait(unmounted, timeout, step=0.2):
                run("umount", "-l", str(mp), check=False)
                self.mountpoint = None
                raise RuntimeError(f"umount {mp} kept failing (lazily unmounted)")
        self.mountpoint = None

    # --- all of it -------------------------------------------------------------------------

    def close(self) -> None:
        """Unmount and detach whatever is still there; raise once with every failure."""
        errors: list[str] = []
        try:
            self.unmount()
        except Exception as e:
            errors.append(str(e))
            self.mountpoint = None
        try:
            self.detach()
        except Exception as e:
            errors.append(str(e))
        if errors:
            raise RuntimeError(f"teardown of {self.export}: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """Anything this object created that still exists (mounts, devices, processes)."""
        found = []
        dirs = self._seen_dirs
        ours = {
            dev
            for dev, backing in loop_devices().items()
            if any(backing.startswith(d + "/") for d in dirs)
        }
        for dev in sorted(ours):
            found.append(f"loop device: {dev} -> {loop_devices().get(dev)}")
        for dev in self._seen_devices:
            if dev.startswith("/dev/nbd"):
                sysdir = Path("/sys/block") / Path(dev).name
                if (sysdir / "pid").exists() or (sysdir / "size").read_text().strip() != "0":
                    found.append(f"nbd device still connected: {dev}")
                    ours.add(dev)
        for src, mp, fs in mounts():
            if os.path.realpath(mp) in dirs or src in ours:
                found.append(f"mounted: {src} on {mp} ({fs})")
        for pid in self._seen_pids:
            if pid_alive(pid):
                found.append(f"process still running: {pid}")
        return found
