#!/usr/bin/env bash
# Ferry's multi-host lab: two sites, a WAN link and an isolated drill network, built from network
# namespaces on one machine. Every interface and address lives inside a namespace this script
# creates; the root namespace is never changed. Run as root. See deploy/lab/README.md.
#
#   lab.sh up [--prefix P] [--state FILE]   build the lab (default prefix fl)
#   lab.sh down [--prefix P] [--state FILE] remove it (idempotent, also after a failed up)
#   lab.sh exec HOST -- CMD...              run CMD in HOST's namespace
#   lab.sh --help                           everything else
set -euo pipefail

PROG=lab.sh
log() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
  cat <<'USAGE'
Usage: lab.sh COMMAND [--prefix P] [--state FILE] [ARGS]

A Ferry lab from network namespaces (run as root):
  primary site   10.91.1.0/24  db .11, app .12, web .13, router prim .1
  secondary site 10.91.2.0/24  ctl .10, rec1 .21, rec2 .22, router sec .1
  inter-site     10.91.3.0/24  prim .1 <-> sec .2 (interface isl0 at both ends)
  test network   10.91.4.0/24  rec1 .21, rec2 .22 (interface test0), test .1; reaches nothing else

Commands:
  up                 build the lab; refuses if a namespace of the prefix already exists
  down               kill every process inside the lab's namespaces, then delete them
                     (idempotent; works after a partial or failed up)
  cut [--silent]     partition the sites: the inter-site link goes down at both ends.
                     Default: the routers answer "network unreachable" (ICMP), so a new
                     connection across sites fails within milliseconds (ENETUNREACH)
                     and ping reports "Destination Net Unreachable".
                     --silent: the routers discard cross-site packets (blackhole routes), as
                     when a real WAN dies: connects hang until their own timeout.
                     Established TCP connections never fail at once: their data is
                     retransmitted until the application's timeout, keepalive or
                     TCP_USER_TIMEOUT (by default ~15 min) or until the link is healed.
  heal               bring the inter-site link up again and restore the routes
  shape RATE         limit the inter-site link to RATE each way (tbf; e.g. 10mbit, 500kbit,
                     1gbit); --burst BYTES and --latency MS override the defaults
                     (burst = 10 ms at RATE, at least 16 KiB; latency 100 ms of queue)
  unshape            remove the limit
  exec HOST -- CMD   run CMD in HOST's namespace; exec'd, so the pid is the command's
  addr HOST [--test] print HOST's address (--test: its test-network address; rec1, rec2)
  ns HOST            print HOST's namespace name
  status             namespaces, processes, inter-site link state and shaping

Hosts: db app web (primary), ctl rec1 rec2 (secondary), prim sec (routers), test
(a namespace on the test network, for drill clients).

Options:
  --prefix P     namespace prefix (letters, digits, _; default fl, or $FERRY_LAB_PREFIX):
                 namespaces are P-db, P-app, P-web, P-ctl, P-rec1, P-rec2, P-prim, P-sec, P-test
  --state FILE   state file (default /run/ferry-lab/P.state): up records each namespace as it
                 is made; down removes the namespaces it lists (and any other P-<host>)
  -h, --help     this text
USAGE
}

# ---- topology -------------------------------------------------------------------------------
HOSTS_PRIM=(db app web)
HOSTS_SEC=(ctl rec1 rec2)
ROUTERS=(prim sec)
ALL=(prim sec test db app web ctl rec1 rec2)   # creation order: routers and segments first
declare -A ADDR=(
  [db]=10.91.1.11 [app]=10.91.1.12 [web]=10.91.1.13 [prim]=10.91.1.1
  [ctl]=10.91.2.10 [rec1]=10.91.2.21 [rec2]=10.91.2.22 [sec]=10.91.2.1
  [test]=10.91.4.1
)
declare -A TESTADDR=([rec1]=10.91.4.21 [rec2]=10.91.4.22 [test]=10.91.4.1)
NET_PRIM=10.91.1.0/24 NET_SEC=10.91.2.0/24 NET_TEST=10.91.4.0/24
ISL_PRIM=10.91.3.1 ISL_SEC=10.91.3.2
TEST_TABLE=104   # routing table in rec1/rec2 for traffic from the test address

