"""A small qemu guest with Debian's own kernel, to test the kernel's NBD driver with nbd-client.

These machines have no NBD module, but Debian's kernel (which has nbd.ko) boots in seconds under
qemu's software emulation (TCG). This module builds that guest once and caches it, then runs a
shell script in it and returns what the script printed and its exit status:

* **Build** (`build()`): `apt-get download` the kernel package that `linux-image-amd64` depends
  on into CACHE/debs/, `dpkg-deb -x` it into a scratch directory, `depmod`, and take the modules
  `modprobe --show-depends` lists for virtio_pci, virtio_net, nbd, ext4 and crc32c_generic (in
  that order). The initramfs holds those modules, static busybox (every applet as a symlink),
  the host's nbd-client, mke2fs (mkfs.ext4), e2fsck, fsfreeze and sync with the libraries `ldd`
  lists, /etc/mke2fs.conf, and `/init` (INIT below). CACHE/guest-KEY/ then holds `kernel`
  (the bzImage's uncompressed ELF kernel, which qemu boots through its PVH entry point without
  decompressing it under emulation; the bzImage itself if that cannot be had), `initrd.cpio`
  and `manifest.json`; KEY is a hash of everything that went in (kernel package,
  every binary and library, the init scripts, FORMAT), so a changed host tool or kernel makes a
  new guest and a second build is only that hash. Builds take a lock (two test processes never
  build at once) and are made in a scratch directory renamed into place (never half a guest).
* **Run** (`run_guest()`): a per-run cpio (the script, its environment) is appended to the
  cached initrd (the kernel unpacks concatenated archives), and qemu runs
  `-accel tcg -nographic -no-reboot` with user networking: the guest is 10.0.2.15 and reaches
  the host's 127.0.0.1:PORT as 10.0.2.2:PORT (qemu itself makes the only real socket). /init
  loads the modules, brings up eth0, prints `@@VM-READY`, sources the script with the helpers
  of GUEST_LIB, prints `@@VM-EXIT STATUS` and powers off. Everything goes over the serial
  console (qemu's stdout), which is collected line by line with timestamps.
* **Host steps** (`HostChannel`): the guest asks the host to act (take a snapshot, restart the
  server...) with `host NAME ARGS...`, an HTTP GET from busybox wget to a server the test runs
  on 127.0.0.1 (10.0.2.2 in the guest). The request blocks until the host has done the step and
  answers `ok ...` (or `error ...`, which fails the guest's step), so the order of host and
  guest steps is exactly the script's order, with no sleeps or polling.

The cache lives in REPO/.cache/nbd-vm/ (ignored by git) unless $DITTOFS_VM_CACHE names another
directory. `scripts/nbd-vm.sh build|run SCRIPT` is the same from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.server
import json
import lzma
import os
import queue
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DITTOFS_VM_CACHE") or REPO / ".cache" / "nbd-vm")
FORMAT = 2  # bump when the guest's layout changes in a way KEY cannot see
META_PACKAGE = "linux-image-amd64"
# Loaded in this order with their dependencies first (modprobe --show-depends).
MODULES = ["virtio_pci", "virtio_net", "nbd", "ext4", "crc32c_generic"]
MODULE_PARAMS = {"nbd": "nbds_max=4 max_part=0"}
# May fail to load under TCG (no SSE4.2 on qemu's default CPU): crc32c_generic does the work.
OPTIONAL_MODULES = {"crc32c-intel", "crc32c_intel"}
# Host tools copied into the guest: guest path <- host path (with their libraries).
TOOLS = {
    "/usr/sbin/nbd-client": "nbd-client",
    "/usr/sbin/mke2fs": "mke2fs",
    "/usr/sbin/e2fsck": "e2fsck",
    "/usr/sbin/fsfreeze": "fsfreeze",
    "/usr/bin/sync": "sync",
}
LINKS = {"/usr/sbin/mkfs.ext4": "mke2fs", "/usr/sbin/fsck.ext4": "e2fsck"}
# Debian's packages for everything the build needs (for the message when one is missing).
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "depmod": "kmod",
    "modprobe": "kmod",
    "nbd-client": "nbd-client",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "fsfreeze": "util-linux",
    "sync": "coreutils",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "ldd": "libc-bin",
}
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"  # the host's 127.0.0.1 as the guest sees it (qemu user networking)

INIT = r"""#!/bin/sh
# /init of the nbd-vm guest (tests/vm.py): modules, network, then the test's script.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt /run /root
echo 0 > /proc/sys/kernel/printk_ratelimit 2>/dev/null
while read -r mod optional params; do
  insmod "/lib/modules/$(uname -r)/$mod" $params 2>/tmp/insmod.err ||
    [ "$optional" = optional ] || { echo "vm: insmod $mod failed: $(cat /tmp/insmod.err)"; }
