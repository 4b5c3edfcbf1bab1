"""snapctl: manage a dittofs pool (click commands over fsimpl.client; rich output).

The engine decides; the command modules parse arguments, call client operations and render the
result: rich tables on a terminal, plain tab-separated text when piped, JSON with --json.
"""

from __future__ import annotations

from . import pool_cmds, snapshot_cmds  # noqa: F401  (they register their commands)
from .app import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