# ---- arguments ------------------------------------------------------------------------------
PREFIX="${FERRY_LAB_PREFIX:-fl}"
STATE=""
CMD=""
ARGS=()
EXEC_ARGV=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --state) [ $# -ge 2 ] || die "--state needs a value"; STATE="$2"; shift 2 ;;
    --state=*) STATE="${1#*=}"; shift ;;
    --) shift; EXEC_ARGV=("$@"); break ;;
    *) if [ -z "$CMD" ]; then CMD="$1"; else ARGS+=("$1"); fi; shift ;;
  esac
done
[ -n "$CMD" ] || { usage >&2; exit 2; }
[[ "$PREFIX" =~ ^[A-Za-z0-9_]{1,32}$ ]] || die "bad prefix '$PREFIX' (letters, digits, _; at most 32)"
STATE="${STATE:-/run/ferry-lab/$PREFIX.state}"

ns() { printf '%s-%s' "$PREFIX" "$1"; }
ns_exists() { [ -e "/run/netns/$1" ]; }
is_host() { local h; for h in "${ALL[@]}"; do [ "$h" = "$1" ] && return 0; done; return 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"; }
need_ip() { command -v ip >/dev/null 2>&1 || die "ip not found (Debian: apt-get install iproute2)"; }
# sysctl inside a namespace: /proc/sys/net belongs to the namespace of the writing process.
nsysctl() { ip netns exec "$1" sh -c "echo $3 > /proc/sys/net/$2"; }

check_host() {
  [ -n "${1:-}" ] || die "$CMD needs a HOST (one of: ${ALL[*]})"
  is_host "$1" || die "unknown host '$1' (one of: ${ALL[*]})"
}
check_lab() {
  local r
  for r in "${ROUTERS[@]}"; do
    ns_exists "$(ns "$r")" || die "lab '$PREFIX' is not up (no namespace $(ns "$r")); run: lab.sh up --prefix $PREFIX"
  done
}

# ---- up -------------------------------------------------------------------------------------
UP_DONE=0
up_cleanup() {
  local rc=$?
  [ "$UP_DONE" = 1 ] && return 0
  trap - EXIT INT TERM
  warn "up failed (exit $rc); removing what it made"
  do_down || true
  exit "$rc"
}

# FERRY_LAB_FAIL_AFTER=STEP makes up fail there (selftest: a failed up must remove what it made).
fail_point() {
  if [ "${FERRY_LAB_FAIL_AFTER:-}" = "$1" ]; then die "failing after step '$1' (FERRY_LAB_FAIL_AFTER)"; fi
}

state_add() { printf '%s\n' "$*" >>"$STATE"; }

mk_ns() {  # mk_ns NAME: a namespace with lo up, recorded in the state file before it exists
  state_add "ns $1"
  ip netns add "$1"
  ip -n "$1" link set lo up
}

# A veth pair from one namespace straight into another: no end ever exists in the root namespace.
veth() {  # veth NS_A IF_A NS_B IF_B
  ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
}

do_up() {
  need_root; need_ip
  local h n
  for h in "${ALL[@]}"; do
    if ns_exists "$(ns "$h")"; then die "namespace $(ns "$h") already exists: lab '$PREFIX' is up (lab.sh down --prefix $PREFIX first)"; fi
  done
  if [ -e "$STATE" ]; then die "stale state file $STATE (lab not up); lab.sh down --prefix $PREFIX removes it"; fi
  mkdir -p "$(dirname "$STATE")"
  trap up_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  printf 'prefix %s\nstarted %s\n' "$PREFIX" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$STATE"

  for h in "${ALL[@]}"; do
    n="$(ns "$h")"
    mk_ns "$n"
    # Only the routers forward; hosts (and the test segment) never do.
    if [ "$h" = prim ] || [ "$h" = sec ]; then
      nsysctl "$n" ipv4/ip_forward 1
      nsysctl "$n" ipv4/icmp_ratelimit 0   # every cut-off connect gets its "unreachable" at once
    else
      nsysctl "$n" ipv4/ip_forward 0
    fi
  done
  fail_point ns

  # Site segments: a bridge in each router namespace, the router's address on it.
  local r
  for r in prim sec; do
    n="$(ns "$r")"
    ip -n "$n" link add br0 type bridge forward_delay 0
    ip -n "$n" addr add "${ADDR[$r]}/24" dev br0
    ip -n "$n" link set br0 up
  done
  for h in "${HOSTS_PRIM[@]}" "${HOSTS_SEC[@]}"; do
    case " ${HOSTS_PRIM[*]} " in *" $h "*) r=prim ;; *) r=sec ;; esac
    veth "$(ns "$r")" "$h" "$(ns "$h")" eth0
    ip -n "$(ns "$r")" link set "$h" master br0 up
    ip -n "$(ns "$h")" addr add "${ADDR[$h]}/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" route add default via "${ADDR[$r]}"
  done

  # Inter-site link, routers route each other's site.
  veth "$(ns prim)" isl0 "$(ns sec)" isl0
  ip -n "$(ns prim)" addr add "$ISL_PRIM/24" dev isl0
  ip -n "$(ns sec)" addr add "$ISL_SEC/24" dev isl0
  ip -n "$(ns prim)" link set isl0 up
  ip -n "$(ns sec)" link set isl0 up
  add_site_routes
  fail_point isl

  # Test network: a bridge in the test namespace, rec1 and rec2 plugged in with test0.
  n="$(ns test)"
  ip -n "$n" link add br0 type bridge forward_delay 0
  ip -n "$n" addr add "${TESTADDR[test]}/24" dev br0
  ip -n "$n" link set br0 up
  for h in rec1 rec2; do
    veth "$n" "$h" "$(ns "$h")" test0
    ip -n "$n" link set "$h" master br0 up
    ip -n "$(ns "$h")" addr add "${TESTADDR[$h]}/24" dev test0
    ip -n "$(ns "$h")" link set test0 up
    # What leaves from the test address stays on the test network (never the default route).
    ip -n "$(ns "$h")" rule add from "$NET_TEST" lookup "$TEST_TABLE" priority 100
    ip -n "$(ns "$h")" route add "$NET_TEST" dev test0 table "$TEST_TABLE"
    ip -n "$(ns "$h")" route add unreachable default table "$TEST_TABLE"
    # What comes in on test0 may only talk to the test address (not rec's secondary-site one).
    if command -v nft >/dev/null 2>&1; then
      if ! ip netns exec "$(ns "$h")" nft -f - <<NFT
