"""T5: `snapctl serve`, `attach` and `detach` through a real nbdkit and the kernel; serve's error
paths; shell completion of snapshot and export names.

Servers are started by `snapctl serve --background` (RUNDIR in the test's temporary directory,
NBD on a Unix socket there or on 127.0.0.1) and stopped by PID when the test ends, whatever
happened. Anything a failed test leaves attached (mounts, loop devices, FUSE mounts, nbdfuse)
is torn down by a finalizer too. The kernel tests need root and never skip: a missing tool fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SNAPCTL, NbdkitServer, require
from kernel import loop_devices, mounts, pid_alive, require_kernel_tools, run, tool
from support.snapctl import snapctl as run_snapctl

from fsimpl.rundir import pool_id

MiB = 1 << 20


# --- helpers ---------------------------------------------------------------------------------


def snapctl(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_snapctl(*args, env=env, timeout=timeout)


def ok(cp: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """It succeeded, with nothing on stderr (no warning: detach says when it had to force)."""
    assert cp.returncode == 0, f"{cp.args} exited {cp.returncode}:\n{cp.stdout}{cp.stderr}"
    assert not cp.stderr, f"{cp.args} warned:\n{cp.stderr}"
    return cp


def one_line_error(cp: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with `code` and said so in one line on stderr, no traceback."""
    assert cp.returncode == code, f"{cp.args}: {cp.returncode} != {code}\n{cp.stdout}{cp.stderr}"
    err = cp.stderr.strip()
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes_mentioning(text: str, name: str | None = None) -> list[tuple[int, str]]:
    """Live processes whose command line contains text (and, optionally, runs `name`)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            line = cmdline(int(d.name))
            runs = name is None or os.path.basename(line.split(" ")[0]) == name
            if text in line and runs and pid_alive(int(d.name)):
                found.append((int(d.name), line))
    return found


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL: a process this test started (checked by its command line)."""
    if not pid_alive(pid):
        return
    with_cmd = cmdline(pid)
    if "nbdkit" not in with_cmd and "cli.main" not in with_cmd and "nbdfuse" not in with_cmd:
        return  # not ours any more (the PID was reused)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), timeout):
            return


SERVING = re.compile(r"nbdkit pid (\d+)(?:, supervised by snapctl pid (\d+))?")


class Served:
    """One `snapctl serve --background`: its PIDs, endpoint and the environment to reach it."""

    def __init__(self, disk: Path, nbd: str, pid: int, supervisor: int, out: str) -> None:
        self.disk = disk
        self.nbd = nbd
        self.pid = pid
        self.supervisor = supervisor
        self.out = out


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("DITTOFS_DISK", "NOTIFY_SOCKET")}
    e["DITTOFS_RUNDIR"] = str(tmp_path / "run")
    return e


@pytest.fixture
def serve(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Served]]:
    """`snapctl serve DISK --background ...`; every server it started is stopped by PID."""
    pids: list[int] = []

    def start(disk: Path, *args: str, default_socket: bool = False) -> Served:
        require("nbdkit")
        if "--port" not in args and "--socket" not in args and not default_socket:
            args = (*args, "--socket", str(tmp_path / f"{disk.stem}.nbd.sock"))
        pidfile = tmp_path / f"{disk.stem}.pid"
        cp = snapctl(env, "serve", str(disk), "--background", "--pid-file", str(pidfile), *args)
        m = SERVING.search(cp.stdout)
        if m:
            pids.extend(int(p) for p in m.groups() if p)
        ok(cp)
        assert m, cp.stdout
        pid, sup = int(m.group(1)), int(m.group(2))
        assert int(pidfile.read_text().strip()) == pid
        nbd = re.search(r"^\s+nbd\s+(\S+)", cp.stdout, re.M)
        assert nbd, cp.stdout
        return Served(disk, nbd.group(1), pid, sup, cp.stdout)

    yield start
    for pid in pids:
        stop_pid(pid)


@pytest.fixture
def kernel_cleanup(tmp_path: Path) -> Iterator[None]:
    """Whatever a failed test left attached under tmp_path is torn down (and it fails loudly if
    even that cannot be done); a passing test has already detached everything itself."""
    yield
    base = os.path.realpath(tmp_path)
    for _, mp, _ in reversed(mounts()):
        if mp.startswith(base + "/") and not mp.endswith("/fuse"):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    for dev, backing in loop_devices().items():
        if backing.startswith(base + "/"):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
    for _, mp, _ in reversed(mounts()):
        if mp.startswith(base + "/"):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    for pid, _ in processes_mentioning(base, "nbdfuse"):
        stop_pid(pid)


