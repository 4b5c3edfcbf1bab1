"""snapctl serve: run nbdkit with the dittofs plugin on a pool and say how to connect to it.

    snapctl serve DISK [--socket PATH | --port N [--address A]] [--tls-psk FILE] [--background]

The server listens on a Unix socket (default RUNDIR/ID.nbd.sock) or on TCP, loopback only unless
--address says otherwise. The endpoint is handed to the plugin as `nbd=`, which records it in the
pool's run-state file, so `snapctl info` shows it and `snapctl attach` finds it.

In the foreground (the default, and what the systemd unit runs) snapctl stays the parent of
nbdkit (started with --exit-with-parent): it waits until the server answers, prints how to
connect, tells systemd it is ready (sd_notify, for Type=notify), forwards SIGTERM/SIGINT/SIGHUP
and exits with nbdkit's status. With --background that same foreground snapctl runs in a session
of its own, logging to RUNDIR/ID.log, and the command returns once the server answers, printing
nbdkit's PID (killing it, or the supervising snapctl, stops both). nbdkit 1.32 as Debian ships
it dies with the process that started it, so a supervisor is needed to leave it running.

A server that fails to start is reported as one line: the plugin's own error (with its exit code:
3 for a disk that holds no pool or does not exist) or nbdkit's; --debug shows all it printed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import parse_qs, quote

import click

from fsimpl import errors as ditto_errors
from fsimpl import rundir
from fsimpl.client import SocketClient
from fsimpl.errors import DittoError, InvalidArgument, NotFound, Refused

from .app import Context, main, run
from .render import parse_size

PLUGIN = Path(__file__).resolve().parent.parent / "plugin" / "plugin.py"
READY_TIMEOUT = 120.0
# Plugin parameters that snapctl sets itself (extra `key=value` arguments may not repeat them).
OWN_PARAMS = ("disk", "size", "cow", "control", "nbd")
_PARAM = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*=")


# --- the NBD endpoint ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a server's exports are: a Unix socket, or TCP host:port (optionally TLS-PSK).

    As text (the `nbd` field of the run state): `unix:PATH`, `tcp:HOST:PORT`, or
    `tcp:HOST:PORT?tls-psk-file=FILE`.
    """

    unix: str | None = None
    host: str | None = None
    port: int | None = None
    tls_psk: str | None = None

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        text = f"tcp:{self.hostport}"
        if self.tls_psk:
            text += f"?tls-psk-file={self.tls_psk}"
        return text

    @property
    def hostport(self) -> str:
        host = self.host or "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if text.startswith("unix:") and len(text) > 5:
            return cls(unix=text[5:])
        if text.startswith("tcp:"):
            rest, _, query = text[4:].partition("?")
            host, _, port = rest.rpartition(":")
            psk = parse_qs(query).get("tls-psk-file", [None])[0] if query else None
            if host and port.isdigit():
                return cls(host=host.strip("[]"), port=int(port), tls_psk=psk)
        raise InvalidArgument(
            f"'{text}' is not an NBD endpoint: expected unix:PATH or tcp:HOST:PORT"
        )

    def uri(self, export: str = "") -> str:
        """A libnbd URI (nbdinfo, nbdfuse, nbdcopy, nbdsh) for export ('' = the default)."""
        path = quote(export, safe="@")
        if self.unix is not None:
            return f"nbd+unix:///{path}?socket={quote(self.unix, safe='/')}"
        if self.tls_psk:
            user = psk_user(self.tls_psk)
            who = f"{quote(user, safe='')}@" if user else ""
            return (
                f"nbds://{who}{self.hostport}/{path}?tls-psk-file={quote(self.tls_psk, safe='/')}"
            )
        return f"nbd://{self.hostport}/{path}"

    def nbd_client_args(self, export: str, device: str) -> list[str] | None:
        """nbd-client's arguments for the kernel driver (None: it cannot do TLS-PSK)."""
        if self.unix is not None:
            return ["-unix", self.unix, device, "-N", export]
        if self.tls_psk:
            return None
        return ["-N", export, self.host or "127.0.0.1", str(self.port), device]


