#!/usr/bin/env bash
# A qemu guest with Debian's kernel, its NBD driver and nbd-client, for machines without the NBD
# module (tests/vm.py does the work; tests/test_t7_nbd_client.py uses it):
#
#   scripts/nbd-vm.sh build                  # build once (cached in .cache/nbd-vm/); print it
#   scripts/nbd-vm.sh run SCRIPT [-e K=V]... # boot, run SCRIPT (busybox sh) in the guest,
#                                            # show the console, exit with SCRIPT's status
#
# The guest reaches the host's 127.0.0.1:PORT as 10.0.2.2:PORT, e.g. with a server from
# `snapctl serve pool.img --port 10809 --background`:
#
#   echo 'nbd-client 10.0.2.2 10809 /dev/nbd0 -N live && mount /dev/nbd0 /mnt && ls /mnt' |
#     scripts/nbd-vm.sh run -
#
# Needs qemu-system-x86, busybox-static, cpio and kmod (scripts/setup.sh installs them) and apt
# (the kernel package is fetched with apt-get download). DITTOFS_VM_CACHE=DIR moves the cache.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" "$REPO/tests/vm.py" "$@"
