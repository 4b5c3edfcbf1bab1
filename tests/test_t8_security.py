"""Access control of the control socket, layer by layer, and the exports over TCP with TLS-PSK.

The control socket is mode 0600 inside a 0700 directory, and the server checks each peer's uid
(SO_PEERCRED): only root and the user running the server may manage the pool. Clients run as a
user made for the test (dittofs-test-PID, removed by name at the end) through setpriv:

* the file mode alone: the directory keeps that user out; with the directory opened up, the
  socket's own mode still does (connect(2) fails with EACCES, the server never sees it);
* the uid check alone: with directory and socket opened up (0777) the connection is made and
  refused by the server ('permission', exit 4), for raw requests and for snapctl itself;
* with the server running as that user, its owner and root are served and a third user is not.

TLS: 'snapctl serve --port N --tls-psk FILE' requires TLS; a client without TLS, with the wrong
key or an unknown user name is refused; one with the key writes and reads correctly.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from harness import REPO, SNAPCTL, require
from support.data import sha256_file as sha256
from support.snapctl import snapctl, snapctl_json
from t8_helpers import close_quietly

USER = f"dittofs-test-{os.getpid()}"  # one per run: concurrent runs never share it
NOBODY = 65534

CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.errno}))
    sys.exit(0)
msg = {"v": 1, "id": 1, "op": sys.argv[2], "args": json.loads(sys.argv[3])}
try:
    s.sendall(json.dumps(msg).encode() + b"\n")
except (BrokenPipeError, ConnectionResetError):
    pass  # a refusal may come (and the server close) before the request is sent
buf = b""
while b"\n" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
reply = json.loads(buf.split(b"\n")[0]) if buf else None
s.settimeout(0.5)
try:
    closed = s.recv(1) == b""
except ConnectionResetError:  # closed with our request unread
    closed = True
except socket.timeout:
    closed = False
print(json.dumps({"connect": 0, "reply": reply, "closed": closed}))
"""


