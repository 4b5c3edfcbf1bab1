"""The systems scripts/bench.py compares, each behind one small interface.

Every system serves one image on a Unix socket and is driven through NBD (fio's nbd engine,
libnbd, nbdcopy); the snapshot-capable ones also create and delete snapshots:

* `nbdkit file` on a raw image (the C ceiling) and `scripts/passthrough_plugin.py` (the Python
  ceiling): no snapshots;
* `qemu-nbd` serving qcow2 with internal snapshots. qemu-nbd locks the image, so a snapshot is
  `qemu-img snapshot -c` with qemu-nbd stopped (and restarted afterwards when it was running),
  which is what a user of qcow2 without a VM does; only the qemu-img command is timed;
* dittofs (`plugin/plugin.py`) with cow=move or cow=copy, managed through its control socket
  (fsimpl.client.SocketClient) or the `snapctl` command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nbd  # noqa: E402

from fsimpl.client import SocketClient  # noqa: E402

PLUGIN = REPO / "plugin" / "plugin.py"
PASSTHROUGH = REPO / "scripts" / "passthrough_plugin.py"
SNAPCTL = REPO / ".venv" / "bin" / "snapctl"
BLOCK = 65536  # dittofs's default block size and qcow2's default cluster size


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if cp.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({cp.returncode}):\n"
            f"{cp.stdout[-2000:]}{cp.stderr[-2000:]}"
        )
    return cp


def timed_run(cmd: list[str], ok: tuple[int, ...] = (0,), **kw: object) -> float:
    t = time.perf_counter()
    cp = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    dt = time.perf_counter() - t
    if cp.returncode not in ok:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({cp.returncode}):\n"
            f"{cp.stdout[-2000:]}{cp.stderr[-2000:]}"
        )
    return dt


def _connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def mibs(r: dict[str, float]) -> float:
    """A fio result's rate in MiB/s."""
    return r["bw"] / (1 << 20)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc/PID/status."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


class System:
    """One system under test. Subclasses fill in make() and command()."""

    key = "?"
    label = "?"
    kind = "raw"  # the image format it serves: raw, qcow2 or pool
    snapshots = False

    def __init__(self, work: Path) -> None:
        self.work = work
        self.sock = work / f"{self.key}.sock"
        self.logfile = work / f"{self.key}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.img: Path | None = None
        self.size = 0
        self.export: str | None = None  # the snapshot served read-only, if any
        self.env = {**os.environ, "DITTOFS_RUNDIR": str(work / "run")}

    # --- images and the server --------------------------------------------------------------

    def make(self, img: Path, size: int) -> None:
        """Create an empty image of `size` bytes (dittofs: at the first start)."""
        self.img, self.size = img, size
        with open(img, "wb") as f:
            f.truncate(size)

    def command(self) -> list[str]:
        raise NotImplementedError

    def nbdkit(self, plugin: str, *params: str) -> list[str]:
        """nbdkit in the foreground on this system's socket, ended with the benchmark."""
        return ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), plugin, *params]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return _connectable(self.sock)

    def start(self, export: str | None = None, probe: bool = False) -> float:
        """Start serving the image (export: a snapshot, read-only). Returns the seconds from
        the launch until the server answers; with probe, until a 4 KiB read returns."""
        assert not self.running, f"{self.key} already running"
        self.export = export
        if self.sock.exists():
            self.sock.unlink()
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode}:\n"
                    f"{self.logfile.read_text(errors='replace')[-3000:]}"
                )
            if self.ready():
                if not probe:
                    break
                try:
                    h = self.connect()
                    h.pread(4096, 0)
                    h.shutdown()
                    break
                except nbd.Error:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not come up")
            time.sleep(0.002)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is None:
            return
        # SIGTERM again every half second: qemu-nbd drops one that arrives while it is still
        # starting up. A server that is still up after two minutes is killed.
        deadline = time.monotonic() + 120
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                break
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    def restart(self) -> None:
        export = self.export
        self.stop()
        self.start(export)

    def remove(self) -> None:
        self.stop()
        if self.img is not None and self.img.exists():
            self.img.unlink()
        self.img = None

    # --- clients ------------------------------------------------------------------------------

    def export_name(self, snap: str | None = None) -> str:
        return ""

    def uri(self, snap: str | None = None) -> str:
        return f"nbd+unix:///{self.export_name(snap)}?socket={self.sock}"

    def connect(self, snap: str | None = None) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(self.export_name(snap))
        h.connect_unix(str(self.sock))
        return h

    def serve_snapshot(self, snap: str | None) -> str:
        """Make the server serve snapshot `snap` (None: the live volume); returns its URI."""
        return self.uri(snap)

    def flush(self) -> None:
        h = self.connect()
        h.flush()
        h.shutdown()

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # --- snapshots (snapshot-capable systems) ---------------------------------------------------

    def snap_create(self, name: str) -> float:
        raise NotImplementedError

    def snap_delete(self, name: str) -> float:
        raise NotImplementedError

    def snap_create_cli(self, name: str) -> float:
        raise NotImplementedError


