"""snapctl pool commands: format and info."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from fsimpl import rundir
from fsimpl.engine import Engine
from fsimpl.layout import DEFAULT_BLOCK_SIZE

from .app import Context, main, run
from .render import Renderer, human_size, parse_size


@main.command("format", epilog="Example: snapctl format pool.img --size 10G")
@click.argument("disk")
@click.option("--size", help="Size of the live volume (default: the device's size).")
@click.option(
    "--block-size",
    default=str(DEFAULT_BLOCK_SIZE),
    show_default=True,
    help="Pool block size, a power of two from 4K to 1M.",
)
@click.option("--force", is_flag=True, help="Overwrite a disk that holds a file system or pool.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def format_cmd(disk: str, size: str | None, block_size: str, force: bool, as_json: bool) -> None:
    """Make a pool on DISK: a block device, a partition or an image file (created if missing)."""

    def body() -> None:
        result = Engine.format(
            disk, parse_size(size) if size else None, parse_size(block_size), force
        )
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(
            f"formatted {disk}: live volume {human_size(int(result['live_size']))}, "
            f"block size {human_size(int(result['block_size']))}"
            + (" (image file, grows on demand)" if result["growable"] else "")
        )

    run(body)


@main.command(epilog="Example: snapctl -d pool.img info --json")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def info(obj: Context, as_json: bool) -> None:
    """Show the pool: size, block size, used and free space, snapshots, server and sockets."""

    def body() -> None:
        with obj.client() as c:
            data: dict[str, Any] = c.call("info")
            data["mode"] = c.mode
        state = rundir.read_state(obj.disk) if obj.disk and data["mode"] == "server" else None
        if state:
            data["control_socket"] = state.get("control")
            data["nbd"] = state.get("nbd")
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            Renderer().pool_info(data)

    run(body)


@main.command(epilog="Example: snapctl -d pool.img check --json")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def check(obj: Context, as_json: bool) -> None:
    """Verify the pool's committed state: checksums, ownership, free space, snapshot sharing.

    Exit 0 when clean, 4 when it found defects (leaks alone are reported but harmless),
    8 when the check could not run.
    """

    def body() -> None:
        with obj.client() as c:
            report = c.call("check")
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            for d in report["defects"]:
                click.echo(f"{'ERROR' if d['fatal'] else 'warning'}: {d['message']}")
            stats = report["stats"]
            verdict = "clean" if report["clean"] else f"{len(report['defects'])} defect(s)"
            click.echo(
                f"{verdict}: {stats.get('volumes', 0)} volume(s), "
                f"{stats.get('snapshots', 0)} snapshot(s), "
                f"{stats.get('metadata_blocks', 0)} metadata blocks, "
                f"{stats.get('owned_blocks', 0)} blocks in use"
            )
        if not report["clean"]:
            sys.exit(4)

    try:
        run(body)
    except SystemExit as e:
        if e.code not in (0, 4, None):
            sys.exit(8)  # fsck's "operational error": the check itself could not run
        raise