table inet ferry_lab_test {
  chain input { type filter hook input priority 0; policy accept;
    iifname "test0" ip daddr != $NET_TEST drop
    iifname "test0" meta nfproto ipv6 drop
  }
  chain forward { type filter hook forward priority 0; policy accept;
    iifname "test0" drop
    oifname "test0" drop
  }
  chain output { type filter hook output priority 0; policy accept;
    oifname "test0" ip saddr != $NET_TEST drop
  }
}
NFT
      then warn "nft rules on $(ns "$h") failed: the test network relies on routing alone"; fi
    else
      warn "nft not found: the test network relies on routing alone (apt-get install nftables)"
    fi
  done

  fail_point test
  state_add "ready $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  UP_DONE=1
  trap - EXIT INT TERM
  log "lab '$PREFIX' is up: ${#ALL[@]} namespaces ($(ns '*')); state in $STATE"
}

add_site_routes() {
  ip -n "$(ns prim)" route replace "$NET_SEC" via "$ISL_SEC" dev isl0
  ip -n "$(ns sec)" route replace "$NET_PRIM" via "$ISL_PRIM" dev isl0
}

# ---- down -----------------------------------------------------------------------------------
do_down() {
  need_root; need_ip
  local targets=() n h seen=" " failed=0
  if [ -f "$STATE" ]; then
    while read -r kind name _; do
      if [ "$kind" = ns ] && [ -n "$name" ]; then targets+=("$name"); fi
    done <"$STATE"
  fi
  for h in "${ALL[@]}"; do targets+=("$(ns "$h")"); done
  # Kill first, everywhere, so nothing can talk across a half-removed lab.
  for n in "${targets[@]}"; do
    case "$seen" in *" $n "*) continue ;; esac
    seen+="$n "
    ns_exists "$n" || continue
    ip netns pids "$n" 2>/dev/null | grep -vx "$$" | xargs -r kill -9 2>/dev/null || true
  done
  local removed=0
  for n in $seen; do
    ns_exists "$n" || continue
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do   # wait (up to 1 s) for killed processes to be gone
      [ -z "$(ip netns pids "$n" 2>/dev/null)" ] && break
      sleep 0.1
    done
    if ip netns delete "$n" 2>/dev/null; then removed=$((removed + 1)); else warn "could not delete namespace $n"; failed=1; fi
  done
  rm -f "$STATE"
  if [ "$(dirname "$STATE")" = /run/ferry-lab ]; then rmdir /run/ferry-lab 2>/dev/null || true; fi
  [ "$failed" = 0 ] || die "some namespaces of '$PREFIX' remain (ip netns list)"
  log "lab '$PREFIX' is down ($removed namespaces removed)"
}