def nothing_attached(tmp_path: Path, nbdfuse_pids: list[int]) -> None:
    """No mount, loop device, FUSE mount or nbdfuse process is left from this test."""
    base = os.path.realpath(tmp_path)
    assert [m for m in mounts() if base in m[1] or base in m[0]] == []
    with open("/proc/mounts") as f:
        assert [line for line in f if base in line] == []
    losetup = run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").stdout
    assert [line for line in losetup.splitlines() if base in line] == []
    assert {d: b for d, b in loop_devices().items() if b.startswith(base)} == {}
    assert wait_until(lambda: not any(pid_alive(p) for p in nbdfuse_pids)), nbdfuse_pids
    assert processes_mentioning(base, "nbdfuse") == []


def mounts_with_options() -> list[tuple[str, str, str, str]]:
    with open("/proc/mounts") as f:
        return [tuple(line.split()[:4]) for line in f]  # type: ignore[misc]


def run_states(tmp_path: Path) -> list[str]:
    """The run-state files of servers (RUNDIR/ID.json) still there."""
    run_dir = tmp_path / "run"
    return [p.name for p in run_dir.glob("*.json") if re.fullmatch(r"[0-9a-f]{16}\.json", p.name)]


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


# --- attach / detach through the kernel ------------------------------------------------------


