#!/usr/bin/env bash
# Flower's simulation engine on a Ray cluster of several machines (README, "Many simulated
# SuperNodes"): Ray's head and the simulation SuperLink on one machine, Ray workers on the
# others; every `flwr run` to that SuperLink then places its simulated SuperNodes (Ray actors
# of `client-resources-num-cpus`/`-num-gpus` each) anywhere in the cluster.
#
#   scripts/ray_cluster.sh head [PORT] [ray start options]   # on the head machine
#   scripts/ray_cluster.sh worker HEAD_IP:PORT [options]     # on every other machine
#   scripts/ray_cluster.sh superlink HEAD_IP:PORT [flower-superlink options]   # head machine
#   scripts/ray_cluster.sh stop                              # on each machine, at the end
#
# The head keeps its files under $RAY_TEMP_DIR (default /tmp/ray-fedbiot), not Ray's default
# /tmp/ray: a `ray start` cluster recorded there would be joined by every later simulation on
# the machine (ray.init() without an address connects to the latest cluster it finds), not
# only by the SuperLink given RAY_ADDRESS. `stop` runs `ray stop`, which ends every Ray
# process of the machine's user.
set -euo pipefail

command=${1:-}
shift || true
case "$command" in
head)
    port=${1:-6379}
    shift || true
    echo "Ray head on port $port; workers: $0 worker <this machine's IP>:$port"
    exec ray start --head --port "$port" --temp-dir "${RAY_TEMP_DIR:-/tmp/ray-fedbiot}" \
        --disable-usage-stats --include-dashboard=false "$@"
    ;;
worker)
    address=${1:?usage: $0 worker HEAD_IP:PORT}
    shift
    exec ray start --address "$address" --disable-usage-stats "$@"
    ;;
superlink)
    address=${1:?usage: $0 superlink HEAD_IP:PORT [flower-superlink options]}
    shift
    # The simulation process the SuperLink starts for each run calls ray.init(), which
    # connects to RAY_ADDRESS instead of starting a one-machine Ray instance.
    RAY_ADDRESS=$address exec flower-superlink --simulation "$@"
    ;;
stop)
    exec ray stop
    ;;
*)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
