"""snapctl volume commands: volume create/list/resize/delete, clone, flatten, promote, set."""

from __future__ import annotations

import json
from typing import Any

import click

from fsimpl.errors import InvalidArgument

from .app import Context, complete_snapshot, main, run
from .render import Renderer, human_size, parse_size


@main.group(epilog="Example: snapctl -d pool.img volume create db --size 20G")
def volume() -> None:
    """Volumes of the pool: each is an export (NAME, NAME@SNAPSHOT); live is the default."""


def _show(v: dict[str, Any]) -> str:
    extra = f", clone of {v['origin']}" if v["origin"] else ""
    return f"{v['name']}: {human_size(v['size_bytes'])}{extra}"


@volume.command("create", epilog="Example: snapctl -d pool.img volume create db --size 20G")
@click.argument("name")
@click.option("--size", required=True, help="Size of the volume (thin: nothing is allocated).")
@click.pass_obj
def volume_create(obj: Context, name: str, size: str) -> None:
    """Create an empty volume NAME."""

    def body() -> None:
        with obj.client() as c:
            v = c.call("volume_create", {"name": name, "size": parse_size(size)})
        click.echo(f"created volume {_show(v)}")

    run(body)


@volume.command("list", epilog="Example: snapctl -d pool.img volume list --json")
@click.option("--json", "as_json", is_flag=True, help="A JSON array; sizes in bytes.")
@click.option("-H", "no_header", is_flag=True, help="No header, tab-separated.")
@click.option("-p", "parsable", is_flag=True, help="Exact byte counts.")
@click.pass_obj
def volume_list(obj: Context, as_json: bool, no_header: bool, parsable: bool) -> None:
    """List the volumes: size, space, snapshots, clone origin."""

    def body() -> None:
        with obj.client() as c:
            vols = c.call("volume_list")
        if as_json:
            click.echo(json.dumps(vols, indent=2))
            return
        r = Renderer(no_header=no_header, parsable=parsable)
        r.rows(
            ["NAME", "SIZE", "ALLOCATED", "SNAPSHOTS", "ORIGIN", "CLONES"],
            [
                [
                    v["name"],
                    r.size(v["size_bytes"]),
                    r.size(v["allocated_bytes"]),
                    str(v["snapshots"]),
                    v["origin"] or "-",
                    ",".join(v["clones"]) or "-",
                ]
                for v in vols
            ],
        )

    run(body)


@volume.command("resize", epilog="Example: snapctl -d pool.img volume resize db 40G")
@click.argument("name")
@click.argument("size")
@click.option("--force", is_flag=True, help="Allow shrinking (only past space it does not use).")
@click.pass_obj
def volume_resize(obj: Context, name: str, size: str, force: bool) -> None:
    """Grow volume NAME to SIZE (or shrink it, with --force)."""

    def body() -> None:
        with obj.client() as c:
            v = c.call("volume_resize", {"name": name, "size": parse_size(size), "force": force})
        click.echo(f"resized {_show(v)}")

    run(body)


@volume.command("delete", epilog="Example: snapctl -d pool.img volume delete scratch --recursive")
@click.argument("name")
@click.option("-r", "--recursive", is_flag=True, help="Also delete its snapshots and clones.")
@click.pass_obj
def volume_delete(obj: Context, name: str, recursive: bool) -> None:
    """Delete volume NAME and free its space."""

    def body() -> None:
        with obj.client() as c, Renderer().progress(f"deleting {name}") as advance:
            r = c.call("volume_delete", {"name": name, "recursive": recursive}, advance)
        click.echo(f"deleted {', '.join(r['deleted'])}")

    run(body)


@main.command(epilog="Example: snapctl -d pool.img clone live@nightly-1 test")
@click.argument("source", metavar="VOLUME@SNAPSHOT")
@click.argument("name")
@click.pass_obj
def clone(obj: Context, source: str, name: str) -> None:
    """Create volume NAME reading VOLUME@SNAPSHOT until written (O(1), thin)."""

    def body() -> None:
        with obj.client() as c:
            v = c.call("clone", {"source": source, "name": name})
        click.echo(f"created clone {_show(v)}")

    run(body)


def _standalone(op: str, verb: str) -> Any:
    @click.argument("name")
    @click.pass_obj
    def command(obj: Context, name: str) -> None:
        def body() -> None:
            with obj.client() as c, Renderer().progress(f"{verb} {name}") as advance:
                v = c.call(op, {"name": name}, advance)
            click.echo(
                f"{name} no longer depends on its origin ({human_size(v['allocated_bytes'])}"
                " allocated)"
            )

        run(body)

    return command


main.command(
    "flatten",
    help="Copy what clone NAME still reads from its origin, so it stands alone (online).",
    epilog="Example: snapctl -d pool.img flatten test",
)(_standalone("flatten", "flattening"))

main.command(
    "promote",
    help="Make clone NAME independent of its origin, so the origin snapshot and volume can be "
    "deleted. dittofs gives every block one owner, so this copies the shared blocks (as "
    "flatten does) where ZFS would move snapshots.",
    epilog="Example: snapctl -d pool.img promote test",
)(_standalone("promote", "promoting"))


@main.command("set", epilog="Example: snapctl -d pool.img set nightly-1 writable=on")
@click.argument("name", shell_complete=complete_snapshot)
@click.argument("setting", metavar="writable=on|off")
@click.pass_obj
def set_cmd(obj: Context, name: str, setting: str) -> None:
    """Set a snapshot property: writable=on exports NAME's views read-write; writing it never
    changes what older or newer snapshots or live read."""

    def body() -> None:
        key, sep, value = setting.partition("=")
        if key != "writable" or not sep or value not in ("on", "off"):
            raise InvalidArgument(f"unknown setting '{setting}': use writable=on or writable=off")
        with obj.client() as c:
            c.call("set", {"name": name, "writable": value == "on"})
        click.echo(f"{name}: writable={value}")

    run(body)