class NbdkitFile(System):
    key, label = "file", "nbdkit file (C)"

    def command(self) -> list[str]:
        return self.nbdkit("file", str(self.img))


class Passthrough(System):
    key, label = "pt", "pass-through (Python)"

    def __init__(self, work: Path, threads: str) -> None:
        self.threads = threads
        super().__init__(work)

    def command(self) -> list[str]:
        return self.nbdkit(
            "python", str(PASSTHROUGH), f"file={self.img}", f"threads={self.threads}"
        )


class Qcow2(System):
    key, label, kind, snapshots = "qcow2", "qemu-nbd qcow2", "qcow2", True

    def make(self, img: Path, size: int) -> None:
        self.img, self.size = img, size
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size)])

    def command(self) -> list[str]:
        cmd = [
            "qemu-nbd",
            "-k",
            str(self.sock),
            "-f",
            "qcow2",
            "--persistent",
            "--shared=8",
            "--cache=writeback",
            "--aio=threads",
        ]
        if self.export is not None:
            cmd += ["--read-only", f"--load-snapshot=snapshot.name={self.export}"]
        return [*cmd, str(self.img)]

    def serve_snapshot(self, snap: str | None) -> str:
        if self.export != snap or not self.running:
            self.stop()
            self.start(snap)
        return self.uri()

    def _offline(self, cmd: list[str]) -> float:
        was = self.running
        export = self.export
        self.stop()
        try:
            return timed_run(cmd)
        finally:
            if was:
                self.start(export)

    def snap_create(self, name: str) -> float:
        return self._offline(["qemu-img", "snapshot", "-c", name, str(self.img)])

    def snap_delete(self, name: str) -> float:
        return self._offline(["qemu-img", "snapshot", "-d", name, str(self.img)])

    snap_create_cli = snap_create

    def write_offline(self, writes: list[tuple[int, int, int]]) -> None:
        """Write (offset, length, byte) patterns with qemu-io while nothing serves the image."""
        assert not self.running
        cmd = ["qemu-io", "-f", "qcow2"]
        for off, n, byte in writes:
            cmd += ["-c", f"write -q -P {byte} {off} {n}"]
        run([*cmd, str(self.img)])


