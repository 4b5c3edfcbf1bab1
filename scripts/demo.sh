#!/usr/bin/env bash
# Try dittofs on a fresh Debian 12 machine, end to end, through the real kernel:
#
#   sudo scripts/demo.sh
#
# It sets the machine up (scripts/setup.sh), makes a 1 GiB thin image-file pool, serves it with
# nbdkit, attaches the `live` export to the kernel as a block device (nbd-client where the
# kernel has its NBD driver, /dev/nbd0; otherwise nbdfuse + a loop device), puts ext4 on it and
# writes some files, takes the snapshot `before`, changes the files, then mounts `live@before`
# read-only next to `live` and shows the difference. Everything it started, attached or mounted
# is torn down again on exit, even after an error or Ctrl-C.
#
# Environment: DEMO_DIR=DIR (work directory; default: a new one under /tmp),
# KEEP_DEMO=1 (keep DIR and its pool.img afterwards), DEMO_COW=move|copy (default move),
# DITTOFS_KERNEL_METHOD=nbdfuse|nbd-client (force one way of attaching).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)

if [ -t 1 ]; then B=$'\033[1m' C=$'\033[1;36m' G=$'\033[32m' R=$'\033[1;31m' N=$'\033[0m'
else B="" C="" G="" R="" N=""; fi
STEP=0
step() { STEP=$((STEP + 1)); printf '\n%s==> [%d] %s%s\n' "$C" "$STEP" "$*" "$N"; }
say() { printf '    %s\n' "$*"; }
exec 3>&1 # show() prints its command line here, even inside $(...) and pipes
quoted() { # the arguments as one shell-readable line, quoting only where needed
  local a out=""
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}
show() { printf '    %s$ %s%s\n' "$B" "$(quoted "$@")" "$N" >&3; "$@"; }
die() { printf '%sdemo: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  die "this demo must run as root: it attaches block devices (loop or nbd) and mounts file
      systems. Run it as:  sudo $0"
fi

# --- teardown: a stack of undo actions, run in reverse on any exit ---------------------------
UNDO=()
undo_push() { UNDO+=("$(printf '%q ' "$@")"); } # COMMAND ARGS...: run at exit
cleanup() {
  local rc=$? i
  set +e
  trap - EXIT INT TERM
  if ((${#UNDO[@]})); then
    printf '\n%s==> cleaning up%s\n' "$C" "$N"
    for ((i = ${#UNDO[@]} - 1; i >= 0; i--)); do eval "${UNDO[i]}"; done
  fi
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    local left
    left=$(findmnt -n -l -o SOURCE,TARGET | grep -F "$WORK/"
      losetup --list --noheadings -O NAME,BACK-FILE | grep -F "$WORK/"
      [ -z "${NBDKIT_PID:-}" ] || ! pid_alive "$NBDKIT_PID" || echo "nbdkit pid $NBDKIT_PID")
    if [ -n "$left" ]; then
      printf '%sdemo: still attached or mounted (left in place):%s\n%s\n' "$R" "$N" "$left" >&2
      rc=1
    elif [ "${KEEP_DEMO:-0}" = 1 ]; then
      say "kept $WORK (pool image: $WORK/pool.img)"
    else # only what the demo made: DEMO_DIR may hold other things
      rm -rf "$WORK/pool.img" "$WORK/run" "$WORK"/*.log "$WORK"/*.pid "$WORK"/*.sock
      [ "$MADE_WORK" = 0 ] || rmdir "$WORK"
    fi
  fi
  if [ "$rc" -eq 0 ]; then
    printf '\n%sDone: nothing is left mounted, attached or running.%s\n' "$G" "$N"
  else
    printf '\n%sdemo failed (exit %d); see the messages above.%s\n' "$R" "$rc" "$N" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_until() { # TIMEOUT_SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}
is_mounted() { findmnt -n --mountpoint "$1" >/dev/null; } # no stat: safe on a dead FUSE
pct() { # percent-encode for an NBD URI (keeps / and @)
  local LC_ALL=C s=$1 out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in [A-Za-z0-9/._~@-]) out+=$c ;; *) printf -v c '%%%02X' "'$c"; out+=$c ;; esac
  done
  printf '%s' "$out"
}
uri() { printf 'nbd+unix:///%s?socket=%s' "$(pct "$1")" "$(pct "$SOCK")"; } # EXPORT
pid_alive() { # PID: running (a zombie, exited but not yet reaped, counts as gone)
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$st" ] && [ "${st:0:1}" != Z ]
}
pid_gone() { ! pid_alive "$1"; }
not_mounted() { ! is_mounted "$1"; }
unmount_now() { not_mounted "$1" || umount "$1" 2>/dev/null; }
fuse_unmount_now() { not_mounted "$1" || fusermount3 -u "$1" 2>/dev/null; }
sysfs_is() { [ "$(cat "$1" 2>/dev/null)" = "$2" ]; }
sysfs_is_not() { ! sysfs_is "$@"; }
retry_umount() { # MOUNTPOINT
  wait_until 20 unmount_now "$1" \
    || { echo "demo: umount $1 failed; lazy unmount" >&2; umount -l "$1"; }
}
unmount_dir() { # MOUNTPOINT
  fsfreeze -u "$1" 2>/dev/null # in case the demo stopped while it was frozen
  retry_umount "$1"
  rmdir "$1" 2>/dev/null
  say "unmounted $1"
}
detach_nbd() { # /dev/nbdN
  nbd-client -d "$1" >/dev/null
  wait_until 10 sysfs_is "/sys/block/${1#/dev/}/size" 0 || echo "demo: $1 is still connected" >&2
  say "disconnected $1"
}

# --- 1. setup ------------------------------------------------------------------------------
step "Setting up the machine (scripts/setup.sh: packages and .venv)"
"$REPO/scripts/setup.sh"
SNAPCTL="$REPO/.venv/bin/snapctl"
for t in nbdkit mkfs.ext4 fsfreeze losetup mount sha256sum diff; do
  command -v "$t" >/dev/null || die "$t is missing after setup"
done

METHOD=${DITTOFS_KERNEL_METHOD:-}
if [ -z "$METHOD" ]; then
  if [ -e /dev/nbd0 ]; then METHOD=nbd-client; else METHOD=nbdfuse; fi
fi
case $METHOD in
  nbd-client)
    command -v nbd-client >/dev/null || die "nbd-client is missing (the kernel's NBD driver is
      used where /dev/nbd0 exists): apt-get install nbd-client, or DITTOFS_KERNEL_METHOD=nbdfuse"
    [ -e /dev/nbd0 ] || modprobe nbd 2>/dev/null || true
    [ -e /dev/nbd0 ] || die "no /dev/nbd0: this kernel has no NBD driver (try DITTOFS_KERNEL_METHOD=nbdfuse)" ;;
  nbdfuse)
    command -v nbdfuse >/dev/null || die "nbdfuse is missing: apt-get install libnbd-bin"
    command -v fusermount3 >/dev/null || die "fusermount3 is missing: apt-get install fuse3"
    [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
    [ -e /dev/fuse ] || die "no /dev/fuse: this kernel has no FUSE"
    [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
    [ -e /dev/loop-control ] || die "no /dev/loop-control: this kernel has no loop devices" ;;
  *) die "DITTOFS_KERNEL_METHOD must be nbdfuse or nbd-client, not $METHOD" ;;
esac

MADE_WORK=1
if [ -n "${DEMO_DIR:-}" ]; then
  for f in pool.img nbd.sock control.sock run; do
    [ ! -e "$DEMO_DIR/$f" ] || die "$DEMO_DIR/$f exists already: remove it or pick another DEMO_DIR"
  done
  [ ! -d "$DEMO_DIR" ] || MADE_WORK=0
  WORK=$(mkdir -p "$DEMO_DIR" && cd "$DEMO_DIR" && pwd) # set only now: cleanup removes in it
else
  WORK=$(mktemp -d /tmp/dittofs-demo.XXXXXX)
fi
export DITTOFS_RUNDIR="$WORK/run" # the server's run-state file, where snapctl finds it
POOL="$WORK/pool.img"
SOCK="$WORK/nbd.sock"

# --- 2. the pool and its server ------------------------------------------------------------
step "Starting nbdkit: a new 1 GiB thin pool in an image file"
say "work directory: $WORK"
NBDKIT_PID=""
stop_nbdkit() {
  [ -n "$NBDKIT_PID" ] || return 0
  kill -TERM "$NBDKIT_PID" 2>/dev/null
  wait_until 30 pid_gone "$NBDKIT_PID" \
    || { echo "demo: nbdkit $NBDKIT_PID ignored SIGTERM; killing it" >&2; kill -KILL "$NBDKIT_PID"; }
  wait "$NBDKIT_PID" 2>/dev/null
  say "stopped nbdkit (pid $NBDKIT_PID)"
}
# In the foreground (-f) as a background job of this shell: its PID is known at once, and
# --exit-with-parent stops it even if this script is killed outright. setsid keeps Ctrl-C
# (SIGINT to the terminal's process group) from stopping it under the mounted file system.
NBDKIT_ARGS=(-f --exit-with-parent -U "$SOCK" -P "$WORK/nbdkit.pid"
  python "$REPO/plugin/plugin.py" disk="$POOL" size=1G control="$WORK/control.sock"
  cow="${DEMO_COW:-move}")
printf '    %s$ %s &%s\n' "$B" "$(quoted nbdkit "${NBDKIT_ARGS[@]}")" "$N"
setsid nbdkit "${NBDKIT_ARGS[@]}" </dev/null >>"$WORK/nbdkit.log" 2>&1 &
NBDKIT_PID=$!
undo_push stop_nbdkit
nbdkit_ready() {
  pid_alive "$NBDKIT_PID" || { sed 's/^/    /' "$WORK/nbdkit.log" >&2; die "nbdkit exited"; }
  [ -s "$WORK/nbdkit.pid" ] && [ -S "$WORK/control.sock" ]
}
wait_until 30 nbdkit_ready || die "nbdkit did not come up in 30 s (log: $WORK/nbdkit.log)"
[ "$(cat "$WORK/nbdkit.pid")" = "$NBDKIT_PID" ] || die "nbdkit's PID is not $NBDKIT_PID?"
say "nbdkit is serving on $SOCK (pid $NBDKIT_PID); the image file is thin:"
show ls -lsh "$POOL"
show nbdinfo --list "$(uri "")" | grep -E '^export=|description' | sed 's/^/    /'

# --- attaching an export to the kernel -----------------------------------------------------
# attach EXPORT TAG [ro]: sets DEV to the block device and registers its teardown.
attach() {
  local export=$1 tag=$2 ro=${3:-}
  if [ "$METHOD" = nbd-client ]; then
    local d dev=""
    for d in /sys/block/nbd*; do
      if [ ! -e "$d/pid" ] && [ "$(cat "$d/size")" = 0 ]; then dev=/dev/${d##*/}; break; fi
    done
    [ -n "$dev" ] || die "no free /dev/nbdN"
    show nbd-client -unix "$SOCK" "$dev" -N "$export" ${ro:+-readonly}
    undo_push detach_nbd "$dev"
    wait_until 10 sysfs_is_not "/sys/block/${dev#/dev/}/size" 0 \
      || die "$dev did not come up"
    DEV=$dev
  else
    local dir="$WORK/fuse-$tag" pid
    mkdir -p "$dir"
    # nbdfuse stays in the foreground: run it as a background job of this shell.
    printf '    %s$ %s &%s\n' "$B" "$(quoted nbdfuse ${ro:+-r} "$dir" "$(uri "$export")")" \
      "$N" >&3
    nbdfuse ${ro:+-r} -P "$WORK/nbdfuse-$tag.pid" "$dir" "$(uri "$export")" \
      2>>"$WORK/nbdfuse-$tag.log" &
    pid=$!
    undo_push stop_nbdfuse "$dir" "$pid"
    wait_until 20 test -s "$WORK/nbdfuse-$tag.pid" \
      || { cat "$WORK/nbdfuse-$tag.log" >&2; die "nbdfuse did not start for $export"; }
    wait_until 5 test -e "$dir/nbd" || die "no $dir/nbd"
    DEV=$(show losetup --find --show ${ro:+--read-only} "$dir/nbd")
    undo_push detach_loop "$DEV" "$dir/nbd"
    say "$export is $DEV (a loop device on the FUSE file $dir/nbd)"
  fi
}
stop_nbdfuse() { # DIR PID: unmount the FUSE file system; nbdfuse (our child) then exits
  wait_until 10 fuse_unmount_now "$1" \
    || { echo "demo: fusermount3 -u $1 failed; lazy unmount" >&2; fusermount3 -uz "$1"; }
  wait_until 10 pid_gone "$2" \
    || { echo "demo: nbdfuse $2 did not exit; killing it" >&2; kill -TERM "$2"; }
  wait "$2" 2>/dev/null
  rmdir "$1" 2>/dev/null
  say "detached FUSE file $1/nbd (nbdfuse pid $2 exited)"
}
detach_loop() { # DEV BACKING_FILE
  losetup -d "$1"
  wait_until 10 sysfs_is_not "/sys/block/${1#/dev/}/loop/backing_file" "$2" \
    || echo "demo: $1 is still attached" >&2
  say "detached $1"
}
mount_at() { # DEV DIR [OPTIONS]
  mkdir -p "$2"
  show mount ${3:+-o "$3"} "$1" "$2"
  undo_push unmount_dir "$2"
}
checksums() { (cd "$1" && find . -path ./lost+found -prune -o -type f -print0 | sort -z \
  | xargs -0 sha256sum | sed 's/^\(.\{16\}\)[0-9a-f]*/\1…/; s/^/    /'); }

# --- 3. live through the kernel, ext4, files -----------------------------------------------
step "Attaching the export 'live' to the kernel ($METHOD)"
attach live live
LIVE_DEV=$DEV

step "Making an ext4 file system on live and writing files"
show mkfs.ext4 -q -L dittofs-demo "$LIVE_DEV"
LIVE="$WORK/live"
mount_at "$LIVE_DEV" "$LIVE"
mkdir -p "$LIVE/docs" "$LIVE/photos"
printf 'Shopping list\n- milk\n- bread\n' >"$LIVE/docs/notes.txt"
cp /etc/os-release "$LIVE/docs/os-release"
for i in 1 2 3; do head -c $((i * 1024 * 1024)) /dev/urandom >"$LIVE/photos/img$i.raw"; done
head -c 4M /dev/urandom >"$LIVE/data.bin"
echo "v1" >"$LIVE/VERSION"
show sync
say "files on live:"
checksums "$LIVE"

# --- 4. the snapshot -----------------------------------------------------------------------
step "Taking the snapshot 'before' (the file system is frozen for that instant)"
show fsfreeze -f "$LIVE"
show "$SNAPCTL" -d "$POOL" create before || { rc=$?; fsfreeze -u "$LIVE"; exit "$rc"; }
show fsfreeze -u "$LIVE"

step "Changing files on live"
show sed -i 's/- bread/- bread\n- eggs/' "$LIVE/docs/notes.txt"
show rm "$LIVE/photos/img2.raw"
show dd if=/dev/urandom of="$LIVE/data.bin" bs=64K count=4 seek=10 conv=notrunc status=none
show cp /etc/hostname "$LIVE/docs/hostname"
echo "v2" >"$LIVE/VERSION"
show sync

# --- 5. the snapshot through the kernel, next to live --------------------------------------
step "Attaching live@before read-only and mounting it (ro,noload)"
attach live@before before ro
SNAP_DEV=$DEV
BEFORE="$WORK/before"
mount_at "$SNAP_DEV" "$BEFORE" ro,noload

step "What changed since the snapshot"
printf '    %slive@before (the snapshot):%s\n' "$B" "$N"
checksums "$BEFORE"
printf '    %slive (now):%s\n' "$B" "$N"
checksums "$LIVE"
echo
show diff -r --exclude=lost+found "$BEFORE" "$LIVE" | sed 's/^/    /' || true
say "notes.txt then and now:"
diff -u --label "before/docs/notes.txt" --label "live/docs/notes.txt" \
  "$BEFORE/docs/notes.txt" "$LIVE/docs/notes.txt" | sed 's/^/      /' || true
if touch "$BEFORE/should-fail" 2>/dev/null; then die "the snapshot accepted a write"; fi
say "writing into the snapshot fails, as it should: it is read-only"

step "The pool's snapshots and space"
show "$SNAPCTL" -d "$POOL" list
show "$SNAPCTL" -d "$POOL" info
show ls -lsh "$POOL"
say "(the image file holds live, the snapshot's old blocks and metadata: it grew only as needed)"
