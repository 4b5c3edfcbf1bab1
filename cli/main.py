"""snapctl: manage a dittofs pool (click commands over fsimpl.client; rich output).

The engine decides; this module parses arguments, calls one client operation and renders the
result: rich tables on a terminal, plain tab-separated text when piped, JSON with --json.
Engine errors become one line on stderr and an exit code (0 ok, 1 failed, 2 usage, 3 not found,
4 refused); --debug shows the traceback too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from fsimpl.client import PoolClient, connect
from fsimpl.engine import Engine
from fsimpl.errors import DittoError
from fsimpl.layout import DEFAULT_BLOCK_SIZE

from .render import Renderer, human_size, parse_size


class Context:
    def __init__(self, disk: str | None, control: str | None, debug: bool) -> None:
        self.disk = disk
        self.control = control
        self.debug = debug

    def client(self) -> PoolClient:
        return connect(self.disk, self.control)


def _run(ctx: click.Context, fn: Callable[[], None]) -> None:
    """Run a command body, turning DittoError into one line and an exit code."""
    debug = ctx.find_object(Context).debug if ctx.find_object(Context) else False
    try:
        fn()
    except DittoError as e:
        if debug:
            import traceback

            traceback.print_exc()
        click.echo(f"snapctl: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("snapctl: interrupted", err=True)
        sys.exit(130)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: snapctl -d pool.img create before-upgrade",
)
@click.option(
    "-d",
    "--disk",
    envvar="DITTOFS_DISK",
    metavar="DISK",
    help="The pool's disk or image file (or set DITTOFS_DISK).",
)
@click.option("--control", metavar="SOCKET", help="Talk to the server on this control socket.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option("0.1.0", prog_name="snapctl")
@click.pass_context
def main(ctx: click.Context, disk: str | None, control: str | None, debug: bool) -> None:
    """Snapshots of a plain disk: manage a dittofs pool.

    Commands talk to the pool's running server (found from DISK) or, with none running, open
    DISK directly under the same lock.
    """
    ctx.obj = Context(disk, control, debug)


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
@click.pass_context
def format_cmd(
    ctx: click.Context, disk: str, size: str | None, block_size: str, force: bool, as_json: bool
) -> None:
    """Make a pool on DISK: a block device, a partition or an image file (created if missing)."""

    def body() -> None:
        result = Engine.format(
            disk,
            parse_size(size) if size else None,
            parse_size(block_size),
            force,
        )
        if as_json:
            click.echo(json.dumps(result))
        else:
            click.echo(
                f"formatted {disk}: live volume {human_size(int(result['live_size']))}, "
                f"block size {human_size(int(result['block_size']))}"
                + (" (image file, grows on demand)" if result["growable"] else "")
            )

    _run(ctx, body)


@main.command(epilog="Example: snapctl -d pool.img create nightly-1")
@click.argument("name")
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    metavar="V",
    help="Snapshot only these volumes (default: all, atomically).",
)
@click.pass_obj
def create(obj: Context, name: str, volumes: tuple[str, ...]) -> None:
    """Create snapshot NAME of the pool's volumes (O(1): nothing is copied)."""

    def body() -> None:
        with obj.client() as c:
            args: dict[str, Any] = {"name": name}
            if volumes:
                args["volumes"] = list(volumes)
            snap = c.call("create", args)
        click.echo(f"created snapshot {snap['name']} (id {snap['id']})")

    _run(click.get_current_context(), body)


@main.command("list", epilog="Example: snapctl -d pool.img list -o name,used -s used")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, sizes in bytes.")
@click.option("-H", "no_header", is_flag=True, help="No header, tab-separated (for scripts).")
@click.option("-p", "parsable", is_flag=True, help="Exact byte counts and epoch times.")
@click.pass_obj
def list_cmd(obj: Context, as_json: bool, no_header: bool, parsable: bool) -> None:
    """List snapshots with their space: used (freed if deleted alone), referenced, written."""

    def body() -> None:
        with obj.client() as c:
            snaps = c.call("list")
        if as_json:
            click.echo(json.dumps(snaps, indent=2))
            return
        Renderer(no_header=no_header, parsable=parsable).snapshots(snaps)

    _run(click.get_current_context(), body)


@main.command(epilog="Example: snapctl -d pool.img delete nightly-1 nightly-2")
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def delete(obj: Context, names: tuple[str, ...]) -> None:
    """Delete snapshots; their blocks go to the next older snapshot or become free."""

    def body() -> None:
        with obj.client() as c:
            for name in names:
                r = Renderer()
                with r.progress(f"deleting {name}") as advance:
                    result = c.call("delete", {"name": name}, advance)
                click.echo(f"deleted {name}, freed {human_size(result['freed_bytes'])}")

    _run(click.get_current_context(), body)


@main.command(epilog="Example: snapctl -d pool.img info --json")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def info(obj: Context, as_json: bool) -> None:
    """Show the pool: size, block size, used and free space, snapshots, server."""

    def body() -> None:
        with obj.client() as c:
            data = c.call("info")
            data["mode"] = c.mode
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            Renderer().pool_info(data)

    _run(click.get_current_context(), body)


if __name__ == "__main__":  # pragma: no cover
    main()
