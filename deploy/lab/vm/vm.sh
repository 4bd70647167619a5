#!/usr/bin/env bash
# Starts and stops the lab's guest (see guest.sh) with qemu: its disks are Ferry exports
# (nbd+unix URIs), its console a socket logged to a file, its NIC a tap on a lab bridge.
#
#   vm.sh start --state DIR --disk URI [--disk URI...] [--name NAME] [--cpus N] [--memory MIB]
#               [--mac MAC] [--role workload|check] [--net CIDR,GATEWAY --bridge-netns NS]
#               [--probe ADDR,...] [--guest DIR] [--accel auto|kvm|tcg]
#   vm.sh stop --state DIR [--timeout SECONDS]    # "stop" on the console: a clean shutdown
#   vm.sh kill --state DIR                         # SIGKILL (a host that died)
#   vm.sh accel --guest DIR                        # kvm if a guest boots under KVM here, else tcg
#
# start runs qemu in the current network namespace (an agent's hook runs in its host's); with
# --net the tap is then moved into NS and enslaved to its br0 (a lab router's or P-test's), and
# the guest takes the address CIDR's network + its MAC's last byte, default route GATEWAY.
# DIR gets qemu.pid, console.log (everything the guest printed), console.sock and netns.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { printf 'vm.sh: error: %s\n' "$*" >&2; exit 2; }

state="" name="" cpus=1 memory=256 mac="" role=workload net="" bridge_ns="" probe="" guest="" accel=auto timeout=60
disks=()
cmd="${1:-}"; shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --state) state="$2"; shift 2 ;;
    --disk) disks+=("$2"); shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --mac) mac="$2"; shift 2 ;;
    --role) role="$2"; shift 2 ;;
    --net) net="$2"; shift 2 ;;
    --bridge-netns) bridge_ns="$2"; shift 2 ;;
    --probe) probe="$2"; shift 2 ;;
    --guest) guest="$2"; shift 2 ;;
    --accel) accel="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
guest="${guest:-${FERRY_LAB_GUEST:-/var/tmp/ferry-lab-guest}}"

# The accelerator: KVM only if a guest actually boots under it here (nested KVM can take the
# guest's kernel and never run it); the answer is kept beside the guest.
probe_accel() {
  if [ -s "$guest/accel" ]; then cat "$guest/accel"; return; fi
  local result=tcg dir
  if [ -w /dev/kvm ]; then
    dir="$(mktemp -d)"
    timeout 20 qemu-system-x86_64 -accel kvm -m 128 -nodefaults -no-user-config -display none -no-reboot \
      -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" -append "console=ttyS0 quiet ferry.role=probe" \
      -serial "file:$dir/console" >/dev/null 2>&1 || true
    grep -q "FERRY BOOTED" "$dir/console" 2>/dev/null && result=kvm
    rm -rf "$dir"
  fi
  echo "$result" > "$guest/accel"
  echo "$result"
}

tap_name() { echo "ft$(printf '%s' "$state" | md5sum | cut -c1-10)"; }

case "$cmd" in
start)
  [ -n "$state" ] && [ "${#disks[@]}" -gt 0 ] || die "start needs --state and --disk"
  [ -s "$guest/vmlinuz" ] || die "no guest in $guest: deploy/lab/vm/guest.sh build $guest"
  mkdir -p "$state"
  if [ -s "$state/qemu.pid" ] && kill -0 "$(cat "$state/qemu.pid")" 2>/dev/null; then die "a guest already runs from $state"; fi
  rm -f "$state/qemu.pid" "$state/console.sock" "$state/netns"
  [ "$accel" = auto ] && accel="$(probe_accel)"
  append="console=ttyS0 quiet ferry.role=$role"
  args=(-name "guest=${name:-guest}" -accel "$accel" -smp "$cpus" -m "${memory}M" -nodefaults -no-user-config
        -display none -no-reboot -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img"
        -chardev "socket,id=con,path=$state/console.sock,server=on,wait=off,logfile=$state/console.log,logappend=on"
        -serial chardev:con -daemonize -pidfile "$state/qemu.pid")
  for d in "${disks[@]}"; do args+=(-drive "file=$d,format=raw,if=virtio,cache=none"); done
  tap=""
  if [ -n "$net" ]; then
    [ -n "$mac" ] && [ -n "$bridge_ns" ] || die "--net needs --mac and --bridge-netns"
    tap="$(tap_name)"
    ip link del "$tap" 2>/dev/null || true
    ip tuntap add dev "$tap" mode tap
    # A start that fails from here on takes its tap with it (wherever it went).
    trap 'ip link del "$tap" 2>/dev/null || ip -n "$bridge_ns" link del "$tap" 2>/dev/null || true' ERR
    args+=(-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "virtio-net-pci,netdev=n0,mac=$mac")
    append+=" ferry.net=$net"
    [ -n "$probe" ] && append+=" ferry.probe=$probe"
  fi
  echo "$(date +%s.%N) start accel=$accel cpus=$cpus memory=${memory}M mac=${mac:-none} net=${net:-none} bridge=${bridge_ns:-none}" >> "$state/events"
  qemu-system-x86_64 "${args[@]}" -append "$append"
  if [ -n "$tap" ]; then
    # qemu holds the tap open; the device itself moves onto the lab bridge.
    ip link set "$tap" netns "$bridge_ns"
    ip -n "$bridge_ns" link set "$tap" master br0 up
    echo "$bridge_ns $tap" > "$state/netns"
  fi
  cat "$state/qemu.pid"
  ;;
stop|kill)
  [ -n "$state" ] || die "$cmd needs --state"
  pid="$(cat "$state/qemu.pid" 2>/dev/null || true)"
  rc=0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    if [ "$cmd" = stop ]; then
      # The guest's init reads "stop" on its console, stops committing, unmounts and powers off.
      /usr/bin/python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"\nstop\n"); s.close()' \
        "$state/console.sock" || true
      for ((i = 0; i < timeout * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then echo "vm.sh: the guest did not stop in ${timeout}s: killed" >&2; rc=1; fi
    fi
    kill -9 "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ -s "$state/netns" ]; then
    read -r ns tap < "$state/netns"
    ip -n "$ns" link del "$tap" 2>/dev/null || true
  fi
  rm -f "$state/qemu.pid" "$state/netns"
  echo "$(date +%s.%N) $cmd rc=$rc" >> "$state/events"
  exit "$rc"
  ;;
accel)
  probe_accel
  ;;
*) die "usage: vm.sh start|stop|kill|accel ..." ;;
esac
