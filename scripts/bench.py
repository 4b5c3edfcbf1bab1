#!/usr/bin/env python3
"""Side-by-side I/O benchmark: dittofs against nbdkit's file plugin and a pass-through Python
plugin, every system on the same machine, in one run, medians of repeats.

    scripts/bench.py [--quick] [--size 1G] [--repeats 3] [--threads parallel,serialize]
                     [--json FILE]

Workloads (fio's nbd engine, Unix sockets): sequential write and read with 1 MiB requests over
the whole image, then 4 KiB random read and write at queue depth 16 on blocks already written
(dittofs's steady state: live owns every block). Prints one table with the ratio
dittofs / pass-through per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "plugin.py"
PASSTHROUGH = REPO / "scripts" / "passthrough_plugin.py"

WORKLOADS = [
    ("seq-write 1M", dict(rw="write", bs="1M", iodepth=1)),
    ("seq-read 1M", dict(rw="read", bs="1M", iodepth=1)),
    ("rand-write 4K qd16", dict(rw="randwrite", bs="4k", iodepth=16, timed=True)),
    ("rand-read 4K qd16", dict(rw="randread", bs="4k", iodepth=16, timed=True)),
]


class Server:
    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        self.sock = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        env = {**os.environ, "DITTOFS_RUNDIR": str(workdir / "run")}
        if self.sock.exists():
            self.sock.unlink()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 30
        while not _listening(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def fio(
    uri: str, size: int, runtime: float, rw: str, bs: str, iodepth: int, timed: bool = False
) -> float:
    """Run one fio job; returns bytes per second."""
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--output-format=json",
        "--randrepeat=0",
        "--norandommap",
    ]
    if timed:
        cmd += [f"--runtime={runtime}", "--time_based"]
    cp = subprocess.run(cmd, capture_output=True, text=True)
    if cp.returncode != 0:
        raise RuntimeError(f"fio failed ({' '.join(cmd)}):\n{cp.stdout[-2000:]}{cp.stderr}")
    out = cp.stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["bw_bytes"])


def systems(threads: list[str]) -> list[tuple[str, str, list[str]]]:
    """(label, image kind, nbdkit arguments with {img} placeholders)."""
    out: list[tuple[str, str, list[str]]] = [("nbdkit-file (C)", "raw", ["file", "{img}"])]
    for t in threads:
        out.append(
            (
                f"passthrough-py [{t}]",
                "raw",
                ["python", str(PASSTHROUGH), "file={img}", f"threads={t}"],
            )
        )
    for t in threads:
        for cow in ("move", "copy"):
            out.append(
                (
                    f"dittofs cow={cow} [{t}]",
                    "pool",
                    [
                        "python",
                        str(PLUGIN),
                        "disk={img}",
                        "size={size}",
                        f"cow={cow}",
                        f"threads={t}",
                    ],
                )
            )
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    base = Path(tempfile.mkdtemp(prefix="dittofs-bench.", dir=args.dir))
    try:
        for label, kind, template in systems(args.threads):
            results[label] = {}
            samples: dict[str, list[float]] = {w: [] for w, _ in WORKLOADS}
            for rep in range(args.repeats):
                work = base / f"r{rep}"
                work.mkdir(exist_ok=True)
                img = work / f"{kind}.img"
                if img.exists():
                    img.unlink()
                if kind == "raw":
                    with open(img, "wb") as f:
                        f.truncate(args.size)
                argv = [a.format(img=img, size=args.size) for a in template]
                srv = Server(work, "srv", argv)
                try:
                    uri = srv.uri("live" if kind == "pool" else "")
                    for wname, w in WORKLOADS:
                        samples[wname].append(fio(uri, args.size, args.runtime, **w))
                finally:
                    srv.stop()
                img.unlink()
            for wname, vals in samples.items():
                results[label][wname] = statistics.median(vals)
            print(f"  {label}: done", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def table(results: dict[str, dict[str, float]], threads: list[str]) -> str:
    labels = list(results)
    lines = []
    head = f"{'workload':<20}" + "".join(f"{lbl[:24]:>26}" for lbl in labels)
    lines.append(head)
    for wname, _ in WORKLOADS:
        row = f"{wname:<20}" + "".join(
            f"{results[lbl][wname] / 2**20:>22.1f}MB/s" for lbl in labels
        )
        lines.append(row)
    lines.append("")
    lines.append("ratios dittofs / pass-through (same thread model):")
    for t in threads:
        pt = results[f"passthrough-py [{t}]"]
        for cow in ("move", "copy"):
            d = results[f"dittofs cow={cow} [{t}]"]
            parts = ", ".join(f"{w}: {d[w] / pt[w]:.2f}" for w, _ in WORKLOADS)
            lines.append(f"  cow={cow} [{t}]: {parts}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--runtime", type=float, default=10.0, help="seconds per random job")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="parallel", help="comma list: parallel,serialize")
    ap.add_argument("--dir", default=None, help="where images go (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    args.threads = args.threads.split(",")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = args.size.upper()
    args.size = int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)
    if args.quick:
        args.size, args.runtime, args.repeats = min(args.size, 64 << 20), 2.0, 1
    for tool in ("nbdkit", "fio"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is not installed: run scripts/setup.sh")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = run(args)
    print(
        f"dittofs I/O benchmark, {started}, image {args.size >> 20} MiB, "
        f"{args.repeats} repeat(s), median; {os.cpu_count()} CPUs"
    )
    print(table(results, args.threads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"date": started, "size": args.size, "repeats": args.repeats, "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
