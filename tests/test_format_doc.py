"""docs/format.md shows every on-disk struct exactly as fsimpl/layout.py declares it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fsimpl import layout

ROOT = Path(__file__).resolve().parent.parent


def _format_doc_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("format_doc", ROOT / "scripts" / "format_doc.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_format_doc_matches_the_declarations() -> None:
    script = _format_doc_script()
    current = script.DOC.read_text()
    assert current == script.render(current), "docs/format.md is stale: run scripts/format_doc.py"


def test_every_declared_struct_is_documented() -> None:
    text = (ROOT / "docs" / "format.md").read_text()
    for lay in layout.LAYOUTS:
        assert f"### {lay.title} ({lay.size} bytes)" in text
        for name in lay.names:
            assert f"`{name}`" in text


def test_declared_sizes_are_the_on_disk_sizes() -> None:
    assert layout.SUPERBLOCK_CODEC.layout.struct.size == layout.SUPERBLOCK_SIZE
    assert layout.HEADER.size == layout.HEADER_SIZE
    assert layout.MAP_ENTRY.size == layout.ENTRY_SIZE
    assert layout.INODE_CODEC.layout.struct.size == layout.INODE_RECORD_SIZE
    assert layout.SNAPSHOT_CODEC.layout.struct.size == layout.SNAP_RECORD_SIZE
    assert layout.STREAM_HEADER.size == 24