done < /etc/vm-modules
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 ||
  echo "vm: no network (eth0)"
[ -b /dev/nbd0 ] || echo "vm: no /dev/nbd0"
echo "@@VM-READY $(cut -d' ' -f1 /proc/uptime)"
if [ -f /vm/script.sh ]; then
  (cd /tmp && . /vm/env && . /etc/vm-lib.sh && . /vm/script.sh) </dev/null 2>&1
  rc=$?
else
  echo "vm: no /vm/script.sh in the initramfs"
  rc=100
fi
echo "@@VM-EXIT $rc $(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""

# Helpers every guest script can use (sourced before it, with `set -e` already on).
GUEST_LIB = r"""# /etc/vm-lib.sh: helpers for the scripts tests/vm.py runs in the guest.
set -e
# Debian's static busybox runs its own applets before searching PATH: the real tools by path.
fsfreeze() { /usr/sbin/fsfreeze "$@"; }
sync() { /usr/bin/sync "$@"; }
mke2fs() { /usr/sbin/mke2fs "$@"; }
say() { echo "vm: $*" >&2; }
fail() { echo "vm: FAIL: $*" >&2; exit 1; }
# mark NAME: tells the host this step was reached (the tests check the marks, in order).
mark() { echo "@@MARK $1"; }
# host NAME [ARGS...]: the test on the host does step NAME and answers; blocks until it has.
# Prints the answer (without "ok ") on stdout, so `r=$(host NAME)` captures it (the console
# shows every request and answer anyway, as "[host] ..." lines).
host() {
  _q=""
  for _a in "$@"; do _q="$_q/$_a"; done
  _out=$(wget -q -O - "http://$VM_HOST_IP:$VM_HOST_PORT$_q") || fail "host$_q: no answer"
  case "$_out" in
    ok*) echo "${_out#ok}" | sed 's/^ //' ;;
    *) fail "host$_q: $_out" ;;
  esac
}
# expect_fail CMD...: CMD must fail (its output is shown).
expect_fail() {
  if "$@"; then fail "this should have failed: $*"; fi
  say "failed as expected: $*"
}
"""

_INIT_MARK = re.compile(r"@@VM-(READY|EXIT) ?(.*)$")
# Terminal control sequences SeaBIOS and the kernel send to the console (reset, clear, wrap).
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")


class VmError(AssertionError):
    """A guest that could not be built or run (fails the test loudly)."""


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )
    if not path:
        pkg = PACKAGES.get(name, name)
        raise VmError(f"{name} is not installed: apt-get install {pkg} (or run scripts/setup.sh)")
    return path


def _run(*args: str, cwd: Path | None = None, timeout: float = 600) -> str:
    cp = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if cp.returncode != 0:
        raise VmError(f"{' '.join(args)} exited {cp.returncode}:\n{cp.stdout}{cp.stderr}")
    return cp.stdout