# ---- link control ---------------------------------------------------------------------------
do_cut() {
  need_root; check_lab
  local silent=0 a
  for a in "${ARGS[@]+"${ARGS[@]}"}"; do
    case "$a" in --silent) silent=1 ;; *) die "cut: unknown argument '$a'" ;; esac
  done
  ip -n "$(ns prim)" link set isl0 down
  ip -n "$(ns sec)" link set isl0 down
  # A link going down drops its routes: the routers then answer "network unreachable".
  if [ "$silent" = 1 ]; then
    ip -n "$(ns prim)" route replace blackhole "$NET_SEC"
    ip -n "$(ns sec)" route replace blackhole "$NET_PRIM"
    log "inter-site link cut (silent: cross-site packets are dropped without an answer)"
  else
    ip -n "$(ns prim)" route del "$NET_SEC" 2>/dev/null || true
    ip -n "$(ns sec)" route del "$NET_PRIM" 2>/dev/null || true
    log "inter-site link cut (routers answer network unreachable)"
  fi
}

do_heal() {
  need_root; check_lab
  ip -n "$(ns prim)" link set isl0 up
  ip -n "$(ns sec)" link set isl0 up
  add_site_routes   # replaces the blackholes of a silent cut, re-adds what link down removed
  log "inter-site link healed"
}

rate_bits() {  # rate_bits RATE -> bits per second (tc units: bit kbit mbit gbit tbit bps kbps mbps gbps)
  local r="${1,,}" num unit mult
  [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || return 1
  num="${BASH_REMATCH[1]}" unit="${BASH_REMATCH[3]}"
  case "$unit" in
    ""|bit) mult=1 ;; kbit) mult=1000 ;; mbit) mult=1000000 ;; gbit) mult=1000000000 ;; tbit) mult=1000000000000 ;;
    bps) mult=8 ;; kbps) mult=8000 ;; mbps) mult=8000000 ;; gbps) mult=8000000000 ;;
    *) return 1 ;;
  esac
  awk -v n="$num" -v m="$mult" 'BEGIN { printf "%.0f\n", n * m }'
}

do_shape() {
  need_root; check_lab
  local rate="" burst="" latency=100 i=0
  local args=("${ARGS[@]+"${ARGS[@]}"}")
  while [ $i -lt ${#args[@]} ]; do
    case "${args[$i]}" in
      --burst) burst="${args[$((i + 1))]:-}"; i=$((i + 2)) ;;
      --latency) latency="${args[$((i + 1))]:-}"; i=$((i + 2)) ;;
      *) [ -z "$rate" ] || die "shape: unexpected argument '${args[$i]}'"; rate="${args[$i]}"; i=$((i + 1)) ;;
    esac
  done
  [ -n "$rate" ] || die "shape needs a RATE, e.g. lab.sh shape 10mbit"
  local bits
  bits="$(rate_bits "$rate")" || die "bad rate '$rate' (e.g. 500kbit, 10mbit, 1gbit, 2mbps)"
  [ "$bits" -gt 0 ] || die "rate must be above zero"
  if [ -z "$burst" ]; then
    burst=$((bits / 8 / 100)); [ "$burst" -ge 16384 ] || burst=16384
  fi
  [[ "$burst" =~ ^[0-9]+$ ]] || die "--burst takes bytes (e.g. 32768)"
  [[ "$latency" =~ ^[0-9]+$ ]] || die "--latency takes milliseconds (e.g. 100)"
  local n
  for n in "$(ns prim)" "$(ns sec)"; do
    tc -n "$n" qdisc replace dev isl0 root tbf rate "${bits}bit" burst "$burst" latency "${latency}ms"
  done
  log "inter-site link shaped to $rate each way (tbf burst ${burst}B latency ${latency}ms)"
}

