#!/usr/bin/env bash
# Set up everything dittofs needs on a Debian 12 machine: the system packages (nbdkit with its
# Python plugin, libnbd's Python binding and tools, python3-xxhash for data checksums, FUSE,
# e2fsprogs, fio, qemu-utils) and the virtual environment .venv/ at the repository root, made
# from /usr/bin/python3 (the interpreter nbdkit embeds) with system site-packages so Debian's
# python3-libnbd and python3-xxhash are importable, and the project installed into it
# (.venv/bin/snapctl). Also what tests/vm.py needs to build and boot
# the qemu guest that tests the kernel's NBD driver (qemu-system-x86, busybox-static, cpio, kmod;
# the guest's kernel package itself is fetched by the tests with `apt-get download`, so the
# package lists must know linux-image-amd64). Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin python3-venv python3-pip python3-xxhash
  fuse3 e2fsprogs util-linux kmod fio qemu-utils procps psmisc iproute2 nbd-client
)

# The nbd-client guest (tests/vm.py), installed without recommends (qemu's would add a GUI).
VM_PACKAGES=(qemu-system-x86 busybox-static cpio kmod)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
updated=""
apt_update() { [ -n "$updated" ] || { $SUDO apt-get update -qq; updated=1; }; }
not_installed() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

mapfile -t missing < <(not_installed "${PACKAGES[@]}")
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mapfile -t missing < <(not_installed "${VM_PACKAGES[@]}")
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]} (for the nbd-client guest)"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# The guest's kernel is the package linux-image-amd64 depends on: the lists must name it.
apt-cache depends linux-image-amd64 2>/dev/null | grep 'Depends: linux-image-' >/dev/null || {
  echo "setup: apt-get update (the package lists do not know linux-image-amd64)"
  apt_update
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nbd' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.dittofs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
.venv/bin/python -c 'import nbd, click, rich, pytest' || {
  echo "setup: the virtual environment is incomplete" >&2; exit 1; }
