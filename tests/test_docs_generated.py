"""The documents that describe declarations say exactly what is declared.

docs/format.md shows every on-disk struct of fsimpl/layout.py; docs/control-protocol.md lists
every control operation of fsimpl/operations.py and every error code of fsimpl/errors.py, with
the codes only NBD clients see in their own table; docs/snapctl.md holds every snapctl command
with each of its options. All are generated (scripts/gen_docs.py);
these tests fail when a document is stale, and they read the tables back independently of the
generator, so a hand edit or a generator bug that drops a row fails too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import click

from cli.main import main as snapctl_main
from fsimpl import layout
from fsimpl.errors import ERRORS_BY_CODE
from fsimpl.operations import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "control-protocol.md"


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _section(text: str, heading: str) -> str:
    """The text under a heading, up to the next heading of any level."""
    start = text.index(heading + "\n") + len(heading) + 1
    nxt = re.search(r"^#+ ", text[start:], re.M)
    return text[start : start + nxt.start()] if nxt else text[start:]


def _first_cells(section: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_generated_documents_are_current() -> None:
    gen = _gen_docs()
    for doc in gen.GENERATED:
        current = doc.read_text()
        assert current == gen.render(doc, current), f"{doc.name} is stale: run scripts/gen_docs.py"


def test_every_declared_struct_is_documented() -> None:
    text = (ROOT / "docs" / "format.md").read_text()
    for lay in layout.LAYOUTS:
        section = _section(text, f"### {lay.title} ({lay.size} bytes)")
        for col in lay.columns:
            if col.name:
                row = f"| {col.offset} | {col.size} | `{col.name}` | `{col.code}` |"
                assert row in section, f"{lay.title}: {col.name} is not documented as declared"


def test_declared_sizes_are_the_on_disk_sizes() -> None:
    assert layout.SUPERBLOCK_CODEC.layout.struct.size == layout.SUPERBLOCK_SIZE
    assert layout.HEADER.size == layout.HEADER_SIZE
    assert layout.MAP_ENTRY.size == layout.ENTRY_SIZE
    assert layout.INODE_CODEC.layout.struct.size == layout.INODE_RECORD_SIZE
    assert layout.SNAPSHOT_CODEC.layout.struct.size == layout.SNAP_RECORD_SIZE
    assert layout.STREAM_HEADER.size == 24


def test_protocol_lists_every_operation_and_nothing_else() -> None:
    listed = _first_cells(_section(PROTOCOL.read_text(), "## Operations"))
    assert len(listed) == len(set(listed)), "an operation is listed twice"
    assert set(listed) == set(OPERATIONS), (
        f"missing: {sorted(set(OPERATIONS) - set(listed))}, "
        f"not an operation: {sorted(set(listed) - set(OPERATIONS))}"
    )


def test_protocol_lists_every_error_code_in_the_right_table() -> None:
    text = PROTOCOL.read_text()
    control = _first_cells(_section(text, "### Error codes and exit codes"))
    nbd = _first_cells(_section(text, "### Errors only NBD clients see"))
    assert set(control) == {c for c, cls in ERRORS_BY_CODE.items() if not cls.nbd_only}
    assert set(nbd) == {c for c, cls in ERRORS_BY_CODE.items() if cls.nbd_only}
    assert len(control) + len(nbd) == len(ERRORS_BY_CODE), "a code is listed twice"


def test_every_operation_snapctl_calls_is_declared() -> None:
    called: set[str] = set()
    for path in (ROOT / "cli").glob("*.py"):
        called |= set(re.findall(r"""\.call\(\s*["']([a-z_]+)["']""", path.read_text()))
        called |= set(re.findall(r"""["'](standby_[a-z]+|flatten|promote)["']""", path.read_text()))
    assert called, "found no snapctl calls: the pattern is stale"
    assert called <= set(OPERATIONS), (
        f"snapctl calls undeclared operations: {called - set(OPERATIONS)}"
    )


def test_snapctl_reference_has_every_command_and_option() -> None:
    """Read back from docs/snapctl.md: a section per command of click's tree and nothing else,
    each showing the command's usage line and every option it takes."""
    text = (ROOT / "docs" / "snapctl.md").read_text()
    expected: dict[str, click.Command] = {}
    todo: list[tuple[str, click.Command]] = [("snapctl", snapctl_main)]
    while todo:
        name, cmd = todo.pop()
        expected[name] = cmd
        if isinstance(cmd, click.Group):
            todo += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
    documented = re.findall(r"^## (snapctl.*)$", text, re.M)
    assert len(documented) == len(set(documented)), "a command is documented twice"
    assert set(documented) == set(expected), (
        f"missing: {sorted(set(expected) - set(documented))}, "
        f"not a command: {sorted(set(documented) - set(expected))}"
    )
    for name, cmd in expected.items():
        section = _section(text, f"## {name}")
        assert f"Usage: {name} " in section, f"{name}: no usage line"
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0] in section, f"{name}: option {param.opts[0]} not documented"
