"""snapctl standby: replication to a standby pool, failover and failback (FIG. 15A-15D)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import click

from fsimpl.client import DirectClient, PoolClient
from fsimpl.errors import InvalidArgument, ServerUnavailable
from fsimpl.keys import read_psk
from fsimpl.standby import parse_address

from .app import Context, main, run
from .outfile import output_file
from .render import human_size

KEY = click.option(
    "--key-file",
    required=True,
    metavar="KEY",
    help="PSK file (identity:hexkey), the same on both pools.",
)
ME = click.option(
    "--me",
    metavar="HOST:PORT",
    help="This pool's own replication endpoint, for the peer to reach back "
    "(default: the endpoint this pool's server runs).",
)


def _auth(key_file: str) -> dict[str, Any]:
    identity, key = read_psk(key_file)
    return {"identity": identity, "key": key.hex()}


@main.group(epilog="Example: snapctl -d pool.img standby attach 10.0.0.2:10810 --key-file k.psk")
def standby() -> None:
    """Keep a standby pool current from snapshot diffs; fail over and back."""


@standby.command(
    "serve",
    epilog="Example: snapctl -d b.img standby serve --listen 0.0.0.0:10810 "
    "--key-file k.psk --background",
)
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where peers connect.")
@KEY
@click.option("--background", is_flag=True, help="Return once the endpoint answers.")
@click.option("--pid-file", metavar="FILE", help="With --background: write its PID here.")
@click.pass_obj
def standby_serve(
    obj: Context, listen: str, key_file: str, background: bool, pid_file: str | None
) -> None:
    """Run this pool's replication endpoint (inside its server, when one runs)."""

    def body() -> None:
        auth = _auth(key_file)
        with obj.client() as c:
            if c.mode == "server":
                r = c.call("standby_serve", {"listen": listen, **auth})
                click.echo(
                    f"replication endpoint of {obj.disk} listening on {r['listen']} "
                    "(inside its server)"
                )
                return
        if background:
            _spawn(obj, listen, key_file, pid_file)
            return
        assert obj.disk
        client = obj.client()
        assert isinstance(client, DirectClient)
        from fsimpl.standby import ReplicationEndpoint

        ep = ReplicationEndpoint(
            client.engine,
            listen,
            auth["identity"],
            bytes.fromhex(auth["key"]),
            lambda m: click.echo(m, err=True),
        )
        ep.start()
        if pid_file:
            with open(pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        click.echo(f"replication endpoint of {obj.disk} listening on {ep.address}", err=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"]:
                client.engine.tick()
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            ep.stop()
            client.close()

    run(body)


def _spawn(obj: Context, listen: str, key_file: str, pid_file: str | None) -> None:
    cmd = [
        sys.argv[0],
        "-d",
        str(obj.disk),
        "standby",
        "serve",
        "--listen",
        listen,
        "--key-file",
        key_file,
    ]
    if pid_file:
        cmd += ["--pid-file", pid_file]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    host, port = parse_address(listen)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerUnavailable(
                f"the endpoint exited ({proc.returncode}); run it in the foreground to see why"
            )
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            click.echo(f"replication endpoint of {obj.disk} listening on {listen} (pid {proc.pid})")
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise ServerUnavailable(f"the endpoint did not start listening on {listen}")


def _call(obj: Context, op: str, args: dict[str, Any], fd: int | None = None) -> Any:
    client: PoolClient
    with obj.client() as client:
        return client.call(op, args, None, fd)


@standby.command(
    "attach", epilog="Example: snapctl -d a.img standby attach 10.0.0.2:10810 --key-file k.psk"
)
@click.argument("address", metavar="HOST:PORT")
@KEY
@ME
@click.option("--force", is_flag=True, help="Overwrite a peer that holds data of its own.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def standby_attach(
    obj: Context, address: str, key_file: str, me: str | None, force: bool, as_json: bool
) -> None:
    """Make the pool at HOST:PORT this pool's standby and bring it up to date."""

    def body() -> None:
        r = _call(
            obj, "standby_attach", {"address": address, "me": me, "force": force, **_auth(key_file)}
        )
        if as_json:
            click.echo(json.dumps(r))
            return
        how = f"the change since {r['base']}" if r["base"] else "everything (no common snapshot)"
        click.echo(f"{address} is now the standby: sent {how} up to {r['snapshot']}")

    run(body)


@standby.command("sync", epilog="Example: snapctl -d a.img standby sync --every 5m --key-file k")
@KEY
@click.option("--every", metavar="INTERVAL", help="Keep syncing at this interval (30s, 5m, 1h).")
@click.option("--json", "as_json", is_flag=True, help="Print each round as JSON.")
@click.pass_obj
def standby_sync(obj: Context, key_file: str, every: str | None, as_json: bool) -> None:
    """Snapshot, send the change since the last common snapshot, retire older ones."""

    def body() -> None:
        period = _interval(every) if every else None
        while True:
            t0 = time.monotonic()
            r = _call(obj, "standby_sync", _auth(key_file))
            if as_json:
                click.echo(json.dumps(r))
            else:
                click.echo(f"synced {r['snapshot']} (from {r['base']}) in {r['seconds']}s")
            if period is None:
                return
            time.sleep(max(0.0, period - (time.monotonic() - t0)))

    run(body)


def _interval(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise InvalidArgument(f"'{text}' is not an interval: use e.g. 30s, 5m, 1h") from None


@standby.command("status", epilog="Example: snapctl -d a.img standby status --json")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option(
    "--key-file",
    metavar="KEY",
    help="Also ask the peer (a primary learns whether it was superseded).",
)
@click.pass_obj
def standby_status(obj: Context, as_json: bool, key_file: str | None) -> None:
    """Role, peer, last common snapshot and how far live has moved since (lag)."""

    def body() -> None:
        r = _call(obj, "standby_status", _auth(key_file) if key_file else {})
        if as_json:
            click.echo(json.dumps(r, indent=2))
            return
        lines = [
            ("role", r["role"] + (" (superseded by its peer)" if r["superseded"] else "")),
            ("peer", r["peer"] or "-"),
            ("endpoint", r["endpoint"] or "-"),
            ("last common", r["last_common"] or "-"),
        ]
        if r["lag_bytes"] is not None:
            lines.append(("lag", f"{human_size(r['lag_bytes'])}, {r['lag_seconds']}s"))
        for k, v in lines:
            click.echo(f"{k:<12} {v}")

    run(body)


@standby.command("promote", epilog="Example: snapctl -d b.img standby promote --key-file k.psk")
@KEY
@click.option("--force", is_flag=True, help="Even if the old primary still answers.")
@click.pass_obj
def standby_promote(obj: Context, key_file: str, force: bool) -> None:
    """Failover: restore the last complete snapshot and become primary."""

    def body() -> None:
        r = _call(obj, "standby_promote", {"force": force, **_auth(key_file)})
        click.echo(
            f"this pool is now the primary (live restored to {r['restored']}); clients "
            "reconnect to write"
        )

    run(body)


@standby.command(
    "demote",
    epilog="Example: snapctl -d a.img standby demote --save-diverged lost.stream --key-file k.psk",
)
@KEY
@click.option(
    "--save-diverged", metavar="FILE", help="First save the change it discards, as a stream file."
)
@click.pass_obj
def standby_demote(obj: Context, key_file: str, save_diverged: str | None) -> None:
    """Rejoin as standby: roll live back to the last snapshot the peer acknowledged."""

    def body() -> None:
        auth = _auth(key_file)
        if save_diverged:
            with output_file(save_diverged) as fd:
                r = _call(obj, "standby_demote", auth, fd)
        else:
            r = _call(obj, "standby_demote", auth, None)
        click.echo(
            f"this pool is now a standby at {r['restored']}; discarded "
            f"{human_size(r['discarded_bytes'])}"
            + (f" (saved to {save_diverged})" if r["saved"] else "")
        )

    run(body)


@standby.command("failback", epilog="Example: snapctl -d b.img standby failback --key-file k")
@KEY
@ME
@click.option("--force", is_flag=True, help="Even with writers connected (live goes read-only).")
@click.pass_obj
def standby_failback(obj: Context, key_file: str, me: str | None, force: bool) -> None:
    """Hand the primary role back to the peer: final snapshot, send, swap roles."""

    def body() -> None:
        r = _call(obj, "standby_failback", {"force": force, "me": me, **_auth(key_file)})
        click.echo(
            f"handed over to {r['peer']} after sending {r['final']}; this pool is now its standby"
        )

    run(body)
