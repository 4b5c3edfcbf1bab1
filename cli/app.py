"""The snapctl command group, its global options and the one place errors become exit codes."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import click
from click.shell_completion import CompletionItem

from fsimpl.client import PoolClient, connect
from fsimpl.errors import DittoError


class Context:
    def __init__(self, disk: str | None, control: str | None, debug: bool) -> None:
        self.disk = disk
        self.control = control
        self.debug = debug

    def client(self) -> PoolClient:
        return connect(self.disk, self.control)


def walk_commands(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """cmd and every command under it with its path of names, groups before their
    subcommands, by name: what the reference (docs/snapctl.md) and the contract test cover."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from walk_commands(cmd.commands[name], (*path, name))


def run(fn: Callable[[], None]) -> None:
    """Run a command body: a DittoError becomes one line on stderr and its exit code."""
    obj = click.get_current_context().find_object(Context)
    try:
        fn()
    except DittoError as e:
        if obj is not None and obj.debug:
            traceback.print_exc()
        click.echo(f"snapctl: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("snapctl: interrupted", err=True)
        sys.exit(130)


def complete_snapshot(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of snapshot names, asked of the pool (silent when it cannot)."""
    obj = ctx.find_object(Context)
    try:
        root = ctx.find_root()
        disk = obj.disk if obj else root.params.get("disk")
        control = obj.control if obj else root.params.get("control")
        with connect(disk, control) as c:
            names: list[Any] = c.call("names")
    except Exception:
        return []
    return [CompletionItem(n) for n in names if str(n).startswith(incomplete)]


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
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
    DISK directly under the same lock. Exit codes: 0 ok, 1 failed, 2 usage, 3 not found,
    4 refused.
    """
    ctx.obj = Context(disk, control, debug)
