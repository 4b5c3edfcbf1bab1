"""snapctl: manage a dittofs pool (click commands over fsimpl.client; rich output).

The engine decides; the command modules parse arguments, call client operations and render the
result: rich tables on a terminal, plain tab-separated text when piped, JSON with --json.
"""

from __future__ import annotations

import sys

import click

from . import (  # noqa: F401  (they register their commands)
    attach,
    pool_cmds,
    replication_cmds,
    serve,
    snapshot_cmds,
    standby_cmds,
    volume_cmds,
)
from .app import main

__all__ = ["entry", "main"]


def entry() -> None:
    """The console script: click's usage errors become one line too, like every other error."""
    try:
        code = main.main(standalone_mode=False)
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            click.echo(e.ctx.get_help())  # bare 'snapctl': the help, like click's default
            sys.exit(0)
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"snapctl: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("snapctl: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"snapctl: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    entry()