@pytest.mark.slow
def test_attach_mount_snapshot_detach(
    tmp_path: Path, env: dict[str, str], serve: Callable[..., Served], kernel_cleanup: None
) -> None:
    require_kernel_tools()
    for t in ("mkfs.ext4", "blkid", "nbdinfo", "nbdfuse", "fusermount3", "losetup", "fsfreeze"):
        tool(t)
    disk = tmp_path / "pool.img"
    sock = tmp_path / "pool.nbd.sock"
    srv = serve(disk, "--size", "256M")
    assert srv.nbd == f"unix:{sock}"
    assert f"nbd+unix:///?socket={sock}" in srv.out  # how to connect, with the exact socket
    d = ["-d", str(disk)]

    info = json.loads(ok(snapctl(env, *d, "info", "--json")).stdout)
    assert info["mode"] == "server" and info["server_pid"] == srv.pid
    assert info["nbd"] == f"unix:{sock}"
    assert f"unix:{sock}" in ok(snapctl(env, *d, "info")).stdout

    # attach live as a bare block device, put ext4 on it, detach it by DEVICE
    a = json.loads(ok(snapctl(env, *d, "attach", "--json")).stdout)
    assert a["export"] == "live" and not a["read_only"] and a["state"] == "attached"
    assert a["size_bytes"] == 256 * MiB and a["mountpoint"] is None
    dev = a["device"]
    assert re.fullmatch(r"/dev/(loop|nbd)\d+", dev), dev
    pids = [a["nbdfuse_pid"]] if a["nbdfuse_pid"] else []
    if a["method"] == "nbdfuse":  # it outlives snapctl, in a session of its own (setsid)
        assert pid_alive(a["nbdfuse_pid"]) and os.getsid(a["nbdfuse_pid"]) == a["nbdfuse_pid"]
        assert loop_devices()[dev] == a["nbd_file"]
    recorded = json.loads((tmp_path / "run" / "attachments.json").read_text())
    assert [e["device"] for e in recorded["attachments"]] == [dev]
    run("mkfs.ext4", "-q", "-F", dev)
    assert "detached live" in ok(snapctl(env, "detach", dev)).stdout

    # live mounted read-write: write files, snapshot them (frozen), change them
    mnt_live = tmp_path / "mnt" / "live"
    out = ok(snapctl(env, *d, "attach", "live", "--mount", str(mnt_live))).stdout
    assert f"mounted on {mnt_live}" in out and "ext4" in out
    old = {"a.txt": b"version one\n", "dir/b.bin": os.urandom(3 * MiB + 17)}
    for name, data in old.items():
        (mnt_live / name).parent.mkdir(parents=True, exist_ok=True)
        (mnt_live / name).write_bytes(data)
    os.sync()
    ok(snapctl(env, *d, "create", "s1", "--freeze", str(mnt_live)))
    (mnt_live / "a.txt").write_bytes(b"version two\n")
    (mnt_live / "dir" / "b.bin").unlink()
    (mnt_live / "c.txt").write_bytes(b"new\n")
    os.sync()

    # the snapshot, read-only and mounted ro,noload, shows the old files; live the new ones
    mnt_s1 = tmp_path / "mnt" / "s1"
    s = json.loads(
        ok(snapctl(env, *d, "attach", "live@s1", "--mount", str(mnt_s1), "--json")).stdout
    )
    assert s["read_only"] and s["fstype"] == "ext4" and s["mount_options"] == "ro,noload"
    assert s["mountpoint"] == os.path.realpath(mnt_s1) and s["made_mountpoint"]
    if s["nbdfuse_pid"]:
        pids.append(s["nbdfuse_pid"])
    assert tree(mnt_s1) == old
    assert tree(mnt_live) == {"a.txt": b"version two\n", "c.txt": b"new\n"}
    opts = [o for _, mp, _, o in mounts_with_options() if mp == str(mnt_s1)]
    assert opts and "ro" in opts[0].split(","), opts
    with pytest.raises(OSError):
        (mnt_s1 / "x").write_bytes(b"no")

    # attach --list --json shows both
    listed = json.loads(ok(snapctl(env, "attach", "--list", "--json")).stdout)
    assert sorted(e["export"] for e in listed) == ["live", "live@s1"]
    for e in listed:
        assert e["state"] == "attached" and e["disk"] == os.path.realpath(disk)
        assert e["nbd"] == f"unix:{sock}" and Path(e["device"]).exists()
    by_export = {e["export"]: e for e in listed}
    assert by_export["live"]["mountpoint"] == os.path.realpath(mnt_live)
    assert not by_export["live"]["read_only"]
    assert json.loads(ok(snapctl(env, *d, "attach", "--list", "--json")).stdout) == listed
    table = ok(snapctl(env, "attach", "--list")).stdout
    assert "live@s1" in table and str(mnt_s1) in table

    # refusals: the same export twice, an export that does not exist, a busy mount point
    one_line_error(snapctl(env, *d, "attach", "live"), 4, "already attached")
    one_line_error(snapctl(env, *d, "attach", "live@nope"), 3, "no export live@nope")
    one_line_error(
        snapctl(env, *d, "attach", "live@latest", "--mount", str(mnt_s1)), 4, "mount point"
    )

    # a busy mount point is refused by detach, and everything stays as it was
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt_s1)
    try:
        one_line_error(snapctl(env, "detach", str(mnt_s1)), 4, "cannot unmount")
        assert len(json.loads(ok(snapctl(env, "attach", "--list", "--json")).stdout)) == 2
        assert tree(mnt_s1) == old
    finally:
        holder.kill()
        holder.wait()

    # detach by DIR and by EXPORT
    assert "detached live@s1" in ok(snapctl(env, "detach", str(mnt_s1))).stdout
    assert not mnt_s1.exists()  # attach made it, detach removed it
    assert "detached live" in ok(snapctl(env, *d, "detach", "live")).stdout
    assert not mnt_live.exists() and (tmp_path / "mnt").is_dir()  # only the dir it made
    assert json.loads(ok(snapctl(env, "attach", "--list", "--json")).stdout) == []
    nothing_attached(tmp_path, pids)

    # detach of something not attached: not found
    one_line_error(snapctl(env, *d, "detach", "live"), 3, "nothing is attached as live")
    one_line_error(snapctl(env, "detach", str(mnt_s1)), 3, "nothing is attached")
    one_line_error(snapctl(env, "detach", dev), 3, "nothing is attached")

    # the data is still there for a fresh attach, and live@latest is s1
    again = json.loads(
        ok(snapctl(env, *d, "attach", "live@latest", "--mount", str(mnt_s1), "--json")).stdout
    )
    assert tree(mnt_s1) == old
    if again["nbdfuse_pid"]:
        pids.append(again["nbdfuse_pid"])
    ok(snapctl(env, *d, "detach", "live@latest"))
    nothing_attached(tmp_path, pids)

    # the server stops cleanly by PID: its supervisor goes too, and its run state
    os.kill(srv.pid, signal.SIGTERM)
    assert wait_until(lambda: not pid_alive(srv.pid) and not pid_alive(srv.supervisor))
    assert run_states(tmp_path) == []