do_unshape() {
  need_root; check_lab
  local n
  for n in "$(ns prim)" "$(ns sec)"; do
    tc -n "$n" qdisc del dev isl0 root 2>/dev/null || true
  done
  log "inter-site link unshaped"
}

# ---- hosts ----------------------------------------------------------------------------------
do_exec() {
  need_root
  local host="${ARGS[0]:-}"
  check_host "$host"
  [ "${#ARGS[@]}" -le 1 ] || die "exec: put the command after --: lab.sh exec $host -- CMD..."
  [ "${#EXEC_ARGV[@]}" -gt 0 ] || die "exec needs a command after --: lab.sh exec $host -- CMD..."
  ns_exists "$(ns "$host")" || die "no namespace $(ns "$host"): lab '$PREFIX' is not up"
  # nsenter --net, not `ip netns exec`: the latter gives the command a private copy of the mount
  # table, which (no shared mounts here) keeps every file system mounted at its start alive for
  # its whole life, even after the lab's hooks unmount them.
  exec nsenter --net="/run/netns/$(ns "$host")" -- "${EXEC_ARGV[@]}"
}

do_addr() {
  local host="${ARGS[0]:-}" which="${ARGS[1]:-}"
  check_host "$host"
  case "$which" in
    "") printf '%s\n' "${ADDR[$host]}" ;;
    --test) [ -n "${TESTADDR[$host]:-}" ] || die "$host has no test-network address (rec1, rec2, test have)"
            printf '%s\n' "${TESTADDR[$host]}" ;;
    *) die "addr: unknown argument '$which'" ;;
  esac
}

do_status() {
  local h n state pids any=0
  printf 'lab %s (state %s%s)\n' "$PREFIX" "$STATE" "$([ -f "$STATE" ] || echo ', absent')"
  printf '  %-6s %-22s %-24s %-7s %s\n' HOST NAMESPACE ADDRESSES STATE PROCESSES
  for h in "${ALL[@]}"; do
    n="$(ns "$h")"
    if ns_exists "$n"; then
      state=up any=1
      pids="$(ip netns pids "$n" 2>/dev/null | wc -l)"
    else
      state=absent pids=-
    fi
    local addr="${ADDR[$h]}"
    if [ -n "${TESTADDR[$h]:-}" ] && [ "${TESTADDR[$h]}" != "$addr" ]; then addr+=" ${TESTADDR[$h]}"; fi
    printf '  %-6s %-22s %-24s %-7s %s\n' "$h" "$n" "$addr" "$state" "$pids"
  done
  [ "$any" = 1 ] || { echo "  (lab not up)"; return 0; }
  if ns_exists "$(ns prim)" && ns_exists "$(ns sec)"; then
    local end link route qd
    for end in prim sec; do
      n="$(ns "$end")"
      link="$(ip -n "$n" -br link show isl0 2>/dev/null | awk '{print $2}')"
      if [ "$end" = prim ]; then route="$(ip -n "$n" route show "$NET_SEC" 2>/dev/null)"; else route="$(ip -n "$n" route show "$NET_PRIM" 2>/dev/null)"; fi
      qd="$(tc -n "$n" qdisc show dev isl0 2>/dev/null | awk '$2 == "tbf" { for (i = 1; i <= NF; i++) if ($i == "rate") print "tbf " $(i + 1) }')"
      route="$(printf '%s' "$route" | sed 's/ *$//')"
      printf '  inter-site %s isl0: link %s, route %s, %s\n' "$end" "${link:-missing}" "${route:-none (cut)}" "${qd:-unshaped}"
    done
  fi
}

case "$CMD" in
  up) do_up ;;
  down) do_down ;;
  cut) do_cut ;;
  heal) do_heal ;;
  shape) do_shape ;;
  unshape) do_unshape ;;
  exec) do_exec ;;
  addr) do_addr ;;
  ns) check_host "${ARGS[0]:-}"; ns "${ARGS[0]}"; echo ;;
  status) do_status ;;
  help) usage ;;
  *) die "unknown command '$CMD' (lab.sh --help)" ;;
esac
