"""Test harness: real nbdkit servers running plugin/plugin.py, and libnbd clients for them.

Every server runs in the foreground of its own process with --exit-with-parent, listens on a
Unix socket in the test's temporary directory (or, with tcp_port=, on TCP at 127.0.0.1 only:
nbdkit cannot serve both at once), and is stopped by PID when the test ends, even when it fails.
Tests never mock nbdkit or the disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbd
from support.logcheck import register_server_log
from support.snapctl import REPO, SNAPCTL, snapctl

PLUGIN = REPO / "plugin" / "plugin.py"
__all__ = ["PLUGIN", "REPO", "SNAPCTL", "NbdkitServer", "free_port", "require", "run_snapctl"]


def require(tool: str) -> str:
    """The path of a required tool; a missing one fails the test loudly (never skips)."""
    path = shutil.which(tool)
    assert path, f"{tool} is not installed: run scripts/setup.sh"
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NbdkitServer:
    """One nbdkit + dittofs plugin process serving `disk` on a Unix socket, or with tcp_port
    on TCP at 127.0.0.1:tcp_port (a restart listens on the same port again)."""

    def __init__(
        self,
        workdir: Path,
        disk: Path,
        *,
        size: str | None = None,
        cow: str = "move",
        params: dict[str, str] | None = None,
        name: str = "srv",
        tcp_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.disk = disk
        self.sock = workdir / f"{name}.nbd.sock"
        self.tcp_port = tcp_port
        self.control = workdir / f"{name}.ctl.sock"
        self.rundir = workdir / "run"
        self.logfile = workdir / f"{name}.log"
        self.size = size
        self.cow = cow
        self.params = params or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "DITTOFS_RUNDIR": str(self.rundir)}

    def command(self) -> list[str]:
        args = [
            require("nbdkit"),
            "-f",
            "--exit-with-parent",
            *(["-i", "127.0.0.1", "-p", str(self.tcp_port)] if self.tcp_port else []),
            *([] if self.tcp_port else ["-U", str(self.sock)]),
            "python",
            str(PLUGIN),
            f"disk={self.disk}",
            f"cow={self.cow}",
            f"control={self.control}",
        ]
        if self.tcp_port:
            args.append(f"nbd=tcp:127.0.0.1:{self.tcp_port}")  # recorded in the run state
        if self.size:
            args.append(f"size={self.size}")
        args += [f"{k}={v}" for k, v in self.params.items()]
        return args

    def start(self, timeout: float = 20.0) -> NbdkitServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for p in (self.sock,):
            if p.exists():
                p.unlink()
        register_server_log(self.logfile)  # the engine-log watch reads it (support.logcheck)
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited with {self.proc.returncode}:\n{self.log()}")
            listening = _can_connect_tcp(self.tcp_port) if self.tcp_port else self.sock.exists()
            if listening and self.control.exists() and _can_connect(self.control):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nbdkit did not come up in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: a clean shutdown (the plugin commits and closes the pool)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """kill -9: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> NbdkitServer:
        self.stop()
        return self.start()

    def connect(self, export: str = "live", strict: bool = True) -> nbd.NBD:
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.set_export_name(export)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if self.tcp_port:
            h.connect_tcp("127.0.0.1", str(self.tcp_port))
        else:
            h.connect_unix(str(self.sock))
        return h

    def snapctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run snapctl against this server's disk (it finds the server by its run state)."""
        return snapctl(*args, disk=self.disk, env=self.env, check=check)


def _can_connect(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _can_connect_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def run_snapctl(
    disk: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return snapctl(*args, disk=disk, env=env)
