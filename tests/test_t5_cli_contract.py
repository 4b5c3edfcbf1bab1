"""The CLI contract, over every command click knows (a command added later is covered without
editing a list here):

* `--help` of every command, group and subcommand shows an example (`Example: snapctl ...`);
* a usage error exits 2 with one `snapctl: ` line;
* pointed at a pool that does not exist, a command exits 3 with one line, and leaves no file;
* the example in its `--help` runs against a fixture pool and exits 0;
* where `--json` is offered, its output parses.

Commands that need outside setup (a mount, a peer, a long-running server) do not run their
example here: each is in EXEMPT with its reason and the test that covers it elsewhere (left out
of the parametrization, not skipped).
snapctl runs as the installed console script in direct mode (no server): the same dispatch a
server runs (tests/test_t5_cli.py runs the commands through a server as well).
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from support.snapctl import SNAPCTL, snapctl
from support.snapctl import shown as show

from cli.app import walk_commands
from cli.main import main
from fsimpl.layout import STREAM_MAGIC

MISSING = "/nonexistent/pool.img"
GOLDEN_V1 = Path(__file__).resolve().parent / "golden" / "pool-v1-default.img.gz"


EVERY = [path for path, _ in walk_commands(main) if path]
LEAVES = [path for path, cmd in walk_commands(main) if path and not isinstance(cmd, click.Group)]
WITH_JSON = [
    path
    for path, cmd in walk_commands(main)
    if path and any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params)
]


def ident(path: tuple[str, ...]) -> str:
    return " ".join(path)


# command -> (why its example does not run here, the test that covers it)
EXEMPT: dict[str, tuple[str, str]] = {
    "attach": ("needs nbdfuse, a loop device and a mount", "tests/test_t5_attach.py"),
    "detach": ("needs an attached export", "tests/test_t5_attach.py"),
    "serve": ("runs a server that outlives the command", "tests/test_t5_serve_stop.py"),
    "create": (
        "the example freezes a mounted file system (--freeze /mnt/data)",
        "tests/test_t5_cli.py::test_create_freeze",
    ),
    "standby attach": ("needs a peer pool's endpoint and a key", "tests/test_t10_standby.py"),
    "standby demote": ("needs a promoted peer", "tests/test_t10_standby.py"),
    "standby failback": ("needs a peer that was failed over to", "tests/test_t10_standby.py"),
    "standby promote": ("needs a standby pool and its peer", "tests/test_t10_standby.py"),
    "standby serve": ("runs a network endpoint in the background", "tests/test_t10_standby.py"),
    "standby status": ("needs an attached standby", "tests/test_t10_standby.py"),
    "standby sync": ("needs a peer endpoint and a key", "tests/test_t10_standby.py"),
}
# commands whose pool is an argument they create (a missing one is not an error for them)
CREATES_ITS_POOL = {"format"}
# commands that answer a missing pool with another exit code, and why
MISSING_POOL_EXIT = {"check": (8, "fsck's exit codes: 8 is 'the check could not run'")}
# what an example needs in its pool beyond the fixture's snapshots, as snapctl arguments
PREPARE: dict[str, list[tuple[str, ...]]] = {
    "flatten": [("clone", "live@nightly-1", "test")],
    "promote": [("clone", "live@nightly-1", "test")],
    "hold": [("create", "before-upgrade")],
    "release": [("create", "before-upgrade"), ("hold", "before-upgrade", "--tag", "backup")],
    "rollback": [("create", "before-upgrade")],
    "volume delete": [("volume", "create", "scratch", "--size", "16M")],
    "volume resize": [("volume", "create", "db", "--size", "16M")],
}
FIXTURE_SNAPSHOTS = ["nightly-1", "nightly-2", "nightly-3", "nightly-4", "nightly-5", "s1", "s2"]


def example(cmd: click.Command) -> str:
    """The first example of a command's help: what follows 'Example(s):' up to a ';'."""
    text = " ".join((cmd.epilog or "").split())
    found = re.search(r"Examples?: (snapctl .*)", text)
    assert found, f"no example in the epilog: {cmd.epilog!r}"
    return found.group(1).split(";")[0].strip()


def example_argv(path: tuple[str, ...], disks: dict[str, Path]) -> list[str]:
    """The example as snapctl arguments: only its first command (before a pipe or an aside),
    its image names replaced by the given disks."""
    line = example(command_at(path))
    line = re.split(r" \| | \(or:", line)[0]
    words = shlex.split(line)
    assert words[0] == "snapctl", line
    return [str(disks.get(w, w)) for w in words[1:]]


def command_at(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def one_line_error(cp: subprocess.CompletedProcess[str], rc: int) -> None:
    assert cp.returncode == rc, show(cp)
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapctl: "), (
        f"not one 'snapctl: ' line:\n{show(cp)}"
    )
    assert "Traceback" not in cp.stderr, show(cp)


RUNNABLE = [p for p in LEAVES if ident(p) not in EXEMPT]
RUNNABLE_JSON = [p for p in WITH_JSON if ident(p) not in EXEMPT]
NEEDS_A_POOL = [p for p in LEAVES if ident(p) not in CREATES_ITS_POOL]


# --- fixture ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pool with the snapshots the examples name, made once."""
    disk = tmp_path_factory.mktemp("contract") / "fixture.img"
    snapctl("format", str(disk), "--size", "64M", check=True)
    for name in FIXTURE_SNAPSHOTS:
        snapctl("create", name, disk=disk, check=True)
    return disk