class Dittofs(System):
    kind, snapshots = "pool", True

    def __init__(
        self,
        work: Path,
        cow: str,
        threads: str,
        merge: str = "deferred",
        checksum: bool = False,
        copies: int = 2,
    ) -> None:
        self.cow, self.threads, self.merge, self.checksum = cow, threads, merge, checksum
        self.copies = copies
        self.key, self.label = cow, f"dittofs cow={cow}"
        if merge != "deferred":
            self.key, self.label = f"{cow}-{merge}", f"dittofs cow={cow} merge={merge}"
        if checksum:
            self.key, self.label = f"{self.key}-checksum", f"{self.label} checksum=on"
        if copies != 2:
            self.key, self.label = f"{self.key}-{copies}copy", f"{self.label} metadata-copies=1"
        super().__init__(work)
        self.control = work / f"{self.key}.ctl"
        self.ctl: SocketClient | None = None

    def make(self, img: Path, size: int) -> None:
        self.img, self.size = img, size  # the plugin creates it at its first start (size=)

    def use(self, img: Path, size: int) -> None:
        """Serve an existing pool (made by another Dittofs system)."""
        self.img, self.size = img, size

    def command(self) -> list[str]:
        return self.nbdkit(
            "python",
            str(PLUGIN),
            f"disk={self.img}",
            f"size={self.size}",
            f"cow={self.cow}",
            f"merge={self.merge}",
            f"checksum={'on' if self.checksum else 'off'}",
            f"metadata-copies={self.copies}",
            f"control={self.control}",
            f"threads={self.threads}",
        )

    def ready(self) -> bool:
        return _connectable(self.sock) and _connectable(self.control)

    def start(self, export: str | None = None, probe: bool = False) -> float:
        dt = super().start(None, probe)
        self.ctl = SocketClient(str(self.control))
        return dt

    def stop(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        super().stop()

    def export_name(self, snap: str | None = None) -> str:
        return "live" if snap is None else f"live@{snap}"

    def call(self, op: str, args: dict[str, object] | None = None) -> object:
        assert self.ctl is not None
        return self.ctl.call(op, args)

    def snap_create(self, name: str) -> float:
        t = time.perf_counter()
        self.call("create", {"name": name})
        return time.perf_counter() - t

    def snap_delete(self, name: str) -> float:
        t = time.perf_counter()
        self.call("delete", {"name": name})
        return time.perf_counter() - t

    def snapctl(self, *args: str) -> list[str]:
        return [str(SNAPCTL), "-d", str(self.img), *args]

    def snap_create_cli(self, name: str) -> float:
        return timed_run(self.snapctl("create", name), env=self.env)

    def diff_socket(self, a: str, b: str) -> tuple[float, int]:
        t = time.perf_counter()
        r = self.call("diff", {"from": a, "to": b})
        dt = time.perf_counter() - t
        return dt, len(r["ranges"])  # type: ignore[index]

    def diff_cli(self, a: str, b: str) -> float:
        return timed_run(self.snapctl("diff", a, b), env=self.env)


def make_systems(work: Path, threads: str) -> list[System]:
    return [
        NbdkitFile(work),
        Passthrough(work, threads),
        Qcow2(work),
        Dittofs(work, "move", threads),
        Dittofs(work, "copy", threads),
    ]


def fio(
    uri: str,
    rw: str,
    bs: str,
    iodepth: int,
    size: int,
    runtime: float | None = None,
    offset: int = 0,
    number_ios: int | None = None,
    iolog: Path | None = None,
    fsync: int = 0,
) -> dict[str, float]:
    """One fio job with the nbd engine; returns bytes/s, IOPS, I/Os and seconds. fsync=N: a
    FLUSH after every N writes."""
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        "--output-format=json",
    ]
    if iolog is not None:
        cmd += [f"--read_iolog={iolog}", "--replay_no_stall=1"]
    else:
        cmd += [
            f"--rw={rw}",
            f"--size={size}",
            f"--offset={offset}",
            "--randrepeat=0",
            "--norandommap",
        ]
    if runtime:
        cmd += [f"--runtime={int(runtime * 1000)}ms", "--time_based"]
    if number_ios:
        cmd += [f"--number_ios={number_ios}"]
    if fsync:
        cmd += [f"--fsync={fsync}"]
    cp = subprocess.run(cmd, capture_output=True, text=True)
    out = cp.stdout
    if cp.returncode != 0 or "{" not in out:
        raise RuntimeError(f"fio failed ({' '.join(cmd)}):\n{out[-2000:]}{cp.stderr[-2000:]}")
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']} ({' '.join(cmd)}):\n{cp.stderr}")
    side = job["write"] if ("write" in rw or iolog is not None) else job["read"]
    if side["total_ios"] <= 0:
        raise RuntimeError(f"fio did no I/O ({' '.join(cmd)}):\n{cp.stderr}")
    return {
        "bw": float(side["bw_bytes"]),
        "iops": float(side["iops"]),
        "ios": float(side["total_ios"]),
        "seconds": float(side["runtime"]) / 1000.0,
    }


def write_iolog(path: Path, offsets: list[int], length: int) -> Path:
    """A fio replay log (version 2) writing `length` bytes at each offset, in this order."""
    with open(path, "w") as f:
        f.write("fio version 2 iolog\nnbd add\nnbd open\n")
        for off in offsets:
            f.write(f"nbd write {off} {length}\n")
    return path


def nbd_writes(sysm: System, writes: list[tuple[int, int, int]], depth: int = 16) -> None:
    """Write (offset, length, byte) patterns through NBD, `depth` requests in flight."""
    h = sysm.connect()
    bufs: dict[tuple[int, int], nbd.Buffer] = {}

    def retire() -> None:
        while True:
            try:
                cookie = h.aio_peek_command_completed()
            except nbd.Error:  # nothing left to retire
                return
            if cookie <= 0:
                return
            h.aio_command_completed(cookie)  # raises the request's error, if any

    for off, n, byte in writes:
        key = (n, byte)
        if key not in bufs:
            bufs[key] = nbd.Buffer.from_bytearray(bytearray([byte]) * n)
        while h.aio_in_flight() >= depth:
            h.poll(-1)
            retire()
        h.aio_pwrite(bufs[key], off)
    while h.aio_in_flight() > 0:
        h.poll(-1)
        retire()
    retire()
    h.flush()
    h.shutdown()


def apply_writes(sysm: System, writes: list[tuple[int, int, int]]) -> None:
    """Write through the running server, or with qemu-io while a qcow2 image is not served."""
    if isinstance(sysm, Qcow2) and not sysm.running:
        for i in range(0, len(writes), 2000):
            sysm.write_offline(writes[i : i + 2000])
        return
    nbd_writes(sysm, writes)


def has_qemu_io() -> bool:
    try:
        subprocess.run(["qemu-io", "--version"], capture_output=True)
        return True
    except OSError:
        return False