# --- build -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestImage:
    """A built guest: its kernel and initramfs, and what went into them."""

    dir: Path
    kernel: Path
    initrd: Path
    version: str
    manifest: dict[str, object]


def kernel_package() -> str:
    """The kernel package linux-image-amd64 depends on now (e.g. linux-image-6.1.0-56-amd64)."""
    out = _run(tool("apt-cache"), "depends", META_PACKAGE)
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not m:
        raise VmError(
            f"apt-cache depends {META_PACKAGE} names no kernel package (run apt-get update):\n"
            + out
        )
    return m.group(1)


def download_kernel(cache: Path, package: str) -> Path:
    """The package's .deb in cache/debs/, downloaded with apt-get download if not there yet."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # Unsandboxed: the _apt user may not write into the cache directory.
        _run(
            tool("apt-get"),
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            "download",
            package,
            cwd=Path(tmp),
        )
        got = list(Path(tmp).glob(f"{package}_*.deb"))
        if len(got) != 1:
            raise VmError(f"apt-get download {package} gave {got}")
        for old in debs.glob("linux-image-*.deb"):
            old.unlink()  # keep one kernel package only
        final = debs / got[0].name
        os.replace(got[0], final)
    return final


def libraries(binary: str) -> list[str]:
    """The shared libraries (and loader) `ldd` lists for binary, as host paths."""
    out = _run(tool("ldd"), binary)
    libs = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
        elif "=>" in line and "not found" in line:
            raise VmError(f"{binary}: a library is missing: {line}")
    return libs


def guest_files() -> dict[str, str]:
    """Every host file the initramfs copies, by guest path (tools, libraries, config)."""
    files: dict[str, str] = {}
    for guest, name in TOOLS.items():
        host = tool(name)
        files[guest] = host
        for lib in libraries(host):
            files.setdefault(lib, lib)
    if os.path.exists("/etc/mke2fs.conf"):
        files["/etc/mke2fs.conf"] = "/etc/mke2fs.conf"
    return files


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_key(deb: Path, busybox: str, files: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}\n{INIT}\n{GUEST_LIB}\n{MODULES}\n{MODULE_PARAMS}\n{TOOLS}\n".encode())
    h.update(f"{deb.name}\n{_sha256(busybox)}\n".encode())
    for guest, host in sorted(files.items()):
        h.update(f"{guest} {_sha256(host)}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(cache: Path = CACHE, log: Callable[[str], None] = lambda s: None) -> GuestImage:
    """The cached guest, built first if it is not there (or is out of date)."""
    for name in ("qemu-system-x86_64", "cpio", "depmod", "modprobe", "dpkg-deb"):
        tool(name)
    busybox = tool("busybox")
    ldd = subprocess.run([tool("ldd"), busybox], capture_output=True, text=True, check=False)
    if ldd.returncode == 0 and "statically linked" not in ldd.stdout:
        raise VmError(f"{busybox} is not static: apt-get install busybox-static")
    with _locked(cache / "lock"):
        try:
            package = kernel_package()
        except VmError:
            # No package lists (offline, or cleaned): the kernel package already downloaded.
            found = sorted((cache / "debs").glob("linux-image-*.deb"))
            if not found:
                raise
            package = found[-1].name.split("_")[0]
            log(f"apt-cache knows no kernel package: using {found[-1].name}")
        deb = download_kernel(cache, package)
        files = guest_files()
        key = build_key(deb, busybox, files)
        out = cache / f"guest-{key}"
        if (out / "manifest.json").exists():
            return _image(out)
        log(f"building the guest in {out} from {deb.name}")
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            _build_into(scratch, deb, busybox, files, key)
            for old in cache.glob("guest-*"):
                shutil.rmtree(old, ignore_errors=True)  # one guest at a time
            os.replace(scratch / "out", out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return _image(out)


def _image(out: Path) -> GuestImage:
    manifest = json.loads((out / "manifest.json").read_text())
    return GuestImage(
        out, out / "kernel", out / "initrd.cpio", str(manifest["kernel_version"]), manifest
    )


def _build_into(scratch: Path, deb: Path, busybox: str, files: dict[str, str], key: str) -> None:
    t0 = time.monotonic()
    kroot = scratch / "kernel"
    _run(tool("dpkg-deb"), "-x", str(deb), str(kroot))
    versions = [p.name for p in (kroot / "lib" / "modules").iterdir() if p.is_dir()]
    if len(versions) != 1:
        raise VmError(f"{deb.name}: expected one kernel version, found {versions}")
    version = versions[0]
    vmlinuz = kroot / "boot" / f"vmlinuz-{version}"
    _run(tool("depmod"), "-b", str(kroot), version)
    modules: list[tuple[str, str]] = []  # (path under lib/modules/VERSION, params)
    moddir = kroot / "lib" / "modules" / version
    for name in MODULES:
        # -C /dev/null: the host's /etc/modprobe.d must not add options or blacklists.
        out = _run(
            tool("modprobe"), "-C", "/dev/null", "-d", str(kroot), "-S", version,
            "--show-depends", name,
        )  # fmt: skip
        for line in out.splitlines():
            parts = line.split()
            if not parts or parts[0] != "insmod":
                if parts and parts[0] == "builtin":
                    continue
                raise VmError(f"modprobe --show-depends {name}: {line}")
            rel = str(Path(parts[1]).relative_to(moddir))
            if rel not in [m for m, _ in modules]:
                mod = Path(rel).name.split(".ko")[0]
                modules.append((rel, MODULE_PARAMS.get(mod, "")))

    root = scratch / "root"
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "proc", "sys", "dev", "vm"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):  # merged /usr, as on the host
        (root / link).symlink_to(f"usr/{link}")
    shutil.copy2(busybox, root / "usr/bin/busybox")
    for applet in _run(busybox, "--list-full").split():
        target = root / applet
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() and not target.is_symlink():
            target.symlink_to("/usr/bin/busybox")
    for guest, host in files.items():
        target = root / guest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copy2(host, target)  # follows symlinks: the content, at the path ldd names
    for guest, name in LINKS.items():
        target = root / guest.lstrip("/")
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(name)
    lines = []
    for rel, params in modules:
        target = root / "usr/lib/modules" / version / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, target)
        optional = "optional" if Path(rel).name.split(".ko")[0] in OPTIONAL_MODULES else "-"
        lines.append(f"{rel} {optional} {params}".rstrip())
    (root / "etc/vm-modules").write_text("\n".join(lines) + "\n")
    (root / "etc/vm-lib.sh").write_text(GUEST_LIB)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)

    out = scratch / "out"
    out.mkdir()
    _cpio(root, out / "initrd.cpio")
    # qemu boots an uncompressed kernel with a PVH entry point directly: no decompression
    # under emulation (about 2.5 s of the 5 s boot). The bzImage is the fallback.
    boot = "pvh"
    if not _extract_pvh_vmlinux(vmlinuz, out / "kernel"):
        shutil.copy2(vmlinuz, out / "kernel")
        boot = "bzImage"
    manifest = {
        "key": key,
        "format": FORMAT,
        "kernel_package": deb.name,
        "kernel_version": version,
        "kernel_boot": boot,
        "modules": [m for m, _ in modules],
        "tools": {g: files[g] for g in TOOLS},
        "files": len(files),
        "initrd_bytes": (out / "initrd.cpio").stat().st_size,
        "build_seconds": round(time.monotonic() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _extract_pvh_vmlinux(vmlinuz: Path, dest: Path) -> bool:
    """The ELF kernel inside a bzImage (xz or gzip payload), if it has a PVH entry point (the
    Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY, CONFIG_PVH), written to dest."""
    data = vmlinuz.read_bytes()
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08"):
        at = data.find(magic)
        while at >= 0:
            try:
                if magic.startswith(b"\xfd"):
                    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
                else:
                    elf = zlib.decompressobj(31).decompress(data[at:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf.startswith(b"\x7fELF") and _has_pvh_note(elf):
                dest.write_bytes(elf)
                return True
            at = data.find(magic, at + 1)
    return False


def _has_pvh_note(elf: bytes) -> bool:
    if elf[4] != 2 or elf[5] != 1:  # ELFCLASS64, little-endian
        return False
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", elf, 0x20)[0],
        *struct.unpack_from("<HH", elf, 0x36),
    )
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\x00" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _cpio(root: Path, dest: Path) -> None:
    """root as a newc cpio archive (what the kernel unpacks as its initramfs; uncompressed,
    since decompressing costs more under emulation than reading a few more MB)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinks to directories not followed
        rel = os.path.relpath(dirpath, root)
        names += [os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames]
    names.sort()  # parents before their children
    with open(dest, "wb") as out:
        cp = subprocess.run(
            [tool("cpio"), "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=root,
            input=("\n".join(names) + "\n").encode(),
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
        )
    if cp.returncode != 0:
        raise VmError(f"cpio of {root} failed: {cp.stderr.decode(errors='replace')}")


# --- the host's side of the conversation --------------------------------------------------------


class HostChannel:
    """An HTTP server on 127.0.0.1 through which the guest asks for host steps (`host NAME ARGS`).

    steps maps NAME to a function of the request's arguments returning a short text; the guest
    sees `ok TEXT`, or `error ...` if it raised (the exception is also kept in `errors`, so the
    test fails on it even if the guest did not). Every request is logged to `log`.

    The steps run in the thread that calls `serve_pending` (run_guest's caller, i.e. the test's
    own thread), never in the HTTP server's threads: a process a step starts (nbdkit with
    --exit-with-parent, i.e. PR_SET_PDEATHSIG) dies with the thread that started it, and must
    outlive the request.
    """

    def __init__(
        self, steps: dict[str, Callable[..., str | None]], log: Callable[[str], None]
    ) -> None:
        self.steps = steps
        self.log = log
        self.errors: list[str] = []
        self.calls: list[tuple[str, ...]] = []
        self.requests: queue.Queue[tuple[list[str], queue.Queue[str]]] = queue.Queue()
        channel = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                parts = [urllib.parse.unquote(p) for p in self.path.split("/") if p]
                answer: queue.Queue[str] = queue.Queue(1)
                channel.requests.put((parts, answer))
                try:
                    body = answer.get(timeout=3600)
                except queue.Empty:
                    body = "error: the host did not answer"
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve_pending(self, wait: float) -> None:
        """Run the steps the guest asked for (waiting up to `wait` seconds for the first)."""
        try:
            parts, answer = self.requests.get(timeout=wait)
        except queue.Empty:
            return
        answer.put(self.handle(parts))
        while True:
            try:
                parts, answer = self.requests.get_nowait()
            except queue.Empty:
                return
            answer.put(self.handle(parts))

    def handle(self, parts: list[str]) -> str:
        if not parts:
            return "error: no step named"
        name, args = parts[0], parts[1:]
        self.calls.append(tuple(parts))
        step = self.steps.get(name)
        if step is None:
            msg = f"error: no host step {name!r}"
            self.errors.append(msg)
            self.log(f"[host] {' '.join(parts)} -> {msg}")
            return msg
        self.log(f"[host] {' '.join(parts)} ...")
        try:
            text = step(*args) or ""
        except BaseException as e:  # reported to the guest and to the test
            msg = f"error: {type(e).__name__}: {e}".replace("\n", " | ")
            self.errors.append(f"{' '.join(parts)}: {type(e).__name__}: {e}")
            self.log(f"[host] {' '.join(parts)} -> {msg}")
            return msg
        self.log(f"[host] {' '.join(parts)} -> ok {text}".rstrip())
        return f"ok {text}".rstrip()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- run ---------------------------------------------------------------------------------------


@dataclass
class GuestResult:
    """What a guest run gave: the script's status and output, the whole console, timings."""

    status: int | None  # the script's exit status; None if the guest never said
    output: str  # the script's part of the console (between @@VM-READY and @@VM-EXIT)
    console: str  # everything, with host steps interleaved, each line timestamped
    qemu_status: int | None
    boot_seconds: float | None  # qemu start to @@VM-READY (wall clock)
    script_seconds: float | None  # @@VM-READY to @@VM-EXIT (wall clock)
    total_seconds: float
    marks: list[str] = field(default_factory=list)
    host_errors: list[str] = field(default_factory=list)

    def check(self, marks: list[str] | None = None) -> GuestResult:
        """Fail (with the whole console) unless the script exited 0, every host step worked and
        the marks, if given, are exactly these in this order."""
        problems = []
        if self.status is None:
            problems.append(
                f"the guest never reported its script's exit status (qemu: {self.qemu_status})"
            )
        elif self.status != 0:
            problems.append(f"the guest script exited {self.status}")
        if self.host_errors:
            problems.append(f"host steps failed: {self.host_errors}")
        if marks is not None and self.marks != marks:
            problems.append(f"marks {self.marks} != expected {marks}")
        if problems:
            raise VmError("; ".join(problems) + "\n--- console ---\n" + self.console)
        return self


def _script_archive(workdir: Path, script: str, env: dict[str, str]) -> Path:
    root = workdir / "vm-run"
    shutil.rmtree(root, ignore_errors=True)
    (root / "vm").mkdir(parents=True)
    (root / "vm/script.sh").write_text(script)
    quoted = {k: "'" + v.replace("'", "'\\''") + "'" for k, v in env.items()}
    (root / "vm/env").write_text("".join(f"export {k}={v}\n" for k, v in sorted(quoted.items())))
    archive = workdir / "vm-run.cpio"
    _cpio(root, archive)
    return archive


def run_guest(
    script: str,
    *,
    workdir: Path,
    env: dict[str, str] | None = None,
    steps: dict[str, Callable[..., str | None]] | None = None,
    image: GuestImage | None = None,
    timeout: float = 300.0,
    memory: str = "512",
    echo: Callable[[str], None] | None = None,
) -> GuestResult:
    """Boot the guest, run script (POSIX sh, busybox ash) in it, power off; never leaves qemu
    running. env becomes exported variables; VM_HOST_IP/VM_HOST_PORT reach the HostChannel
    serving steps. The console is also written to workdir/guest-N.log as it comes."""
    image = image or build()
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("guest-*.log")))
    logpath = workdir / f"guest-{n}.log"
    t0 = time.monotonic()
    lines: list[str] = []
    lock = threading.Lock()
    logf = open(logpath, "w")  # noqa: SIM115 (closed in finally)

    def record(text: str) -> None:
        stamped = f"{time.monotonic() - t0:7.2f} {text}"
        with lock:
            lines.append(stamped)
            logf.write(stamped + "\n")
            logf.flush()
        if echo:
            echo(stamped)

    channel = HostChannel(steps or {}, record)
    full_env = {"VM_HOST_IP": HOST_IP, "VM_HOST_PORT": str(channel.port), **(env or {})}
    initrd = workdir / "vm-initrd.cpio"
    proc: subprocess.Popen[bytes] | None = None
    ready_at: float | None = None
    exit_at: float | None = None
    status: int | None = None
    try:
        archive = _script_archive(workdir, script, full_env)
        with open(initrd, "wb") as out:
            for part in (image.initrd, archive):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        cmd = [
            tool("qemu-system-x86_64"),
            "-accel", "tcg",
            "-m", memory,
            "-smp", "1",
            "-nographic",
            "-no-reboot",
            "-kernel", str(image.kernel),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 edd=off quiet",
            "-netdev", "user,id=n0",
            "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        record("[host] " + " ".join(cmd))
        # qemu dies with this thread even if the test process is killed (PR_SET_PDEATHSIG, set
        # by setpriv just before it executes qemu: no preexec_fn in a threaded process).
        setpriv = shutil.which("setpriv")
        wrap = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        proc = subprocess.Popen(
            wrap + cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        stdout = proc.stdout

        def reader() -> None:
            nonlocal ready_at, exit_at, status
            for raw in iter(stdout.readline, b""):
                text = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
                text = _ESCAPES.sub("", text)
                m = _INIT_MARK.search(text)
                if m and m.group(1) == "READY" and ready_at is None:
                    ready_at = time.monotonic()
                elif m and m.group(1) == "EXIT":
                    exit_at = time.monotonic()
                    with contextlib.suppress(ValueError, IndexError):
                        status = int(m.group(2).split()[0])
                record(text)

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        deadline = time.monotonic() + timeout
        qemu_status: int | None = None
        while (qemu_status := proc.poll()) is None:
            if time.monotonic() > deadline:
                record(f"[host] the guest did not finish in {timeout}s: killing qemu {proc.pid}")
                proc.kill()
                proc.wait()
                break
            channel.serve_pending(0.1)  # host steps run here, in the caller's thread
        rt.join(10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        channel.close()
        logf.close()
    total = time.monotonic() - t0
    console = "\n".join(lines)
    output = _between(lines, "@@VM-READY", "@@VM-EXIT")
    marks = [ln.split("@@MARK ", 1)[1].strip() for ln in lines if "@@MARK " in ln]
    return GuestResult(
        status=status,
        output=output,
        console=console,
        qemu_status=qemu_status,
        boot_seconds=None if ready_at is None else ready_at - t0,
        script_seconds=None if ready_at is None or exit_at is None else exit_at - ready_at,
        total_seconds=total,
        marks=marks,
        host_errors=list(channel.errors),
    )


def _between(lines: list[str], start: str, end: str) -> str:
    out: list[str] = []
    inside = False
    for stamped in lines:
        text = stamped[8:]
        if end in text:
            break
        if inside:
            out.append(text)
        if start in text:
            inside = True
    return "\n".join(out)


# --- command line (scripts/nbd-vm.sh) -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nbd-vm",
        description="Build (once, cached) and run the qemu guest with Debian's kernel, its NBD "
        "driver and nbd-client. The guest reaches the host's 127.0.0.1:PORT as 10.0.2.2:PORT.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the guest if needed; print where it is and timings")
    r = sub.add_parser("run", help="run a shell script in the guest; exit with its status")
    r.add_argument("script", help="a POSIX sh file (busybox ash), '-' for stdin")
    r.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="export K=V in the guest"
    )
    r.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    t0 = time.monotonic()
    image = build(log=lambda s: print(f"nbd-vm: {s}", file=sys.stderr))
    took = time.monotonic() - t0
    if a.cmd == "build":
        print(
            json.dumps(
                {**image.manifest, "dir": str(image.dir), "seconds": round(took, 2)}, indent=2
            )
        )
        return 0
    script = sys.stdin.read() if a.script == "-" else Path(a.script).read_text()
    env = dict(kv.split("=", 1) for kv in a.env)
    with tempfile.TemporaryDirectory(prefix="nbd-vm-") as tmp:
        res = run_guest(
            script,
            workdir=Path(tmp),
            env=env,
            image=image,
            timeout=a.timeout,
            echo=print,
        )

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}s"

    print(
        f"nbd-vm: guest ready in {took:.2f}s, boot {secs(res.boot_seconds)}, script "
        f"{secs(res.script_seconds)}, total {res.total_seconds:.2f}s, status {res.status}",
        file=sys.stderr,
    )
    return 125 if res.status is None else res.status


if __name__ == "__main__":
    sys.exit(main())
