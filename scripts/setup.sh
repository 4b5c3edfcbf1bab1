#!/usr/bin/env bash
# Set up everything dittofs needs on a Debian 12 machine: the system packages (nbdkit with its
# Python plugin, libnbd's Python binding and tools, FUSE, e2fsprogs, fio, qemu-utils) and the
# virtual environment .venv/ at the repository root, made from /usr/bin/python3 (the interpreter
# nbdkit embeds) with system site-packages so Debian's python3-libnbd is importable, and the
# project installed into it (.venv/bin/snapctl). Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin python3-venv python3-pip
  fuse3 e2fsprogs util-linux kmod fio qemu-utils procps psmisc iproute2 nbd-client
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