def psk_user(path: str) -> str | None:
    """The first user name in a PSK file (lines of `user:hexkey`), for the client's URI."""
    try:
        with open(path) as f:
            for line in f:
                if ":" in line:
                    return line.split(":", 1)[0].strip()
    except OSError:
        pass
    return None


def can_connect_unix(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# --- finding nbdkit and its plugin -------------------------------------------------------------


def find_nbdkit() -> str:
    """nbdkit's path: $DITTOFS_NBDKIT, else PATH, /usr/sbin, /sbin; missing fails clearly."""
    named = os.environ.get("DITTOFS_NBDKIT")
    if named:
        path = shutil.which(named)
        if not path:
            raise DittoError(f"nbdkit not found at {named} (from DITTOFS_NBDKIT)")
        return path
    path = shutil.which("nbdkit") or shutil.which("nbdkit", path="/usr/sbin:/sbin")
    if not path:
        raise DittoError(
            "nbdkit is not installed: apt-get install nbdkit nbdkit-plugin-python "
            "(or run scripts/setup.sh)"
        )
    return path


def plugin_path() -> str:
    if not PLUGIN.is_file():
        raise DittoError(
            f"the nbdkit plugin is missing ({PLUGIN}): install dittofs from its repository "
            "(pip install -e .)"
        )
    return str(PLUGIN)


# --- checks before starting ------------------------------------------------------------------


def check_socket_free(path: str) -> None:
    """A Unix socket path nbdkit can bind: absent, or a stale socket (removed here)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise NotFound(f"cannot make the socket {path}: {parent} does not exist") from None
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{path} exists and is not a socket; choose another --socket")
    if can_connect_unix(path):
        raise Refused(f"{path} is in use by another server; stop it or choose another --socket")
    os.unlink(path)  # stale: its server is gone


def check_port_free(address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((address, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DittoError(
                f"{address}:{port} is already in use; choose another --port "
                f"(ss -ltnp 'sport = :{port}' shows who has it)"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise InvalidArgument(
                f"--address {address} is not an address of this machine"
            ) from None
        raise DittoError(f"cannot listen on {address}:{port}: {e.strerror}") from None
    finally:
        s.close()


# --- reading nbdkit's output -------------------------------------------------------------------


class OutputRelay:
    """Collects a child's stderr; after release() it copies every line through to `out`."""

    def __init__(self, src: IO[bytes], out: IO[bytes]) -> None:
        self.src = src
        self.out = out
        self.lines: list[bytes] = []
        self.live = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._pump, name="nbdkit-stderr", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for line in iter(self.src.readline, b""):
            with self.lock:
                if self.live:
                    self._write(line)
                else:
                    self.lines.append(line)

    def _write(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except (OSError, ValueError):
            pass

    def release(self) -> None:
        with self.lock:
            self._write(b"".join(self.lines))
            self.live = True

    def text(self, wait: float = 2.0) -> str:
        self.thread.join(wait)
        with self.lock:
            return b"".join(self.lines).decode(errors="replace")


def startup_error(output: str, returncode: int | None) -> DittoError:
    """nbdkit's output from a failed start, as one DittoError (the plugin's own, if any)."""
    for line in output.splitlines():  # the plugin's one line: "...: error: MESSAGE [code]"
        m = re.match(r"nbdkit: (?:\S+: )?error: (?:\S+: \w+: error: )?(.+) \[(\w+)\]$", line)
        if m and m.group(2) in ditto_errors.ERRORS_BY_CODE:
            return ditto_errors.ERRORS_BY_CODE[m.group(2)](m.group(1).strip())
    for line in output.splitlines():
        m = re.match(r"\s*fsimpl\.errors\.(\w+): (.+)", line)
        if m:
            cls = getattr(ditto_errors, m.group(1), None)
            if isinstance(cls, type) and issubclass(cls, DittoError):
                return cls(m.group(2).strip())
    for line in output.splitlines():
        m = re.match(r"nbdkit: dittofs: error: (.+)", line)
        if m:
            return DittoError(m.group(1).strip())
    for line in output.splitlines():
        m = re.match(r"nbdkit: (?:.*?)error: (.+)", line)
        if m and "Traceback" not in m.group(1):
            msg = m.group(1).strip()
            if "Address already in use" in msg:
                return DittoError(f"nbdkit could not listen: {msg}; choose another --port")
            return DittoError(f"nbdkit: {msg}")
    tail = output.strip().splitlines()[-1:] or ["no output"]
    how = f"exited with status {returncode}" if returncode is not None else "did not start"
    return DittoError(f"nbdkit {how}: {tail[0]}")


def wait_ready(
    proc: subprocess.Popen[bytes], disk: str, timeout: float = READY_TIMEOUT
) -> dict[str, Any] | None:
    """The run state once the server answers on its control socket; None if nbdkit exited.

    The plugin writes its state in after_fork, after nbdkit has bound its NBD sockets, so a
    state naming this PID with a control socket that accepts means the exports answer too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        state = rundir.read_state(disk)
        if (
            state
            and int(state.get("pid", 0)) == proc.pid
            and state.get("control")
            and can_connect_unix(str(state["control"]))
        ):
            return state
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise DittoError(f"nbdkit did not answer within {timeout:.0f}s; it was stopped")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; nothing without $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


# --- what to tell the user ----------------------------------------------------------------------


def connect_help(
    disk: str,
    endpoint: Endpoint,
    state: dict[str, Any],
    pid: int,
    log: str | None = None,
    supervisor: int | None = None,
) -> str:
    q = shlex.quote
    by = f", supervised by snapctl pid {supervisor}" if supervisor else ""
    lines = [
        f"dittofs: serving {disk} (nbdkit pid {pid}{by})",
        f"  nbd       {endpoint}",
        f"  control   {state.get('control')}",
    ]
    if log:
        lines.append(f"  log       {log}")
    lines += [
        "exports: live (read-write), live@NAME (each snapshot, read-only), live@latest",
        "connect:",
        f"  snapctl -d {q(disk)} attach live --mount /mnt/live",
        f"  nbdinfo --list {q(endpoint.uri())}",
    ]
    client = endpoint.nbd_client_args("live", "/dev/nbd0")
    if client:
        lines.append("  nbd-client " + " ".join(q(a) for a in client) + "   # kernel NBD driver")
    else:
        lines.append("  (nbd-client cannot do TLS-PSK: use snapctl attach or nbdfuse)")
    lines += [
        f"  nbdfuse /mnt/nbd-live {q(endpoint.uri('live'))} &   # or FUSE + a loop device:",
        "  losetup --find --show /mnt/nbd-live/nbd",
        f"stop: {'' if supervisor else 'Ctrl-C, or '}kill {pid}",
    ]
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------


@main.command(
    context_settings={"ignore_unknown_options": False},
    epilog="Examples: snapctl serve pool.img --background; "
    "snapctl serve /dev/sdb --port 10809 --tls-psk /etc/dittofs/psk -- --filter=stats "
    "statsfile=/tmp/stats",
)
@click.argument("disk", type=click.Path(dir_okay=False))
@click.argument("nbdkit_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- NBDKIT ARGS]")
@click.option("--control", metavar="SOCKET", help="Control socket (default RUNDIR/ID.sock).")
@click.option(
    "--socket", "sock", metavar="PATH", help="NBD Unix socket (default RUNDIR/ID.nbd.sock)."
)
@click.option("--port", type=click.IntRange(1, 65535), help="Serve NBD on TCP instead.")
@click.option(
    "--address",
    metavar="A",
    help="TCP address to listen on, with --port (default 127.0.0.1: loopback only).",
)
@click.option(
    "--tls-psk",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="Require TLS with this PSK file (user:hexkey lines); TCP only.",
)
@click.option("--cow", type=click.Choice(["move", "copy"]), help="First write after a snapshot.")
@click.option("--size", metavar="SIZE", help="Create an image file of this live size if missing.")
@click.option("--background", is_flag=True, help="Return once the server answers; print its PID.")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="nbdkit writes its PID here.")
@click.pass_obj
def serve(
    obj: Context,
    disk: str,
    nbdkit_args: tuple[str, ...],
    control: str | None,
    sock: str | None,
    port: int | None,
    address: str | None,
    tls_psk: str | None,
    cow: str | None,
    size: str | None,
    background: bool,
    pid_file: str | None,
) -> None:
    """Serve the pool on DISK over NBD with nbdkit (foreground unless --background).

    Exports live (read-write), live@NAME (snapshots, read-only) and live@latest. Arguments after
    `--` go to nbdkit: options before the plugin, KEY=VALUE plugin or filter parameters after
    it (e.g. `-- --filter=stats statsfile=/tmp/s cache=256M`).
    """
    if sock and port:
        raise click.UsageError("give --socket or --port, not both")
    if address and not port:
        raise click.UsageError("--address needs --port")
    if tls_psk and not port:
        raise click.UsageError("--tls-psk needs --port (TLS is for TCP; a Unix socket is local)")
    options = [a for a in nbdkit_args if not _PARAM.match(a)]
    params = [a for a in nbdkit_args if _PARAM.match(a)]
    for p in params:
        if p.split("=", 1)[0] in OWN_PARAMS:
            raise click.UsageError(f"'{p}': use snapctl serve's own options for that")

    def body() -> None:
        nbdkit = find_nbdkit()
        plugin = plugin_path()
        path = os.path.abspath(disk)
        if size is not None:
            create = parse_size(size)
            if create <= 0:
                raise InvalidArgument("--size must be more than 0")
        elif not os.path.exists(path):
            raise NotFound(
                f"{disk} does not exist: make a pool with 'snapctl format {disk} --size SIZE', "
                "or give --size to create an image file"
            )
        running = rundir.read_state(path)
        if running:
            raise Refused(
                f"{disk} is already served by pid {running.get('pid')}"
                + (f" on {running['nbd']}" if running.get("nbd") else "")
            )
        if port:
            endpoint = Endpoint(
                host=address or "127.0.0.1",
                port=port,
                tls_psk=os.path.abspath(tls_psk) if tls_psk else None,
            )
            check_port_free(endpoint.host or "127.0.0.1", port)
        else:
            sockpath = (
                os.path.abspath(sock)
                if sock
                else os.path.join(rundir.rundir(), rundir.pool_id(path) + ".nbd.sock")
            )
            check_socket_free(sockpath)
            endpoint = Endpoint(unix=sockpath)
        rundir.rundir()  # make it (0700) before nbdkit's plugin does
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        if background:
            argv = [sys.executable, "-m", "cli.main", *(["--debug"] if obj.debug else [])]
            argv += ["serve", path]
            if endpoint.unix is not None:
                argv += ["--socket", endpoint.unix]
            else:
                argv += ["--port", str(endpoint.port), "--address", endpoint.host or "127.0.0.1"]
                if endpoint.tls_psk:
                    argv += ["--tls-psk", endpoint.tls_psk]
            for opt, value in (
                ("--control", control and os.path.abspath(control)),
                ("--cow", cow),
                ("--size", size),
                ("--pid-file", pid_file and os.path.abspath(pid_file)),
            ):
                if value:
                    argv += [opt, value]
            argv += ["--", *nbdkit_args]
            _serve_background(argv, env, path, endpoint, obj.debug)
            return

        cmd = [nbdkit, "-f", "--exit-with-parent"]
        if endpoint.unix is not None:
            cmd += ["-U", endpoint.unix]
        else:
            cmd += ["-i", endpoint.host or "127.0.0.1", "-p", str(endpoint.port)]
            if endpoint.tls_psk:
                cmd += ["--tls=require", f"--tls-psk={endpoint.tls_psk}"]
        if pid_file:
            cmd += ["-P", os.path.abspath(pid_file)]
        cmd += [*options, "python", plugin, f"disk={path}", f"nbd={endpoint}"]
        if size is not None:
            cmd.append(f"size={parse_size(size)}")
        if cow:
            cmd.append(f"cow={cow}")
        if control:
            cmd.append(f"control={os.path.abspath(control)}")
        cmd += params
        if obj.debug:
            click.echo("+ " + shlex.join(cmd), err=True)
        _serve_foreground(cmd, env, path, endpoint, obj.debug)

    run(body)


def _serve_background(
    argv: list[str], env: dict[str, str], disk: str, endpoint: Endpoint, debug: bool
) -> None:
    """Run `snapctl serve` (foreground) in a session of its own, logging to RUNDIR/ID.log, and
    return once its nbdkit answers.

    nbdkit 1.32 as Debian ships it dies with the process that started it (it sets
    PR_SET_PDEATHSIG even without --exit-with-parent), so it cannot simply be left behind: a
    foreground snapctl stays as its parent, forwarding signals. Killing either one stops both.
    """
    log = os.path.join(rundir.rundir(), rundir.pool_id(disk) + ".log")
    with open(log, "ab") as f:
        start = f.tell()
        sup = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
            env=env,
            cwd="/",  # a daemon must not pin the caller's directory (or its mount)
            start_new_session=True,  # setsid: no terminal, no signals from the caller's shell
        )
    deadline = time.monotonic() + READY_TIMEOUT + 10
    while True:
        rc = sup.poll()
        if rc is not None:
            with open(log, "rb") as f:
                f.seek(start)
                output = f.read().decode(errors="replace")
            if debug:
                click.echo(output, err=True, nl=False)
            said = [ln[9:] for ln in output.splitlines() if ln.startswith("snapctl: ")]
            err = DittoError(said[-1] if said else f"the server exited with status {rc}")
            err.exit_code = rc if rc > 0 else 1
            raise err
        state = rundir.read_state(disk)
        if (
            state
            and _parent_of(int(state.get("pid", 0))) == sup.pid
            and state.get("control")
            and can_connect_unix(str(state["control"]))
        ):
            break
        if time.monotonic() > deadline:
            sup.terminate()
            raise DittoError(f"the server did not answer within {READY_TIMEOUT:.0f}s; see {log}")
        time.sleep(0.05)
    click.echo(connect_help(disk, endpoint, state, int(state["pid"]), log, sup.pid))


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


STOP_GRACE = 5.0  # seconds nbdkit may take to stop before the supervisor ends it itself


def _wait_stopping(proc: subprocess.Popen[bytes], got: list[int], state: dict[str, Any]) -> int:
    """Wait for nbdkit. Once asked to stop, nbdkit 1.32 waits for every client's NEXT request
    before it exits, so an idle client (a mounted file system) would keep it up forever: after
    STOP_GRACE the supervisor commits the pool through the control socket (everything written
    becomes durable) and ends nbdkit with SIGKILL, which the pool is built to survive."""
    stop_at: float | None = None
    while True:
        try:
            return proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            pass
        if got and stop_at is None:
            stop_at = time.monotonic() + STOP_GRACE
        if stop_at is not None and time.monotonic() >= stop_at:
            with (
                contextlib.suppress(DittoError, OSError),
                SocketClient(str(state["control"]), timeout=10) as c,
            ):
                c.call("commit")
            proc.kill()
            proc.wait()
            return 0


def _serve_foreground(
    cmd: list[str], env: dict[str, str], disk: str, endpoint: Endpoint, debug: bool
) -> None:
    got: list[int] = []
    proc: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    relay = OutputRelay(proc.stderr, sys.stderr.buffer)
    state = wait_ready(proc, disk)
    if state is None:
        output = relay.text()
        if got:  # stopped by us (Ctrl-C, SIGTERM) while starting: not an error of its own
            sys.exit(128 + got[0])
        if debug:
            click.echo(output, err=True, nl=False)
        raise startup_error(output, proc.returncode)
    relay.release()
    click.echo(connect_help(disk, endpoint, state, proc.pid))
    sys.stdout.flush()
    sd_notify(f"READY=1\nSTATUS=serving {disk} on {endpoint}")
    rc = _wait_stopping(proc, got, state)
    sd_notify("STOPPING=1")
    relay.thread.join(2)
    if endpoint.unix is not None and not can_connect_unix(endpoint.unix):
        with contextlib.suppress(OSError):
            os.unlink(endpoint.unix)  # nbdkit leaves its socket behind
    sys.exit(rc if rc >= 0 else 128 - rc)
