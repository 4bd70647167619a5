#!/usr/bin/env bash
# PostgreSQL on ext4 over Ferry volumes, for the lab (deploy/lab/pg-cycle.sh): the data dir on one
# volume, the WAL on another (initdb --waldir), each reached as a file through nbdfuse, as a block
# device through a loop device, and mounted.
#
#   pg-hook.sh start --state DIR     # an agent's start hook: FERRY_VOLUMES names the two
#                                    # volumes (…pgdata, …pgwal); mount both, point pg_wal at the
#                                    # WAL mount, start PostgreSQL (its own crash recovery)
#   pg-hook.sh stop --state DIR      # an agent's stop hook: stop PostgreSQL (fast), unmount all
#   pg-hook.sh mount SOCKET EXPORT RUN/NAME   # one volume: nbdfuse, loop, mount (prints the mount)
#   pg-hook.sh umount RUN/NAME
#   pg-hook.sh pg-start RUN | pg-stop RUN
#
# A run directory (DIR/RUN, RUN named after FERRY_RECOVERY_ID or "home") holds fuse-NAME/,
# NAME/ (the mount), sock/ (PostgreSQL's socket directory, no TCP), pg.log. PostgreSQL runs as
# the postgres user from /usr/lib/postgresql/15/bin.
set -euo pipefail

PGBIN=/usr/lib/postgresql/15/bin
die() { printf 'pg-hook.sh: error: %s\n' "$*" >&2; exit 2; }
log() { printf '%s pg-hook: %s\n' "$(date +%T.%N)" "$*"; }

EVENTS=/dev/null
# check_volume WHEN DIR LOOP: e2fsck -fn of the unmounted file system on LOOP, recorded in the
# events file ("fsck WHEN dir=DIR clean|dirty: first problems"); when the state dir holds a file
# named hash-volumes, the sha256 of the volume too, read over an NBD connection of its own (the
# export's bytes, past the loop's and nbdfuse's caches; slow: the whole volume is read). The soak
# compares what the recovery host left at its stop with what the failback brought home.
check_volume() {
  local when="$1" dir="$2" loop="$3" out verdict
  if out="$(e2fsck -fn "$loop" 2>&1)"; then verdict=clean
  else verdict="dirty: $(printf '%s\n' "$out" | grep -v '^Pass \|^e2fsck \|^$\|files (' | head -n 4 | tr '\n' ' ')"
  fi
  echo "$(date +%s.%N) fsck $when dir=$dir $verdict" >>"$EVENTS"
  # e2fsck read through the loop device's page cache, which a file system's own zeroing (bios
  # past that cache) would leave stale under it: drop it.
  blockdev --flushbufs "$loop" 2>/dev/null || true
  if [ -e "${EVENTS%/events}/hash-volumes" ] && [ -s "$dir.uri" ]; then
    echo "$(date +%s.%N) sha256 $when dir=$dir $(nbdcopy "$(cat "$dir.uri")" - | sha256sum | cut -d' ' -f1)" >>"$EVENTS"
  fi
}

mount_volume() {  # mount_volume SOCKET EXPORT DIR
  local socket="$1" export="$2" dir="$3"
  mkdir -p "$dir" "$dir.fuse"
  echo "nbd+unix:///$export?socket=$socket" >"$dir.uri"
  nbdfuse "$dir.fuse/disk" "nbd+unix:///$export?socket=$socket" >"$dir.nbdfuse.log" 2>&1 &
  echo $! >"$dir.nbdfuse.pid"
  local i
  for ((i = 0; i < 100; i++)); do [ -e "$dir.fuse/disk" ] && break; sleep 0.1; done
  [ -e "$dir.fuse/disk" ] || die "nbdfuse did not serve $export ($(cat "$dir.nbdfuse.log"))"
  local loop
  loop="$(losetup -f --show "$dir.fuse/disk")"
  echo "$loop" >"$dir.loop"
  check_volume before-mount "$dir" "$loop"
  mount -t ext4 "$loop" "$dir"
  log "$export mounted at $dir ($loop)"
}