@pytest.fixture
def disks(fixture_pool: Path, tmp_path: Path) -> dict[str, Path]:
    """The image names examples use, each a fresh copy of the fixture (b.img: an empty pool,
    what a receive starts from)."""
    a = tmp_path / "a.img"
    shutil.copyfile(fixture_pool, a)
    b = tmp_path / "b.img"
    snapctl("format", str(b), "--size", "64M", check=True)
    return {"pool.img": a, "a.img": a, "b.img": b}


# --- the contract ----------------------------------------------------------------------------


def test_the_tree_is_walked() -> None:
    """The walk finds what snapctl has (so a broken walk cannot pass every test below by
    finding nothing)."""
    found = {ident(p) for p in EVERY}
    assert {"list", "info", "volume", "volume create", "standby", "standby sync"} <= found
    assert len(LEAVES) >= 30 and len(WITH_JSON) >= 15
    assert set(EXEMPT) <= {ident(p) for p in LEAVES}, "an exemption names no command"


@pytest.mark.parametrize("path", EVERY, ids=ident)
def test_help_shows_an_example(path: tuple[str, ...]) -> None:
    cp = snapctl(*path, "--help")
    assert cp.returncode == 0 and cp.stderr == "", show(cp)
    assert re.search(r"^\s*Examples?: snapctl ", cp.stdout, re.M), show(cp)
    assert example(command_at(path)).split()[0] == "snapctl"


@pytest.mark.parametrize("path", EVERY, ids=ident)
def test_a_usage_error_is_exit_2_and_one_line(path: tuple[str, ...]) -> None:
    one_line_error(snapctl("-d", MISSING, *path, "--no-such-option"), 2)


@pytest.mark.parametrize("path", NEEDS_A_POOL, ids=ident)
def test_a_missing_pool_is_exit_3_and_one_line(path: tuple[str, ...], tmp_path: Path) -> None:
    """...and the failed command leaves nothing behind (run where it would write its files)."""
    argv = example_argv(
        path, {"pool.img": Path(MISSING), "a.img": Path(MISSING), "b.img": Path(MISSING)}
    )
    if "-d" not in argv and MISSING not in argv:
        argv = ["-d", MISSING, *argv]
    cp = run_in(tmp_path, argv)
    one_line_error(cp, MISSING_POOL_EXIT.get(ident(path), (3, ""))[0])
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_a_failed_command_keeps_the_file_it_would_write(fixture_pool: Path, tmp_path: Path) -> None:
    """send -o and standby demote --save-diverged write a file: one that fails leaves what was
    there (or nothing), and one that succeeds replaces it whole."""
    kept = tmp_path / "kept.stream"
    kept.write_bytes(b"what was there")
    for argv in (
        ["-d", str(fixture_pool), "send", "no-such-snapshot", "-o", str(kept)],
        ["-d", MISSING, "send", "s2", "-o", str(kept)],
        ["-d", str(fixture_pool), "standby", "demote", "--save-diverged", str(kept)]
        + ["--key-file", str(tmp_path / "no-such.psk")],
    ):
        cp = run_in(tmp_path, argv)
        assert cp.returncode != 0, show(cp)
        assert kept.read_bytes() == b"what was there", show(cp)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.stream"], show(cp)
    cp = run_in(tmp_path, ["-d", str(fixture_pool), "send", "s2", "-o", str(kept)])
    assert cp.returncode == 0, show(cp)
    assert kept.read_bytes().startswith(STREAM_MAGIC), "not replaced by the stream"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.stream"]


@pytest.mark.parametrize("path", RUNNABLE, ids=ident)
def test_the_help_example_runs(
    path: tuple[str, ...], disks: dict[str, Path], tmp_path: Path
) -> None:
    run_example(ident(path), path, disks, tmp_path)


@pytest.mark.parametrize("path", RUNNABLE_JSON, ids=ident)
def test_json_output_parses(path: tuple[str, ...], disks: dict[str, Path], tmp_path: Path) -> None:
    name = ident(path)
    cp = run_example(name, path, disks, tmp_path, "--json")
    # send writes its stream to stdout: its JSON summary goes to stderr
    text = cp.stderr if name == "send" else cp.stdout
    json.loads(text)


def run_example(
    name: str, path: tuple[str, ...], disks: dict[str, Path], cwd: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """Prepare what the example needs, run it in cwd (plus extra arguments), and require
    exit 0."""
    if name in CREATES_ITS_POOL:
        disks = {**disks, "pool.img": cwd / "new.img"}
    if name == "upgrade":  # what it upgrades: a pool an earlier release wrote
        old = cwd / "v1.img"
        old.write_bytes(gzip.decompress(GOLDEN_V1.read_bytes()))
        disks = {**disks, "pool.img": old}
    for step in PREPARE.get(name, []):
        snapctl(*step, disk=disks["pool.img"], check=True)
    if name == "receive":  # the stream the example receives, sent from the fixture
        snapctl("send", "s2", "-o", str(cwd / "s2.stream"), disk=disks["a.img"], check=True)
    argv = example_argv(path, disks)
    if extra and extra[0] not in argv:
        argv += list(extra)
    cp = run_in(cwd, argv)
    assert cp.returncode == 0, show(cp)
    return cp


def run_in(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """snapctl ARGV in cwd; output is bytes decoded leniently (send's stream is on stdout)."""
    raw = subprocess.run(
        [str(SNAPCTL), *argv], cwd=cwd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL
    )
    return subprocess.CompletedProcess(
        raw.args,
        raw.returncode,
        raw.stdout.decode(errors="replace"),
        raw.stderr.decode(errors="replace"),
    )
