#!/usr/bin/env bash
# fastopt.distributed across two hosts on one machine: MPI over TCP between
# two network namespaces.
#
#   sudo tools/mpi_netns.sh                 # the MPI tests (2 and 3 ranks) and a traffic check
#   sudo tools/mpi_netns.sh --bench         # then benchmarks/distributed.py across the hosts
#   sudo tools/mpi_netns.sh --bench-quick   # the same, a smoke run on 2 ranks (CI)
#   sudo tools/mpi_netns.sh --bench --state-dtype bfloat16   # (arguments after --bench
#                                           # go to benchmarks/distributed.py)
#
# Run it with the Python environment that has fastopt, mpi4py and MPICH
# (the mpi extra) first on PATH.  What it does:
#
# 1. Makes two network namespaces, each a "host" with its own host name
#    (node-a, node-b), joined by a veth pair whose ends, both named mpi0 (as
#    the same network interface on two cluster nodes), have 10.99.0.1/24 and
#    10.99.0.2/24.  Those addresses exist only inside the two namespaces and
#    are the only ones used: no traffic leaves the machine.  The host names
#    resolve through /etc/netns/<namespace>/hosts, which `ip netns exec`
#    mounts over /etc/hosts inside the namespace.
# 2. Starts the ranks with MPICH's launcher (hydra): mpiexec runs in the
#    first namespace as host node-a, and reaches node-b the way it would
#    reach another machine, through its ssh launcher, `-launcher ssh
#    -launcher-exec <stand-in for ssh> -hosts node-a,node-b -iface mpi0`,
#    the stand-in running the command with `ip netns exec <namespace>
#    unshare --uts sh -c "hostname <host>; exec <command>"`.  Ranks go to
#    the hosts in turn (3 ranks: node-a, node-b, node-a).
# 3. Forces the TCP path: MPICH's UCX network module with UCX_TLS=tcp,self
#    and UCX_NET_DEVICES=mpi0 (without them UCX sees one machine and moves
#    the bytes through shared memory: a 16 MB Allreduce then sends 14 kB
#    over the veth instead of 16 MB), and MPIR_CVAR_NOLOCAL=1, so that even
#    two ranks on one host talk over TCP and not MPICH's shared memory.
# 4. Runs the MPI tests (tests/mpi, tools/run_mpi_tests.py: 2 and 3 ranks,
#    both the replicated and the shard mode) across the two hosts.
# 5. The traffic check: a training run of S steps in each mode over G bytes
#    of float32 gradients, 2 and 3 ranks, and the veth's byte counters
#    (/sys/class/net/<veth>/statistics/{tx,rx}_bytes) read before and after.
#    Each step must move at least G bytes across the link in each
#    direction, whatever algorithms MPI picks: each host must receive the
#    other host's contribution to every element its ranks own (the
#    reduce-scatter) and every updated element they do not own (the
#    allgather); 2 ranks, G/2 + G/2 each way; 3 ranks (two on node-a),
#    2G/3 + G/3 one way and G/3 + 2G/3 the other.  So the check requires
#    both counters to grow by at least 2 S G, and fails otherwise (bytes
#    that went another way than the veth: shared memory).
# 6. With --bench or --bench-quick, benchmarks/distributed.py across the
#    two hosts, with OMP_NUM_THREADS=1 (the two "hosts" share this
#    machine's cores).
#
# The namespaces, the veth pair (it goes with them), the hosts files and
# the temporary files are removed on exit, on failure too (trap).
#
# It shows that the code works when ranks are on different hosts, that
# the whole step goes through the network stack (TCP framing, the MPI
# library's inter-node protocols and collective algorithms, host-name
# resolution, the launcher's remote start), and how the step time splits
# between communication and update over a TCP link.  It does not show the
# speed of a real network: the veth is a memory copy in one kernel, with
# no wire, no latency, no loss, and both hosts share this machine's cores
# and memory bandwidth; nor an RDMA fabric (InfiniBand, EFA), nor a
# launcher's real ssh and a shared file system.
#
# Needs root, iproute2 (`ip netns`) and util-linux (`unshare`): without
# them it prints "skipped: ..." and exits 0, except under CI=true as root,
# where it must run (exit 1).
set -euo pipefail