umount_volume() {  # umount_volume DIR: whatever of it is there
  local dir="$1" i
  # A database just stopped may still be releasing it; a fenced volume's last writes fail slowly.
  for ((i = 0; i < 100; i++)); do
    mountpoint -q "$dir" || break
    umount "$dir" 2>/dev/null && break
    sleep 0.1
  done
  mountpoint -q "$dir" && { umount "$dir" || die "cannot unmount $dir"; }
  # The loop device writes into the FUSE file's page cache: fsync that file before anything is
  # let go, so every block the file system wrote reaches nbdfuse and the export (a lazy unmount
  # and a killed nbdfuse would drop what is still cached there: a file system missing its last
  # writes, copied home by a failback).
  [ -e "$dir.fuse/disk" ] && sync "$dir.fuse/disk" 2>/dev/null
  if [ -s "$dir.loop" ]; then check_volume after-umount "$dir" "$(cat "$dir.loop")"; fi
  if [ -s "$dir.loop" ]; then losetup -d "$(cat "$dir.loop")" 2>/dev/null || true; rm -f "$dir.loop"; fi
  [ -e "$dir.fuse/disk" ] && sync "$dir.fuse/disk" 2>/dev/null
  # (A FUSE mount whose server died answers ENOTCONN to mountpoint: ask the mount table.)
  if grep -q " $dir.fuse fuse" /proc/self/mounts; then
    fusermount3 -u "$dir.fuse" 2>/dev/null || fusermount3 -uz "$dir.fuse" 2>/dev/null || umount -l "$dir.fuse" || true
  fi
  if [ -s "$dir.nbdfuse.pid" ]; then
    local p; p="$(cat "$dir.nbdfuse.pid")"
    kill "$p" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    rm -f "$dir.nbdfuse.pid"
  fi
}

pg_start() {  # pg_start RUN: PostgreSQL on RUN/data (data dir RUN/data/pgdata, WAL RUN/wal/wal)
  local run="$1"
  mkdir -p "$run/sock"
  chown postgres: "$run/sock" "$run"
  # initdb --waldir made pg_wal an absolute symlink to the source's WAL mount: here it is ours.
  ln -sfn "$run/wal/wal" "$run/data/pgdata/pg_wal"
  chown -h postgres: "$run/data/pgdata/pg_wal"
  rm -f "$run/data/pgdata/postmaster.pid"
  # One log per start: what this start did (crash recovery or not) is read from it.
  [ -e "$run/pg.log" ] && mv "$run/pg.log" "$run/pg.log.$(date +%s%N)"
  runuser -u postgres -- "$PGBIN/pg_ctl" start -w -t 300 -D "$run/data/pgdata" -l "$run/pg.log" \
    -o "-c listen_addresses='' -c unix_socket_directories='$run/sock'" >/dev/null
  log "PostgreSQL up on $run (socket dir $run/sock)"
}

pg_stop() {
  local run="$1"
  [ -e "$run/data/pgdata/postmaster.pid" ] || return 0
  runuser -u postgres -- "$PGBIN/pg_ctl" stop -w -t 120 -m fast -D "$run/data/pgdata" >/dev/null || true
}

volume_socket() {  # volume_socket SUFFIX: the FERRY_VOLUMES entry whose name ends in SUFFIX
  local v
  for v in ${FERRY_VOLUMES:-}; do
    case "${v%%=*}" in *"$1") echo "$v"; return ;; esac
  done
  die "no volume ending in $1 in FERRY_VOLUMES (${FERRY_VOLUMES:-})"
}

cmd="${1:-}"; shift || true
state=""
if [ "${1:-}" = --state ]; then state="$2"; shift 2; EVENTS="$state/events"; fi
case "$cmd" in
  start)
    [ -n "$state" ] || die "start needs --state"
    run="$state/${FERRY_RECOVERY_ID:-home}"
    mkdir -p "$run"
    echo "$(date +%s.%N) start run=$run mode=${FERRY_MODE:-} network=${FERRY_NETWORK:-}" >>"$state/events"
    d="$(volume_socket pgdata)" w="$(volume_socket pgwal)"
    mount_volume "${d#*=}" "${d%%=*}" "$run/data"
    mount_volume "${w#*=}" "${w%%=*}" "$run/wal"
    pg_start "$run"
    echo "$(date +%s.%N) ready run=$run" >>"$state/events"
    ;;
  stop)
    [ -n "$state" ] || die "stop needs --state"
    # This host's databases (of this recovery only, when a recovery stops).
    for run in "$state"/*/; do
      run="${run%/}"
      [ -d "$run/data" ] || continue
      [ -z "${FERRY_RECOVERY_ID:-}" ] || [ "${run##*/}" = "$FERRY_RECOVERY_ID" ] || continue
      pg_stop "$run"
      umount_volume "$run/wal"
      umount_volume "$run/data"
      echo "$(date +%s.%N) stopped run=$run" >>"$state/events"
      log "PostgreSQL stopped, $run unmounted"
    done
    ;;
  mount) mount_volume "$1" "$2" "$3" ;;
  umount) umount_volume "$1" ;;
  pg-start) pg_start "$1" ;;
  pg-stop) pg_stop "$1" ;;
  *) die "usage: pg-hook.sh start|stop --state DIR | mount SOCKET EXPORT DIR | umount DIR | pg-start RUN | pg-stop RUN" ;;
esac
