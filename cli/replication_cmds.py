"""snapctl send and receive: replication streams over files and pipes (like zfs send/recv)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import click

from fsimpl.errors import InvalidArgument
from fsimpl.keys import read_psk

from .app import Context, complete_snapshot, main, run
from .outfile import output_file
from .render import Renderer, human_size

KEY_OPTION = click.option(
    "--key-file", metavar="KEY", help="PSK file (identity:hexkey): MAC every record with it."
)


def _key(key_file: str | None) -> dict[str, Any]:
    return {"key": read_psk(key_file)[1].hex()} if key_file else {}


@main.command(epilog="Example: snapctl -d a.img send --from s1 s2 | snapctl -d b.img receive")
@click.argument("snapshot", required=False, shell_complete=complete_snapshot)
@click.option(
    "--from",
    "from_snap",
    metavar="SNAP",
    shell_complete=complete_snapshot,
    help="Send only the change since SNAP (incremental).",
)
@click.option("-o", "--output", metavar="FILE", help="Write the stream here, not to stdout.")
@click.option("-n", "--dry-run", is_flag=True, help="Print the size the stream would have.")
@click.option("--resume", metavar="TOKEN", help="Send the rest of an interrupted stream.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (to stderr).")
@KEY_OPTION
@click.pass_obj
def send(
    obj: Context,
    snapshot: str | None,
    from_snap: str | None,
    output: str | None,
    dry_run: bool,
    resume: str | None,
    as_json: bool,
    key_file: str | None,
) -> None:
    """Write a replication stream of SNAPSHOT (the change since --from, or all of it)."""

    def body() -> None:
        if not snapshot and not resume:
            raise InvalidArgument("name the snapshot to send (or give --resume TOKEN)")
        if dry_run:
            with obj.client() as c:
                r = c.call("send_size", {"from": from_snap, "to": snapshot})
            if as_json:
                click.echo(json.dumps(r))
            else:
                click.echo(
                    f"would send {human_size(r['stream_bytes'])} ({r['records']} records, "
                    f"{human_size(r['data_bytes'])} of data, {r['hole_blocks']} hole "
                    "blocks)"
                )
            return
        if output is None and sys.stdout.isatty():
            raise InvalidArgument("the stream is binary: redirect stdout or give -o FILE")
        args = {"from": from_snap, "to": snapshot, "resume": resume, **_key(key_file)}
        out = output_file(output) if output else contextlib.nullcontext(1)
        with out as fd, obj.client() as c:
            r = c.call("send", args, None, fd)
        msg = json.dumps(r) if as_json else f"sent {r['records']} records, {r['blocks']} blocks"
        click.echo(msg, err=True)

    run(body)


@main.command(
    epilog="Example: snapctl -d b.img receive -i s2.stream "
    "(or: ssh a snapctl -d a.img send s2 | snapctl -d b.img receive)"
)
@click.option("-i", "--input", "input_", metavar="FILE", help="Read the stream here, not stdin.")
@click.option("--force", is_flag=True, help="Let a full stream overwrite volumes with data.")
@click.option(
    "--resume-token",
    "token",
    is_flag=True,
    help="Print the token of an interrupted receive (for send --resume).",
)
@click.option("--abort", is_flag=True, help="Discard an interrupted receive.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@KEY_OPTION
@click.pass_obj
def receive(
    obj: Context,
    input_: str | None,
    force: bool,
    token: bool,
    abort: bool,
    as_json: bool,
    key_file: str | None,
) -> None:
    """Apply a replication stream, then create its snapshot (same name and GUID)."""

    def body() -> None:
        with obj.client() as c:
            if token:
                t = c.call("resume_token")["token"]
                if t is None:
                    raise InvalidArgument("no receive is in progress: nothing to resume")
                click.echo(t)
                return
            if abort:
                r = c.call("receive_abort")
                click.echo(f"discarded the partial receive of {r['discarded']}")
                return
            if input_ is None and sys.stdin.isatty():
                raise InvalidArgument("pipe a stream in (snapctl send ... |) or give -i FILE")
            fd = os.open(input_, os.O_RDONLY) if input_ else 0
            try:
                with Renderer().progress("receiving") as advance:
                    r = c.call("receive", {"force": force, **_key(key_file)}, advance, fd)
            finally:
                if input_:
                    os.close(fd)
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(f"received snapshot {r['name']} ({r['guid']}) of {', '.join(r['volumes'])}")

    run(body)
