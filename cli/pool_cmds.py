"""snapctl pool commands: format, info and check."""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

import click

from fsimpl import rundir
from fsimpl.errors import DittoError, InvalidArgument, NotFound, Refused
from fsimpl.layout import DEFAULT_BLOCK_SIZE, DEFAULT_METADATA_COPIES

from .app import Context, main, run
from .render import Renderer, human_size, parse_size

# The engine and the checker are imported by the commands that open the disk themselves, not
# here: every snapctl command imports this module, and one served by a running server should
# not pay the fifth of a second the engine takes to import.


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
@click.option(
    "--checksum",
    is_flag=True,
    help="Keep a checksum of every 4 KiB of data, verified on every read (see scrub).",
)
@click.option(
    "--metadata-copies",
    type=click.IntRange(1, 2),
    default=DEFAULT_METADATA_COPIES,
    show_default=True,
    help="Copies of every metadata block, far apart: with 2, a bad copy is served from the "
    "other and rewritten.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def format_cmd(
    disk: str,
    size: str | None,
    block_size: str,
    force: bool,
    checksum: bool,
    metadata_copies: int,
    as_json: bool,
) -> None:
    """Make a pool on DISK: a block device, a partition or an image file (created if missing)."""

    def body() -> None:
        from fsimpl.engine import Engine

        result: dict[str, Any] = Engine.format(
            disk,
            parse_size(size) if size else None,
            parse_size(block_size),
            force,
            checksum,
            metadata_copies,
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


@main.command(epilog="Example: snapctl upgrade pool.img")
@click.argument("disk")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def upgrade(disk: str, as_json: bool) -> None:
    """Upgrade the pool on DISK to this release's format, in place (stop its server first).

    Only metadata is rewritten, copy-on-write: a crash leaves the old pool or the new one."""

    def body() -> None:
        from fsimpl.engine import Engine

        result = Engine.upgrade(disk)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(
            f"upgraded {disk} from format version {result['from_version']} to "
            f"{result['to_version']} ({result['metadata_blocks_rewritten']} metadata blocks "
            "rewritten, data untouched)"
        )

    run(body)


@main.command(
    epilog="Example: snapctl -d pool.img rewind --list; snapctl -d pool.img rewind 41 --yes"
)
@click.argument("generation", type=click.IntRange(1), required=False)
@click.option("--list", "list_", is_flag=True, help="Show the generations the pool can open at.")
@click.option("--yes", is_flag=True, help="Really rewind: what was committed after is lost.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def rewind(obj: Context, generation: int | None, list_: bool, yes: bool, as_json: bool) -> None:
    """Open the pool at an earlier committed generation, when its newest state is damaged.

    The last two generations before the newest are kept whole (their freed blocks wait two
    commits); older ones are offered once their metadata verifies. A rewind commits the chosen
    state as the newest and discards what came after. Needs the server stopped."""

    def body() -> None:
        disk = obj.disk
        if not disk:
            raise NotFound("no pool given: use -d DISK (or set DITTOFS_DISK)")
        if list_ == (generation is not None):
            raise InvalidArgument("give either --list or a GENERATION (see 'rewind --list')")
        if list_:
            from fsimpl.engine import Engine

            found = Engine.rewind_list(disk)
            if as_json:
                click.echo(json.dumps(found, indent=2))
                return
            Renderer().rows(
                ["GENERATION", "COMMITTED", "STATUS", "DETAIL"],
                [
                    [str(g["generation"]), str(g["commit_time"]), str(g["status"]),
                     str(g["detail"])]
                    for g in found
                ],
            )  # fmt: skip
            return
        if not yes:
            raise Refused(
                f"rewinding to generation {generation} discards everything committed after it: "
                "add --yes to do it"
            )
        assert generation is not None
        from fsimpl.engine import Engine

        result = Engine.rewind(disk, generation)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(f"{disk}: {result['summary']}")

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


@main.command(epilog="Example: snapctl -d pool.img check --repair")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what can be fixed without guessing (leaked blocks, free-map mismatches, "
    "counters, a bad superblock slot), as one new commit. Needs the server stopped.",
)
@click.pass_obj
def check(obj: Context, as_json: bool, repair: bool) -> None:
    """Verify the pool's committed state: checksums, ownership, free space, snapshot sharing.

    Through the running server if there is one, else on the disk itself (read-only, under the
    pool's lock). Exit codes as fsck's: 0 clean, 1 errors found and all corrected (by
    --repair, or healed by the running server from a metadata block's good copy), 4 errors left
    uncorrected: fatal ones, or harmless ones (leaks; a bad metadata copy whose twin is good,
    "healable": nothing is lost, scrub or --repair rewrites it), 8 the check could not run (no
    pool, unknown format, server busy or unreachable).
    """
    try:
        code = _check(obj, as_json, repair)
    except DittoError as e:
        if obj.debug:
            traceback.print_exc()
        click.echo(f"snapctl: {e}", err=True)
        sys.exit(8)  # fsck's "operational error": the check itself could not run
    except KeyboardInterrupt:
        click.echo("snapctl: interrupted", err=True)
        sys.exit(130)
    sys.exit(code)


def _check(obj: Context, as_json: bool, repair: bool) -> int:
    disk = obj.disk
    control = obj.control
    state = rundir.read_state(disk) if disk and not control else None
    if control or (state and state.get("control")):
        if repair:
            pid = f"process {state['pid']}" if state and state.get("pid") else "a server"
            raise Refused(
                f"the pool is being served by {pid}: --repair needs the pool to itself. "
                "Stop the server first (then run 'snapctl -d DISK check --repair'); "
                "'snapctl check' without --repair checks it through the server"
            )
        with obj.client() as c:
            report: dict[str, Any] = c.call("check")
        _show_report(report, as_json)
        if not report["clean"]:
            return 4
        return 1 if report.get("healed") else 0  # fsck's 1: errors found, all corrected
    if not disk:
        raise NotFound("no pool given: use -d DISK (or set DITTOFS_DISK)")
    from fsimpl import checker

    if not repair:
        report = checker.report_json(checker.check_disk(disk))
        _show_report(report, as_json)
        return 0 if report["clean"] else 4
    result = checker.repair_disk(disk)
    if as_json:
        click.echo(json.dumps(result.json(), indent=2))
        return result.exit_code
    for d in result.before.defects:
        click.echo(f"{'ERROR' if d.fatal else 'warning'}: {d.message}")
    for line in result.fixed:
        click.echo(f"fixed: {line}")
    for d in result.after.defects:
        click.echo(f"not fixed: {d.message}")
    stats = result.after.stats
    if result.exit_code == 0:
        verdict = "clean, nothing to repair"
    elif result.exit_code == 1:
        verdict = f"repaired: {len(result.before.defects)} defect(s) corrected, now clean"
    else:
        verdict = f"{len(result.after.defects)} defect(s) left uncorrected" + (
            " (nothing was changed)" if not result.fixed else ""
        )
    click.echo(f"{verdict}: {_summary(stats)}")
    return result.exit_code


def _summary(stats: dict[str, Any]) -> str:
    return (
        f"{stats.get('volumes', 0)} volume(s), {stats.get('snapshots', 0)} snapshot(s), "
        f"{stats.get('metadata_blocks', 0)} metadata blocks, "
        f"{stats.get('owned_blocks', 0)} blocks in use"
    )


def _show_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for d in report["defects"]:
        click.echo(f"{'ERROR' if d['fatal'] else 'warning'}: {d['message']}")
    healed = report.get("healed", 0)
    if report["clean"]:
        verdict = "clean"
        if healed:
            verdict += f" ({healed} damaged metadata copies healed by the server)"
    elif report.get("healable") and not report["fatal"]:
        verdict = (
            f"{len(report['defects'])} defect(s), {report['healable']} healable (a bad metadata "
            "copy beside a good one: nothing lost; 'snapctl scrub' or 'check --repair' heals)"
        )
    elif not report["fatal"]:
        verdict = f"{len(report['defects'])} harmless defect(s) ('snapctl check --repair' fixes)"
    else:
        verdict = f"{len(report['defects'])} defect(s), {report['fatal']} fatal"
    click.echo(f"{verdict}: {_summary(report['stats'])}")


@main.command(epilog="Example: snapctl -d pool.img tune snapshot-min-free=10G")
@click.argument("settings", nargs=-1, metavar="[snapshot-min-free=SIZE]")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@click.pass_obj
def tune(obj: Context, settings: tuple[str, ...], as_json: bool) -> None:
    """Show or change pool settings. snapshot-min-free: below this much free space, new
    snapshots are refused (live writes go on), so snapshots cannot eat the last space."""

    def body() -> None:
        args: dict[str, Any] = {}
        for item in settings:
            key, sep, value = item.partition("=")
            if key != "snapshot-min-free" or not sep:
                raise InvalidArgument(f"unknown setting '{item}': use snapshot-min-free=SIZE")
            args["snapshot_min_free"] = parse_size(value)
        with obj.client() as c:
            r = c.call("tune", args)
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(
                f"snapshot-min-free={human_size(r['snapshot_min_free'])} "
                f"(free now: {human_size(r['free_bytes'])})"
            )

    run(body)


@main.command(
    epilog="Example: snapctl -d pool.img scrub --rate 50M; snapctl -d pool.img scrub --status"
)
@click.option("--rate", help="Bytes per second the scrub may read (default: as fast as it can).")
@click.option("--status", is_flag=True, help="Show where the scrub is and what it found.")
@click.option("--stop", is_flag=True, help="Stop the running scrub ('scrub' resumes it).")
@click.option("--wait", is_flag=True, help="Wait until the scrub is done, showing progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def scrub(
    obj: Context, rate: str | None, status: bool, stop: bool, wait: bool, as_json: bool
) -> None:
    """Verify both copies of every metadata block, rewriting a bad copy from its good twin;
    then read every data block of live and every snapshot, and with data checksums (format
    --checksum) verify each.

    With a server it runs in the background, in small steps between requests, and resumes
    where it was after --stop or a restart; with no server it runs here, start to end. Exit 4
    if anything is damaged beyond healing."""

    def body() -> None:
        if sum((status, stop)) + bool(rate) > 1 or (wait and (status or stop)):
            raise InvalidArgument("give one of --status, --stop, or a scrub to start")
        with obj.client() as c:
            if c.mode == "direct":
                if status or stop:
                    raise NotFound("no server is running this pool, so no scrub is running")
                with Renderer().progress("scrubbing") as advance:
                    show_direct(c.call("scrub", {}, advance), as_json)
                return
            if status:
                r = c.call("scrub_status")
            elif stop:
                r = c.call("scrub_stop")
            else:
                r = c.call("scrub_start", {"rate": parse_size(rate) if rate else 0})
                while wait and r["state"] == "running":
                    time.sleep(0.2)
                    r = c.call("scrub_status")
        show_status(r, as_json)
        if r["errors"]:
            sys.exit(4)

    def show_direct(r: dict[str, Any], as_json: bool) -> None:
        if as_json:
            click.echo(json.dumps(r, indent=2))
        else:
            for m in r["metadata_lost"]:
                click.echo(f"ERROR: {m['tree']}: {m['error']}")
            for b in r["bad"]:
                click.echo(f"ERROR: {b['map']} block {b['block']}: {b['error']}")
            click.echo(
                f"{r['metadata_blocks']} metadata blocks verified (every copy); "
                f"{r['metadata_healed']} bad copies healed; {len(r['metadata_lost'])} lost"
            )
            how = "verified" if r["checksums"] else "read (no data checksums on this pool)"
            click.echo(
                f"{r['blocks']} data blocks ({human_size(r['bytes'])}) {how}; "
                f"{len(r['bad'])} damaged"
            )
        if r["bad"] or r["metadata_lost"]:
            sys.exit(4)

    def show_status(r: dict[str, Any], as_json: bool) -> None:
        if as_json:
            click.echo(json.dumps(r, indent=2))
            return
        for what in r["found"]:
            click.echo(f"ERROR: {what}")
        rate = f", at most {human_size(r['rate'])}/s" if r["rate"] else ""
        click.echo(
            f"scrub {r['state']} ({r['pass']} pass{rate}): {human_size(r['bytes'])} verified, "
            f"{r['healed']} bad copies healed, {r['errors']} damaged beyond healing"
        )

    run(body)
