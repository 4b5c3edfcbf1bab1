#!/usr/bin/env python3
"""Make the golden pools: small images written by one release of dittofs, kept in the tests.

    .venv/bin/python tests/golden/make_golden.py [--out tests/golden]

Each image holds every kind of record that release can write: several volumes, snapshots with
holds and a rename, a deleted snapshot, a clone of a snapshot, a writable snapshot written
through, trimmed holes, partial first writes left incomplete (deferred copy-on-write), and, in
the second image, data checksums. The images are compressed; beside each, a JSON file records
what a reader must see: the sha256 of every export and the `list`, `info` and `volume list`
results. tests/test_golden.py opens them through a real nbdkit and checks every figure, so a
format change that breaks old pools fails there.

Run it only to add the images of a new format version: the existing ones are evidence of what
an old release wrote, and regenerating them with new code would prove nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fsimpl.client import DirectClient  # noqa: E402
from fsimpl.engine import Engine  # noqa: E402

MiB = 1 << 20


def pattern(tag: int, n: int) -> bytes:
    """n bytes that say which write made them, and compress well."""
    unit = f"<golden {tag:06d}>".encode()
    return (unit * (n // len(unit) + 1))[:n]


def build(path: str, block_size: int, checksums: bool) -> None:
    eng = Engine.open(
        path, create_size=8 * MiB, block_size=block_size, checksums=checksums, claim=False
    )
    bs = block_size
    live = eng.open_export("live", False)
    tag = 0

    def put(ex: object, offset: int, n: int) -> None:
        nonlocal tag
        tag += 1
        eng.write(ex, memoryview(pattern(tag, n)), offset)  # type: ignore[arg-type]

    for b in range(0, 24):  # whole blocks, then a few partial ones
        put(live, b * bs, bs)
    put(live, 40 * bs + 512, 3000)
    eng.flush()
    eng.create_snapshot("first")
    put(live, 2 * bs + 4096, 512)  # partial first writes: incomplete blocks (no checksums)
    put(live, 5 * bs, 1024)
    put(live, 7 * bs, bs)
    eng.trim(live, 10 * bs, 3 * bs)  # holes the snapshot must keep reading as data
    eng.create_snapshot("second")
    eng.hold("second", "keep")
    put(live, 30 * bs, 2 * bs)  # data written into holes after a snapshot
    put(live, 2 * bs + 8192, 512)
    eng.create_snapshot("doomed")
    put(live, 3 * bs, bs)
    eng.create_snapshot("third")
    eng.rename_snapshot("third", "renamed")
    eng.delete_snapshot("doomed")
    eng.create_volume("data", 4 * MiB)
    data = eng.open_export("data", False)
    for b in range(0, 6):
        put(data, b * bs, bs)
    eng.create_snapshot("both")  # one snapshot covering both volumes
    put(data, 1 * bs, bs)
    put(live, 12 * bs, bs)
    eng.clone("live@second", "clone")
    clone = eng.open_export("clone", False)
    put(clone, 0, bs)
    eng.trim(clone, 4 * bs, bs)  # a clone's trimmed block: an explicit hole
    eng.create_snapshot("cloned", ["clone"])
    put(clone, 6 * bs + 100, 700)
    eng.create_snapshot("scratch", ["data"], writable=True)
    scratch = eng.open_export("data@scratch", False)
    put(scratch, 2 * bs, bs)
    put(scratch, 9 * bs, bs)
    put(data, 3 * bs, bs)
    eng.close()  # a clean close, with incomplete blocks still unmerged


def exports_sha256(path: str) -> dict[str, str]:
    eng = Engine.open(path, claim=False)
    try:
        out = {}
        for name, _ in eng.export_names():
            if name.endswith("@latest"):
                continue
            ex = eng.open_export(name, True)
            h = hashlib.sha256()
            for off in range(0, ex.size, MiB):
                buf = bytearray(min(MiB, ex.size - off))
                eng.read(ex, memoryview(buf), off)
                h.update(buf)
            out[name] = h.hexdigest()
        eng.abort()  # reading changes nothing; leave the image as it was
        return out
    finally:
        eng.device.close()


def expected(path: str) -> dict[str, object]:
    before = Path(path).read_bytes()
    sums = exports_sha256(path)
    client = DirectClient(Engine.open(path, claim=False))
    try:
        result = {
            "exports": sums,
            "export_names": client.call("exports"),
            "list": client.call("list"),
            "info": client.call("info"),
            "volume_list": client.call("volume_list"),
        }
    finally:
        client.engine.device.close()  # no tick, no commit: the image stays as made
    assert Path(path).read_bytes() == before, "reading the golden pool changed it"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--version", default="v1")
    args = ap.parse_args()
    for name, bs, checksums in (("default", 64 << 10, False), ("checksums", 4096, True)):
        stem = f"pool-{args.version}-{name}"
        with tempfile.TemporaryDirectory() as tmp:
            img = os.path.join(tmp, "pool.img")
            build(img, bs, checksums)
            facts = expected(img)
            facts["made_with"] = {"block_size": bs, "checksums": checksums}
            raw = Path(img).read_bytes()
            facts["image_sha256"] = hashlib.sha256(raw).hexdigest()
            facts["image_bytes"] = len(raw)
        (Path(args.out) / f"{stem}.img.gz").write_bytes(gzip.compress(raw, 9, mtime=0))
        (Path(args.out) / f"{stem}.json").write_text(json.dumps(facts, indent=1) + "\n")
        print(f"{stem}: {len(raw)} bytes, {len(facts['exports'])} exports")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