@pytest.mark.engine_log(r"names nothing yet")
@pytest.mark.slow
def test_attach_explicit_socket_read_only(
    tmp_path: Path, env: dict[str, str], servers: Any, kernel_cleanup: None
) -> None:
    """A server not started by `snapctl serve` records no NBD endpoint: attach says to give
    --socket, and works with it (live read-only here)."""
    require_kernel_tools()
    srv: NbdkitServer = servers(size="64M").start()
    env = {**env, "DITTOFS_RUNDIR": str(srv.rundir)}
    d = ["-d", str(srv.disk)]
    one_line_error(snapctl(env, *d, "attach"), 2, "--socket")
    one_line_error(snapctl(env, "attach"), 3, "-d DISK")
    if not Path("/sys/module/nbd").is_dir():  # no kernel NBD driver: asking for it fails clearly
        one_line_error(
            snapctl(env, "attach", "--socket", str(srv.sock), "--method", "nbd-client"),
            1,
            "modprobe nbd",
        )
    a = json.loads(
        ok(snapctl(env, "attach", "--socket", str(srv.sock), "--read-only", "--json")).stdout
    )
    assert a["read_only"] and a["disk"] is None and a["nbd"] == f"unix:{srv.sock}"
    assert run("blockdev", "--getro", a["device"]).stdout.strip() == "1"
    assert run("blockdev", "--getsize64", a["device"]).stdout.strip() == str(64 * MiB)
    # no file system on it: --mount is refused with the reason, and nothing is left behind
    one_line_error(
        snapctl(env, *d, "attach", "live@latest", "--socket", str(srv.sock)), 3, "no export"
    )
    ok(snapctl(env, *d, "create", "s1"))
    one_line_error(
        snapctl(
            env, "attach", "live@s1", "--socket", str(srv.sock), "--mount", str(tmp_path / "m")
        ),
        1,
        "no file system",
    )
    assert not (tmp_path / "m").exists()
    listed = json.loads(ok(snapctl(env, "attach", "--list", "--json")).stdout)
    assert [e["export"] for e in listed] == ["live"]
    ok(snapctl(env, "detach", "live"))
    nothing_attached(tmp_path, [a["nbdfuse_pid"]] if a["nbdfuse_pid"] else [])


