"""snapctl snapshot commands: create, list, delete, rename, hold, release, rollback, diff, du,
prune. Each parses its arguments, makes one or a few client calls and renders the answer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from fsimpl.errors import InvalidArgument, NotFound, Refused

from .app import Context, complete_snapshot, main, run
from .render import COLUMNS, Renderer, deferred_note, human_size, json_rows

VOLUME_OPTION = click.option(
    "--volume", default="live", show_default=True, metavar="V", help="The volume to act on."
)


# --- create --------------------------------------------------------------------------------------


@contextmanager
def frozen(mountpoints: tuple[str, ...]) -> Iterator[None]:
    """fsfreeze the mounted file systems for the duration; always thaw, even on Ctrl-C or
    SIGTERM, and even when freezing one of them fails."""
    done: list[str] = []

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, interrupted)
    try:
        for mp in mountpoints:
            cp = subprocess.run(["fsfreeze", "--freeze", mp], capture_output=True, text=True)
            if cp.returncode != 0:
                raise Refused(
                    f"cannot freeze {mp}: {cp.stderr.strip() or 'fsfreeze failed'}; "
                    "is it a mounted file system?"
                )
            done.append(mp)
        yield
    finally:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not
        try:  # leave a file system frozen
            for mp in reversed(done):
                subprocess.run(["fsfreeze", "--unfreeze", mp], capture_output=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


@main.command(epilog="Example: snapctl -d pool.img create nightly-1 --freeze /mnt/data")
@click.argument("name")
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    metavar="V",
    help="Snapshot only these volumes (default: all of them, atomically).",
)
@click.option(
    "--freeze",
    "freeze",
    multiple=True,
    metavar="MOUNTPOINT",
    help="fsfreeze this mounted file system around the snapshot (repeatable).",
)
@click.option("--writable", is_flag=True, help="Export it read-write (see 'snapctl set').")
@click.option("--json", "as_json", is_flag=True, help="Print the new snapshot as JSON.")
@click.pass_obj
def create(
    obj: Context,
    name: str,
    volumes: tuple[str, ...],
    freeze: tuple[str, ...],
    writable: bool,
    as_json: bool,
) -> None:
    """Create snapshot NAME of every volume at one point in time, or of the --volume ones
    (O(1): nothing is copied)."""

    def body() -> None:
        args: dict[str, Any] = {"name": name, "writable": writable}
        if volumes:
            args["volumes"] = list(volumes)
        with obj.client() as c, frozen(freeze):
            snap = c.call("create", args)
        if as_json:
            click.echo(json.dumps(snap))
        else:
            click.echo(f"created snapshot {snap['name']} (id {snap['id']})")

    run(body)


# --- list ----------------------------------------------------------------------------------------


@main.command("list", epilog="Example: snapctl -d pool.img list -o name,used,created -s used")
@click.option("--json", "as_json", is_flag=True, help="A JSON array; sizes in bytes.")
@click.option("-H", "no_header", is_flag=True, help="No header, tab-separated (for scripts).")
@click.option("-p", "parsable", is_flag=True, help="Exact byte counts and epoch seconds.")
@click.option(
    "-o", "columns", metavar="COLUMNS", help=f"Comma-separated columns: {','.join(COLUMNS)}."
)
@click.option("-s", "sort", metavar="COLUMN", help="Sort by this column (ascending).")
@click.option("-S", "rsort", metavar="COLUMN", help="Sort by this column (descending).")
@click.pass_obj
def list_cmd(
    obj: Context,
    as_json: bool,
    no_header: bool,
    parsable: bool,
    columns: str | None,
    sort: str | None,
    rsort: str | None,
) -> None:
    """List snapshots: used (freed if deleted alone), referenced, written, holds."""

    def body() -> None:
        cols = (
            columns.split(",")
            if columns
            else ["name", "id", "created", "used", "referenced", "written", "holds"]
        )
        for col in [*cols, *(x for x in (sort, rsort) if x)]:
            if col not in COLUMNS:
                raise InvalidArgument(f"unknown column '{col}'; columns: {', '.join(COLUMNS)}")
        with obj.client() as c:
            snaps: list[dict[str, Any]] = c.call("list")
            human = not (as_json or parsable or no_header) and sys.stdout.isatty()
            pool = c.call("info") if human else None  # a footer for a person, not a script
        for key, reverse in ((sort, False), (rsort, True)):
            if key:
                field = COLUMNS[key][0]
                snaps.sort(key=lambda s: (s[field] is None, s[field]), reverse=reverse)
        if as_json:
            click.echo(json_rows(snaps))
        else:
            Renderer(no_header=no_header, parsable=parsable).table(cols, snaps)
        if pool is not None:
            click.echo(
                f"pool: {human_size(pool['free_bytes'])} free; being freed: "
                + deferred_note(pool["deferred_free_bytes"])
            )

    run(body)


# --- delete, rename, holds -----------------------------------------------------------------------


@main.command(epilog="Example: snapctl -d pool.img delete nightly-1 nightly-2 --dry-run")
@click.argument("names", nargs=-1, required=True, shell_complete=complete_snapshot)
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be freed; delete nothing.")
@click.option("--if-exists", is_flag=True, help="A missing snapshot is not an error.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def delete(
    obj: Context, names: tuple[str, ...], dry_run: bool, if_exists: bool, as_json: bool
) -> None:
    """Delete snapshots; their blocks go to the next older snapshot or become free.

    All or nothing: every name is checked before anything is deleted. Sizes are the data each
    delete frees, in the order given.
    """

    def body() -> None:
        args = {"names": list(names), "dry_run": dry_run, "if_exists": if_exists}
        with obj.client() as c, Renderer().progress("deleting") as advance:
            r = c.call("delete", args, advance)
        if as_json:
            click.echo(json.dumps(r["results"]))
            return
        for res in r["results"]:
            if res["missing"]:
                click.echo(f"{res['name']}: no such snapshot (skipped)")
                continue
            verb, free = ("would delete", "free") if dry_run else ("deleted", "freed")
            click.echo(f"{verb} {res['name']}, {free} {human_size(res['freed_bytes'])}")
        if len(r["results"]) > 1:
            click.echo(
                f"{'would free' if dry_run else 'freed'} {human_size(r['freed_bytes'])} in all"
            )

    run(body)


@main.command(epilog="Example: snapctl -d pool.img rename nightly-1 before-upgrade")
@click.argument("old", shell_complete=complete_snapshot)
@click.argument("new")
@click.pass_obj
def rename(obj: Context, old: str, new: str) -> None:
    """Rename snapshot OLD to NEW (open connections keep working)."""

    def body() -> None:
        with obj.client() as c:
            c.call("rename", {"old": old, "new": new})
        click.echo(f"renamed {old} to {new}")

    run(body)


@main.command(epilog="Example: snapctl -d pool.img hold before-upgrade --tag backup")
@click.argument("name", shell_complete=complete_snapshot)
@click.option("--tag", default="hold", show_default=True, help="The hold's name.")
@click.pass_obj
def hold(obj: Context, name: str, tag: str) -> None:
    """Hold a snapshot: delete, prune and rollback --destroy-newer refuse it until released."""

    def body() -> None:
        with obj.client() as c:
            r = c.call("hold", {"name": name, "tag": tag})
        click.echo(f"{name}: held ({', '.join(r['holds'])})")

    run(body)


@main.command(epilog="Example: snapctl -d pool.img release before-upgrade --tag backup")
@click.argument("name", shell_complete=complete_snapshot)
@click.option("--tag", default="hold", show_default=True, help="The hold to release.")
@click.pass_obj
def release(obj: Context, name: str, tag: str) -> None:
    """Release a hold on a snapshot."""

    def body() -> None:
        with obj.client() as c:
            r = c.call("release", {"name": name, "tag": tag})
        left = ", ".join(r["holds"])
        click.echo(f"{name}: released '{tag}'" + (f" (still held: {left})" if left else ""))

    run(body)


# --- rollback ------------------------------------------------------------------------------------


@main.command(epilog="Example: snapctl -d pool.img rollback before-upgrade --destroy-newer --yes")
@click.argument("name", shell_complete=complete_snapshot)
@VOLUME_OPTION
@click.option("--destroy-newer", is_flag=True, help="Delete the snapshots newer than NAME.")
@click.option(
    "--force",
    is_flag=True,
    help="Even with clients connected (their requests fail until they reconnect).",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def rollback(
    obj: Context, name: str, volume: str, destroy_newer: bool, force: bool, yes: bool
) -> None:
    """Make the volume exactly what snapshot NAME held, discarding the changes since."""

    def body() -> None:
        with obj.client() as c:
            if not yes:
                snaps = c.call("list")
                target = next((s for s in snaps if s["name"] == name), None)
                if target is None:
                    raise NotFound(f"no snapshot named '{name}'; 'snapctl list' shows them")
                newer = [
                    s["name"] for s in snaps if s["id"] > target["id"] and volume in s["volumes"]
                ]
                what = f"Roll back {volume} to {name}, discarding every change since"
                if newer and destroy_newer:
                    what += f" and destroying {', '.join(newer)}"
                if not sys.stdin.isatty():
                    raise InvalidArgument(f"{what}? Add --yes to confirm without a terminal")
                if not click.confirm(what + "?", default=False):
                    raise Refused("rollback cancelled")
            r = Renderer()
            with r.progress(f"rolling back to {name}") as advance:
                result = c.call(
                    "rollback",
                    {
                        "name": name,
                        "volume": volume,
                        "destroy_newer": destroy_newer,
                        "force": force,
                    },
                    advance,
                )
        gone = result.get("destroyed") or []
        click.echo(
            f"rolled {volume} back to {name}" + (f"; destroyed {', '.join(gone)}" if gone else "")
        )

    run(body)


# --- diff and du ---------------------------------------------------------------------------------


@main.command(epilog="Example: snapctl -d pool.img diff nightly-1 nightly-2 --json")
@click.argument("from_snap", metavar="FROM", shell_complete=complete_snapshot)
@click.argument("to_snap", metavar="[TO]", required=False, shell_complete=complete_snapshot)
@VOLUME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the ranges as JSON.")
@click.pass_obj
def diff(obj: Context, from_snap: str, to_snap: str | None, volume: str, as_json: bool) -> None:
    """Byte ranges that differ between two snapshots (TO: live), from the shadow maps alone."""

    def body() -> None:
        with obj.client() as c:
            r = c.call("diff", {"from": from_snap, "to": to_snap, "volume": volume})
        ranges = r["ranges"]
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "from": from_snap,
                        "to": to_snap or volume,
                        "volume": volume,
                        "ranges": [{"offset": o, "length": n} for o, n in ranges],
                        "changed_bytes": r["changed_bytes"],
                    }
                )
            )
            return
        for off, n in ranges:
            click.echo(f"{off}\t{n}")
        click.echo(
            f"{human_size(r['changed_bytes'])} changed in {len(ranges)} range(s) "
            f"between {from_snap} and {to_snap or volume}"
        )

    run(body)


@main.command(epilog="Example: snapctl -d pool.img du nightly-1%nightly-5")
@click.argument("span", metavar="[FROM%TO]", required=False)
@VOLUME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("-p", "parsable", is_flag=True, help="Exact byte counts.")
@click.pass_obj
def du(obj: Context, span: str | None, volume: str, as_json: bool, parsable: bool) -> None:
    """Space per snapshot and live; with FROM%TO, what deleting that range would free."""

    def body() -> None:
        args: dict[str, Any] = {"volume": volume}
        if span:
            a, sep, b = span.partition("%")
            if not a or (sep and not b):
                raise InvalidArgument("give a range as FROM%TO (or one snapshot name)")
            args["from"], args["to"] = a, b or a
        with obj.client() as c:
            r = c.call("du", args)
        if as_json:
            click.echo(json.dumps(r, indent=2))
            return
        Renderer(parsable=parsable).space(r)

    run(body)


# --- prune ---------------------------------------------------------------------------------------


@main.command(
    epilog="Example: snapctl -d pool.img prune --keep-last 3 --keep-daily 7 "
    "--prefix auto- --dry-run"
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=0),
    required=True,
    metavar="N",
    help="Keep the N newest snapshots.",
)
@click.option(
    "--keep-hourly",
    type=click.IntRange(min=0),
    default=0,
    metavar="H",
    help="Keep the newest snapshot of each of the last H hours that have one.",
)
@click.option(
    "--keep-daily",
    type=click.IntRange(min=0),
    default=0,
    metavar="D",
    help="Keep the newest snapshot of each of the last D days that have one.",
)
@click.option("--prefix", default="", metavar="P", help="Only snapshots whose names start so.")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would go and why; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@click.pass_obj
def prune(
    obj: Context,
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    prefix: str,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Delete old snapshots by a retention policy; held snapshots are always kept."""

    def body() -> None:
        with obj.client() as c:
            verdicts = c.call(
                "prune",
                {
                    "keep_last": keep_last,
                    "keep_hourly": keep_hourly,
                    "keep_daily": keep_daily,
                    "prefix": prefix,
                    "dry_run": dry_run,
                },
            )
        if as_json:
            click.echo(json.dumps(verdicts, indent=2))
            return
        for v in verdicts:
            if v["keep"]:
                click.echo(f"keep    {v['name']}: {'; '.join(v['reasons'])}")
            else:
                verb = "would delete" if dry_run else "deleted"
                click.echo(
                    f"{verb} {v['name']}: {'; '.join(v['reasons'])}, {human_size(v['freed_bytes'])}"
                )
        gone = sum(1 for v in verdicts if not v["keep"])
        click.echo(
            f"{'would delete' if dry_run else 'deleted'} {gone} of {len(verdicts)} snapshot(s)"
        )

    run(body)