@pytest.fixture(scope="module")
def user() -> Iterator[tuple[int, int]]:
    """A user for the test (made if missing), removed by name at the end."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            [require("useradd"), "-M", "-r", "-s", "/usr/sbin/nologin", USER],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pw = pwd.getpwnam(USER)
    # The user runs this checkout's snapctl and plugin: a clone under a 0700 directory (mktemp
    # -d) would refuse it. Grant search (not listing) on each such ancestor, and take it back.
    opened: list[tuple[Path, int]] = []
    for d in [REPO, *REPO.parents]:
        m = d.stat().st_mode
        if not m & stat.S_IXOTH:
            d.chmod(stat.S_IMODE(m) | stat.S_IXOTH)
            opened.append((d, stat.S_IMODE(m)))
    try:
        yield pw.pw_uid, pw.pw_gid
    finally:
        for d, m in opened:
            d.chmod(m)
        subprocess.run([require("userdel"), USER], capture_output=True, timeout=60)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="dittofs-sec-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_user(uid: int, gid: int, *argv: str, env: dict[str, str] | None = None) -> str:
    cp = subprocess.run(
        [require("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return cp.stdout + cp.stderr + f"\n(exit {cp.returncode})"


def client(uid: int, gid: int, sock: Path, op: str = "hello", args: str = "{}") -> dict[str, Any]:
    out = as_user(uid, gid, "/usr/bin/python3", "-c", CLIENT, str(sock), op, args)
    try:
        got: dict[str, Any] = json.loads(out.splitlines()[0])
        return got
    except (ValueError, IndexError):
        pytest.fail(f"the client as uid {uid} failed: {out}")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_control_socket_layers(servers, user: tuple[int, int], shared_dir: Path) -> None:
    uid, gid = user
    srv = servers(size="4M")
    srv.control = shared_dir / "ctl" / "pool.sock"  # the server makes ctl/ itself
    srv.start()
    ctl = srv.control.parent
    assert mode(ctl) == 0o700 and os.stat(ctl).st_uid == 0, oct(mode(ctl))
    assert mode(srv.control) == 0o600 and os.stat(srv.control).st_uid == 0
    deadline = time.monotonic() + 20  # the run state is written just after the socket opens
    while not list(srv.rundir.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mode(srv.rundir) == 0o700, oct(mode(srv.rundir))
    state = next(srv.rundir.glob("*.json"))
    assert mode(state) == 0o600, oct(mode(state))
    h = srv.connect("live")
    h.flush()
    close_quietly(h)
    before = sha256(srv.disk)

    # layer 1: the file mode. The 0700 directory stops the other user...
    got = client(uid, gid, srv.control)
    assert got == {"connect": 13}, got  # EACCES
    # ...and with the directory opened, the socket's 0600 still does
    ctl.chmod(0o755)
    got = client(uid, gid, srv.control)
    assert got == {"connect": 13}, got
    assert client(0, 0, srv.control)["reply"]["ok"], "root must be served"

    # layer 2: the uid check, with the modes opened up
    ctl.chmod(0o777)
    srv.control.chmod(0o777)
    for op, args in (("hello", "{}"), ("create", '{"name": "intruder"}'), ("list", "{}")):
        got = client(uid, gid, srv.control, op, args)
        assert got["connect"] == 0, got
        err = got["reply"]["error"]
        assert err["code"] == "permission" and err["exit_code"] == 4, got
        assert "only root or the user running the server" in err["message"], got
        assert got["closed"], "a refused peer's connection was left open"
    # root still is served, and nothing was created
    got = client(0, 0, srv.control, "list")
    assert got["reply"]["ok"] and got["reply"]["result"] == [], got
    h = srv.connect("live")
    h.flush()
    close_quietly(h)
    assert sha256(srv.disk) == before, "a refused user changed the pool"


def test_snapctl_as_another_user_is_told_why(
    servers, user: tuple[int, int], shared_dir: Path
) -> None:
    """snapctl run by a user the server refuses must say so ('permission', exit 4). The server
    answers a refused peer at once and closes without reading its request, so the client's
    write of the request races with the close: when it loses (EPIPE), SocketClient reports
    'lost the server ... Broken pipe' (exit 1) instead of the refusal waiting in its socket."""
    uid, gid = user
    srv = servers(size="4M")
    srv.control = shared_dir / "ctl" / "pool.sock"
    srv.start()
    srv.control.parent.chmod(0o777)
    srv.control.chmod(0o777)
    env = {**os.environ, "DITTOFS_RUNDIR": str(shared_dir / "user-run")}
    outcomes: dict[str, int] = {}
    for _ in range(12):
        out = as_user(uid, gid, str(SNAPCTL), "--control", str(srv.control), "list", env=env)
        line = out.strip().splitlines()[0] + " " + out.strip().splitlines()[-1]
        outcomes[line] = outcomes.get(line, 0) + 1
    good = "snapctl: only root or the user running the server may manage this pool (exit 4)"
    assert outcomes == {good: 12}, f"12 refused runs of snapctl printed: {outcomes}"


def test_uid_check_serves_the_owner_and_root_only(
    servers, user: tuple[int, int], shared_dir: Path
) -> None:
    uid, gid = user
    home = shared_dir / "owner"
    home.mkdir()
    os.chown(home, uid, gid)
    srv = servers(disk=home / "pool.img", size="4M")
    srv.control = home / "ctl" / "pool.sock"
    srv.sock = home / "nbd.sock"
    srv.rundir = home / "run"
    srv.env["DITTOFS_RUNDIR"] = str(srv.rundir)
    srv.logfile = home / "srv.log"
    plain = srv.command

    def command() -> list[str]:  # nbdkit as the test user
        return [require("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] + plain()

    srv.command = command
    srv.start()
    assert os.stat(srv.control).st_uid == uid and mode(srv.control) == 0o600
    assert client(uid, gid, srv.control)["reply"]["ok"], "the server's own user must be served"
    assert client(0, 0, srv.control)["reply"]["ok"], "root must be served"
    srv.control.parent.chmod(0o777)  # (as root) let a third user reach the socket
    srv.control.chmod(0o777)
    got = client(NOBODY, NOBODY, srv.control, "create", '{"name": "x"}')
    assert got["reply"]["error"]["code"] == "permission", got
    assert client(uid, gid, srv.control, "list")["reply"]["result"] == []


# --- TLS ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_client(port: int, export: str, psk: Path | None, user: str = "alice") -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    if psk is None:
        h.set_tls(nbd.TLS_DISABLE)
    else:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_username(user)
        h.set_tls_psk_file(str(psk))
    h.connect_tcp("127.0.0.1", str(port))
    return h


def test_tls_psk(tmp_path: Path) -> None:
    require("nbdkit")
    env = {**os.environ, "DITTOFS_RUNDIR": str(tmp_path / "run")}
    disk = tmp_path / "pool.img"
    snapctl("format", str(disk), "--size", "4M", env=env, check=True)
    psk = tmp_path / "psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    psk.chmod(0o600)
    wrong = tmp_path / "wrong-psk"
    wrong.write_text("alice:" + os.urandom(32).hex() + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [str(SNAPCTL), "serve", str(disk), "--port", str(port), "--tls-psk", str(psk)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"snapctl serve exited: {proc.stdout.read()}"  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the TLS server did not come up"
                time.sleep(0.1)

        for what, key, name in (
            ("no TLS", None, "alice"),
            ("the wrong key", wrong, "alice"),
            ("an unknown user", psk, "mallory"),
        ):
            with pytest.raises(nbd.Error):
                h = tls_client(port, "live", key, name)
                h.pread(512, 0)  # (never reached: the handshake fails)
                pytest.fail(f"a client with {what} was served")

        h = tls_client(port, "live", psk)
        data = os.urandom(300_000)
        h.pwrite(data, 12345)
        h.flush()
        assert h.pread(len(data), 12345) == data
        close_quietly(h)
        snapctl("create", "over-tls", disk=disk, env=env, check=True)
        s = tls_client(port, "live@over-tls", psk)
        assert s.is_read_only() and s.pread(len(data), 12345) == data
        close_quietly(s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, f"serve exited {proc.returncode}"
    assert snapctl_json("info", disk=disk, env=env)["snapshot_count"] == 1