@pytest.mark.slow
def test_tcp_and_tls(
    tmp_path: Path, env: dict[str, str], serve: Callable[..., Served], kernel_cleanup: None
) -> None:
    """--port serves on 127.0.0.1 only; --tls-psk requires TLS; attach follows either."""
    require_kernel_tools()
    for t in ("nbdinfo", "mkfs.ext4"):
        tool(t)
    disk = tmp_path / "pool.img"
    ok(snapctl(env, "format", str(disk), "--size", "64M"))
    port = free_port()
    srv = serve(disk, "--port", str(port))
    assert srv.nbd == f"tcp:127.0.0.1:{port}"
    assert json.loads(ok(snapctl(env, "-d", str(disk), "info", "--json")).stdout)["nbd"] == srv.nbd
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")
    ]
    assert listening == [f"0100007F:{port:04X}"], listening  # 127.0.0.1 only
    ok(subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{port}/live"], capture_output=True, text=True))
    a = json.loads(ok(snapctl(env, "-d", str(disk), "attach", "--json")).stdout)
    run("mkfs.ext4", "-q", "-F", a["device"])
    ok(snapctl(env, "detach", a["device"]))
    ok(snapctl(env, "-d", str(disk), "create", "s1"))
    stop_pid(srv.pid)
    assert wait_until(lambda: not pid_alive(srv.supervisor))

    psk = tmp_path / "psk.key"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    psk.chmod(0o600)
    port = free_port()
    srv = serve(disk, "--port", str(port), "--tls-psk", str(psk))
    assert srv.nbd == f"tcp:127.0.0.1:{port}?tls-psk-file={psk}"
    plain = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{port}/live"], capture_output=True)
    assert plain.returncode != 0  # TLS is required
    uri = f"nbds://alice@127.0.0.1:{port}/live?tls-psk-file={psk}"
    ok(subprocess.run(["nbdinfo", uri], capture_output=True, text=True))
    assert uri.replace("/live?", "/?") in srv.out
    s = json.loads(
        ok(
            snapctl(
                env, "-d", str(disk), "attach", "live@s1", "--mount", str(tmp_path / "m"), "--json"
            )
        ).stdout
    )
    assert s["read_only"] and s["method"] == "nbdfuse" and s["mount_options"] == "ro,noload"
    assert tree(tmp_path / "m") == {}
    ok(snapctl(env, "detach", "live@s1"))
    nothing_attached(tmp_path, [s["nbdfuse_pid"]])
    # the TLS client nbdfuse ran (nbdkit's nbd plugin on its stdio) is gone with it
    assert [p for p, _ in processes_mentioning(f"tls-psk={psk}", "nbdkit") if p != srv.pid] == []


# --- serve ---------------------------------------------------------------------------------------


def no_server_left(disk: Path) -> None:
    assert wait_until(lambda: processes_mentioning(f"disk={disk}") == []), processes_mentioning(
        f"disk={disk}"
    )


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_serve_refuses_a_disk_without_a_pool(
    tmp_path: Path, env: dict[str, str], mode: str
) -> None:
    require("nbdkit")
    disk = tmp_path / "zeros.img"
    disk.write_bytes(bytes(4 * MiB))
    args = ["serve", str(disk), "--socket", str(tmp_path / "s.sock")]
    if mode == "background":
        args.append("--background")
    err = one_line_error(snapctl(env, *args), 3, "holds no dittofs pool", "snapctl format")
    assert len(err.splitlines()) == 1, err
    no_server_left(disk)
    assert not (tmp_path / "s.sock").exists()
    dbg = snapctl(env, "--debug", *args)
    # --debug shows all nbdkit said: its one line, ending in the engine's error code
    assert dbg.returncode == 3, dbg.stderr
    assert any(
        line.startswith("nbdkit: error:") and line.endswith("[not_a_pool]")
        for line in dbg.stderr.splitlines()
    ), dbg.stderr
    no_server_left(disk)


def test_serve_error_paths(
    tmp_path: Path, env: dict[str, str], serve: Callable[..., Served]
) -> None:
    require("nbdkit")
    disk = tmp_path / "pool.img"
    # a missing disk: not found, with what to do
    one_line_error(snapctl(env, "serve", str(disk)), 3, "does not exist", "--size")
    assert not disk.exists()
    # usage errors (click's exit 2)
    for args in (
        ["--socket", str(tmp_path / "s"), "--port", "10809"],
        ["--tls-psk", str(tmp_path)],
        ["--address", "127.0.0.1"],
        ["--cow", "sideways"],
        ["--", "disk=/etc/passwd"],
    ):
        cp = snapctl(env, "serve", str(disk), "--size", "8M", *args)
        assert cp.returncode == 2, (args, cp.stderr)
    psk = tmp_path / "psk"
    psk.write_text("alice:00\n")
    assert "needs --port" in snapctl(env, "serve", str(disk), "--tls-psk", str(psk)).stderr
    # nbdkit missing
    one_line_error(
        snapctl({**env, "DITTOFS_NBDKIT": str(tmp_path / "no-nbdkit")}, "serve", str(disk)),
        1,
        "nbdkit not found",
    )
    # the port is taken (by a listener of ours on 127.0.0.1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(
            snapctl(env, "serve", str(disk), "--size", "8M", "--port", str(port)),
            1,
            f"127.0.0.1:{port} is already in use",
        )
    no_server_left(disk)
    # created with --size; a second server for the same pool is refused
    srv = serve(disk, "--size", "8M", "--cow", "copy")
    assert disk.exists()
    one_line_error(
        snapctl(env, "serve", str(disk), "--socket", str(tmp_path / "other.sock")),
        4,
        f"already served by pid {srv.pid}",
    )
    # a socket in use by another server is refused
    other = tmp_path / "other.img"
    ok(snapctl(env, "format", str(other), "--size", "8M"))
    one_line_error(
        snapctl(env, "serve", str(other), "--socket", srv.nbd.removeprefix("unix:")),
        4,
        "in use",
    )
    # the server stops by PID and leaves no run state; the socket it left is reusable
    stop_pid(srv.pid)
    assert wait_until(lambda: not pid_alive(srv.supervisor))
    assert run_states(tmp_path) == []
    srv2 = serve(disk)
    assert srv2.nbd == srv.nbd
    stop_pid(srv2.supervisor, timeout=15)  # SIGTERM to the supervisor reaches nbdkit
    assert wait_until(lambda: not pid_alive(srv2.pid))
    # SIGKILL to the supervisor: nbdkit follows its parent (--exit-with-parent)
    srv3 = serve(disk, default_socket=True)  # RUNDIR/ID.nbd.sock
    assert srv3.nbd == f"unix:{tmp_path / 'run' / pool_id(str(disk))}.nbd.sock"
    os.kill(srv3.supervisor, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(srv3.pid))
    no_server_left(disk)