bench=""
case "${1:-}" in
  "") ;;
  --bench) bench=full ;;
  --bench-quick) bench=quick ;;
  *) echo "usage: $0 [--bench | --bench-quick] [benchmarks/distributed.py's options]" >&2
     exit 2 ;;
esac
[ $# -gt 0 ] && shift
bench_args=("$@")

repo=$(cd "$(dirname "$0")/.." && pwd)
started=$SECONDS
say() { echo "=== [mpi_netns $((SECONDS - started))s] $*"; }

must_run() { [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; }
skip() {
  if must_run; then
    echo "error: $1 (CI=true as root: this must run)" >&2
    exit 1
  fi
  echo "skipped: $1"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root (network namespaces)"
command -v ip >/dev/null || skip "needs ip (iproute2)"
command -v unshare >/dev/null || skip "needs unshare (util-linux)"
python -c "import mpi4py, fastopt" 2>/dev/null || skip "needs fastopt and mpi4py in this Python"
mpiexec=$(command -v mpiexec || true)
[ -n "$mpiexec" ] || skip "needs mpiexec (pip install \"fastopt[mpi]\")"

# Names unique to this run: two runs on one machine do not meet.
ns_a="fastopt-a-$$"
ns_b="fastopt-b-$$"
veth_a="fo$$a"          # the veth's ends until they are in their namespaces,
veth_b="fo$$b"          # where both are renamed mpi0
iface=mpi0
host_a=node-a
host_b=node-b
addr_a=10.99.0.1
addr_b=10.99.0.2
tmp=$(mktemp -d)
made_etc_netns=""
[ -d /etc/netns ] || made_etc_netns=yes

cleanup() {
  set +e
  for ns in "$ns_a" "$ns_b"; do
    # Our ranks or launchers still running in it (after a failure).
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  [ -n "$made_etc_netns" ] && rmdir /etc/netns 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

if ! ip netns add "$ns_a" 2>"$tmp/err"; then
  skip "ip netns does not work here: $(cat "$tmp/err")"
fi
ip netns add "$ns_b"
ip link add "$veth_a" netns "$ns_a" type veth peer name "$veth_b" netns "$ns_b"
for pair in "$ns_a:$veth_a:$addr_a" "$ns_b:$veth_b:$addr_b"; do
  IFS=: read -r ns veth addr <<<"$pair"
  ip -n "$ns" link set "$veth" name "$iface"
  ip -n "$ns" addr add "$addr/24" dev "$iface"
  # IPv4 only: no IPv6 neighbour discovery in the counters, and one address
  # for the MPI library to pick.
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "$iface" up
  mkdir -p "/etc/netns/$ns"
  printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$addr_a" "$host_a" "$addr_b" "$host_b" \
    >"/etc/netns/$ns/hosts"
done
# Wait for the link to be up at both ends: a rank that starts earlier finds
# only its loopback interface usable, and MPI_Init fails ("unreachable").
for ns in "$ns_a" "$ns_b"; do
  for _ in $(seq 100); do
    [ "$(ip netns exec "$ns" cat "/sys/class/net/$iface/operstate")" = up ] && break
    sleep 0.1
  done
  state=$(ip netns exec "$ns" cat "/sys/class/net/$iface/operstate")
  [ "$state" = up ] || { echo "error: $iface in $ns is $state after 10 s" >&2; exit 1; }
done
say "hosts $host_a ($ns_a, $iface $addr_a) and $host_b ($ns_b, $iface $addr_b), a veth pair"

# The stand-in for ssh: hydra calls it as `launch -x HOST COMMAND...`, the
# command's words to be joined and run by a shell, as ssh does.
cat >"$tmp/launch" <<EOF
#!/bin/sh
[ "\$1" = -x ] && shift
host=\$1; shift
case \$host in
  $host_a) ns=$ns_a ;;
  $host_b) ns=$ns_b ;;
  *) echo "launch: unknown host \$host" >&2; exit 255 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$host; exec \$*"
EOF
# mpiexec on host node-a, starting ranks on both hosts in turn.
cat >"$tmp/mpiexec" <<EOF
#!/bin/sh
exec ip netns exec $ns_a unshare --uts sh -c 'hostname $host_a; exec "\$0" -launcher ssh \
  -launcher-exec $tmp/launch -hosts $host_a,$host_b -iface $iface "\$@"' "$mpiexec" "\$@"
EOF
chmod +x "$tmp/launch" "$tmp/mpiexec"

export MPIR_CVAR_CH4_NETMOD=ucx UCX_TLS=tcp,self UCX_NET_DEVICES=$iface MPIR_CVAR_NOLOCAL=1

counter() { ip netns exec "$ns_a" cat "/sys/class/net/$iface/statistics/$1"; }

say "the MPI tests on 2 and 3 ranks across the two hosts"
tx0=$(counter tx_bytes); rx0=$(counter rx_bytes); t0=$SECONDS
python "$repo/tools/run_mpi_tests.py" -n 2 -n 3 --timeout 600 --mpiexec "$tmp/mpiexec"
say "MPI tests: $((SECONDS - t0)) s; over the veth $host_a sent $(($(counter tx_bytes) - tx0)) \
and received $(($(counter rx_bytes) - rx0)) bytes"

# The traffic check (see 5. above).
cat >"$tmp/traffic.py" <<'EOF'
import hashlib
import sys

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.distributed import DistributedOptimizer

comm = MPI.COMM_WORLD
n, steps = 4_000_000, 5                      # G = 16 MB of float32 gradients
total = 0
for shard in (False, True):
    params = [np.zeros(n, np.float32)]
    dopt = DistributedOptimizer(fastopt.SGD(params, lr=0.1), shard=shard)
    rng = np.random.default_rng(comm.rank)
    for _ in range(steps):
        dopt.step([rng.standard_normal(n, dtype=np.float32)])
        total += 1
    same = len(set(comm.allgather(hashlib.sha256(params[0]).hexdigest()))) == 1
    if not same:
        print(f"error: the parameters differ across ranks (shard={shard})", file=sys.stderr)
        comm.Abort(1)
hosts = comm.gather(MPI.Get_processor_name())
if comm.rank == 0:
    print(f"{total} {n * 4} {','.join(hosts)}")
EOF
for n in 2 3; do
  tx0=$(counter tx_bytes); rx0=$(counter rx_bytes)
  out=$("$tmp/mpiexec" -n "$n" python -m mpi4py "$tmp/traffic.py")
  read -r steps gbytes hosts <<<"$(tail -n 1 <<<"$out")"
  tx=$(($(counter tx_bytes) - tx0)); rx=$(($(counter rx_bytes) - rx0))
  need=$((steps * gbytes))
  say "traffic, $n ranks on $hosts: $steps steps of $gbytes gradient bytes; $host_a sent $tx and \
received $rx bytes over the veth, at least $need each way required ($(python -c \
"print(f'{min($tx, $rx) / $need:.2f}')")x of it)"
  if [ "$tx" -lt "$need" ] || [ "$rx" -lt "$need" ]; then
    echo "error: fewer bytes crossed the veth than the steps must exchange: part of the" \
         "traffic took another path (shared memory?)" >&2
    exit 1
  fi
done

if [ -n "$bench" ]; then
  say "benchmarks/distributed.py across the two hosts ($bench run)"
  quick=""
  [ "$bench" = quick ] && quick="--quick --ranks 2"
  OMP_NUM_THREADS=1 python "$repo/benchmarks/distributed.py" --mpiexec "$tmp/mpiexec" $quick \
    "${bench_args[@]}"
fi
say "done"
