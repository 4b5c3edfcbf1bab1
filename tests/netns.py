"""Two hosts on one machine: network namespaces joined by a veth pair, each with its own pool.

    with TwoHosts(tmp_path, "t10") as net:      # namespaces t10-<pid>-a/-b, 10.77.0.1/.2
        a, b = net.a, net.b
        a.format("64M"); a.start()              # nbdkit runs inside a's namespace
        a.snapctl("standby", "serve", "--listen", a.endpoint, "--key-file", key)

Each `Host` has a namespace, a veth end with its address, a work directory holding its disk and
its own DITTOFS_RUNDIR, and a dittofs server (nbdkit + plugin) started inside the namespace with
`ip netns exec` on a Unix socket in the work directory. Path-named Unix sockets are reachable
from every network namespace, so the test (in the root namespace) reads the exports with libnbd
and mounts them through the kernel over those sockets, while the pools talk to each other only
across the veth pair.

Everything is torn down by name when the block ends, even on failure: the servers (by PID), then
`ip netns del` of both namespaces (which destroys the veth pair with them). Missing `ip` or
namespace support fails loudly; nothing here skips. Needs root.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

from harness import NbdkitServer, require
from support.snapctl import shown, snapctl

SUBNET = "10.77.0"
PORT = 10810


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(
        [require("ip"), *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


class NsServer(NbdkitServer):
    """An NbdkitServer whose nbdkit runs inside a network namespace (ip execs it: same PID)."""

    def __init__(self, netns: str, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.netns = netns

    def command(self) -> list[str]:
        return [require("ip"), "netns", "exec", self.netns, *super().command()]


class Host:
    """One side: a namespace, a veth end (addr), a disk and a server inside the namespace."""

    def __init__(self, netns: str, iface: str, addr: str, workdir: Path, label: str) -> None:
        self.netns = netns
        self.iface = iface
        self.addr = addr
        self.label = label
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.disk = workdir / f"{label}.img"
        self.server = NsServer(netns, workdir, self.disk, name=label)
        self.env = self.server.env  # DITTOFS_RUNDIR=workdir/run: one run directory per host
        self.endpoint = f"{addr}:{PORT}"

    def exec_args(self, *cmd: str) -> list[str]:
        return [require("ip"), "netns", "exec", self.netns, *cmd]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """A command inside this host's namespace (with its DITTOFS_RUNDIR)."""
        cp = subprocess.run(
            self.exec_args(*cmd),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **({"stdin": subprocess.DEVNULL} | kw),  # type: ignore[arg-type]
        )
        if check and cp.returncode != 0:
            raise AssertionError(
                f"[{self.label}] {' '.join(cmd)} failed ({cp.returncode}):\n{cp.stdout}{cp.stderr}"
            )
        return cp

    def snapctl(
        self, *args: str, check: bool = True, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """snapctl -d DISK ARGS inside the namespace (it reaches the server by its run state)."""
        cp = snapctl(*args, disk=self.disk, env=self.env, prefix=tuple(self.exec_args()), **kw)  # type: ignore[arg-type]
        if check and cp.returncode != 0:
            raise AssertionError(f"[{self.label}] {shown(cp)}")
        return cp

    def format(self, size: str) -> None:
        self.snapctl("format", str(self.disk), "--size", size)

    def start(self) -> NsServer:
        return self.server.start()

    @property
    def sock(self) -> Path:
        return self.server.sock


class TwoHosts:
    """Namespaces <prefix>-<pid>-a and -b joined by a veth pair (10.77.0.1/24, 10.77.0.2/24)."""

    def __init__(self, workdir: Path, prefix: str = "dfs") -> None:
        tag = f"{prefix}-{os.getpid()}"
        short = f"{prefix[:4]}{os.getpid() % 100000}"  # interface names: at most 15 characters
        self.names = (f"{tag}-a", f"{tag}-b")
        self.a = Host(self.names[0], f"{short}a", f"{SUBNET}.1", workdir / "a", "a")
        self.b = Host(self.names[1], f"{short}b", f"{SUBNET}.2", workdir / "b", "b")

    def __enter__(self) -> TwoHosts:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:
        assert os.geteuid() == 0, "network namespaces need root"
        for ns in self.names:  # a leftover of an earlier, killed run with this PID
            if ns in namespaces():
                ip("netns", "del", ns)
        for ns in self.names:
            ip("netns", "add", ns)
        a, b = self.a, self.b
        # Created straight inside the namespaces: nothing appears in the root namespace.
        ip("link", "add", a.iface, "netns", a.netns, "type", "veth",
           "peer", "name", b.iface, "netns", b.netns)  # fmt: skip
        for h in (a, b):
            ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.iface)
            ip("-n", h.netns, "link", "set", h.iface, "up")
            ip("-n", h.netns, "link", "set", "lo", "up")

    def teardown(self) -> None:
        """Stop both servers, then delete both namespaces (the veth pair goes with them)."""
        errors = []
        for h in (self.a, self.b):
            h.server.kill()
        for ns in self.names:
            if ns in namespaces():
                cp = ip("netns", "del", ns, check=False)
                if cp.returncode != 0:
                    errors.append(f"ip netns del {ns}: {cp.stderr.strip()}")
        deadline = time.monotonic() + 10
        while any(ns in namespaces() for ns in self.names) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [ns for ns in self.names if ns in namespaces()]
        if left:
            errors.append(f"namespaces still there: {left}")
        if errors:
            raise AssertionError("; ".join(errors))