def test_serve_foreground_notify_and_signals(tmp_path: Path, env: dict[str, str]) -> None:
    """Foreground serve tells systemd it is ready (sd_notify), prints how to connect, forwards
    SIGTERM to nbdkit and exits 0; nbdkit dies with it even on SIGKILL."""
    require("nbdkit")
    disk = tmp_path / "pool.img"
    sock = tmp_path / "fg.sock"
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    procs: list[subprocess.Popen[str]] = []
    try:
        for how in (signal.SIGTERM, signal.SIGKILL):
            p = subprocess.Popen(
                [str(SNAPCTL), "serve", str(disk), "--size", "16M", "--socket", str(sock)],
                env={**env, "NOTIFY_SOCKET": str(notify)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            msg = listener.recv(4096).decode()
            assert msg.startswith("READY=1\n") and f"unix:{sock}" in msg, msg
            info = json.loads(ok(snapctl(env, "-d", str(disk), "info", "--json")).stdout)
            assert info["nbd"] == f"unix:{sock}"
            nbdkit_pid = info["server_pid"]
            assert "--exit-with-parent" in cmdline(nbdkit_pid)
            p.send_signal(how)
            rc = p.wait(30)
            out = p.stdout.read() if p.stdout else ""
            assert f"nbdkit pid {nbdkit_pid}" in out and f"socket={sock}" in out
            if how == signal.SIGTERM:
                assert rc == 0, p.stderr.read() if p.stderr else ""
                assert listener.recv(4096).decode().startswith("STOPPING=1")
                assert not sock.exists()
            assert wait_until(lambda pid=nbdkit_pid: not pid_alive(pid))
            assert wait_until(lambda: run_states(tmp_path) == [])
    finally:
        listener.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        no_server_left(disk)


# --- shell completion ----------------------------------------------------------------------------


def complete(env: dict[str, str], words: str, cword: int, shell: str = "bash") -> list[str]:
    cp = subprocess.run(
        [str(SNAPCTL)],
        env={
            **env,
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            "_SNAPCTL_COMPLETE": f"{shell}_complete",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    return [line.split(",", 1)[1] for line in cp.stdout.splitlines() if "," in line]


@pytest.mark.parametrize("with_server", [False, True])
def test_completion_of_snapshot_names(
    tmp_path: Path, env: dict[str, str], serve: Callable[..., Served], with_server: bool
) -> None:
    disk = tmp_path / "pool.img"
    ok(snapctl(env, "format", str(disk), "--size", "8M"))
    if with_server:
        serve(disk)
    for name in ("alpha-1", "alpha-2", "beta"):
        ok(snapctl(env, "-d", str(disk), "create", name))
    assert complete(env, f"snapctl -d {disk} delete ", 4) == ["alpha-1", "alpha-2", "beta"]
    assert complete(env, f"snapctl -d {disk} delete al", 4) == ["alpha-1", "alpha-2"]
    assert complete(env, f"snapctl -d {disk} delete alpha-1 ", 5) == ["alpha-1", "alpha-2", "beta"]
    assert complete({**env, "DITTOFS_DISK": str(disk)}, "snapctl hold b", 2) == ["beta"]
    assert complete(env, f"snapctl -d {disk} rollback ", 4) == ["alpha-1", "alpha-2", "beta"]
    assert complete(env, f"snapctl -d {disk} attach live@a", 4) == [
        "live@alpha-1",
        "live@alpha-2",
    ]
    # no pool, or a pool that is not one: nothing to offer, and no error
    assert complete(env, "snapctl delete ", 2) == []
    assert complete(env, f"snapctl -d {tmp_path / 'nope.img'} delete ", 4) == []
    # the scripts each shell sources
    for shell, marker in (("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete")):
        src = subprocess.run(
            [str(SNAPCTL)],
            env={**env, "_SNAPCTL_COMPLETE": f"{shell}_source"},
            capture_output=True,
            text=True,
        )
        assert src.returncode == 0 and marker in src.stdout and "_SNAPCTL_COMPLETE" in src.stdout
