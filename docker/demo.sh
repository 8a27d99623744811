#!/usr/bin/env bash
# The compose deployment, run for real: one SuperLink and three SuperNodes in containers
# with TLS and SuperNode authentication, a 2-round FedBiOT run on the tiny model through
# `flwr run`, one SuperNode container killed mid-round and started again. Exits non-zero,
# saying which step failed, when anything is off. From the repository root:
#   docker/demo.sh
# Needs a running Docker daemon with the compose plugin, the venv's `flwr` (make install),
# and, to build the base image the first time, root and debootstrap (docker/base-image.sh).
# Environment: BASE_IMAGE (default fedbiot-base:bookworm, built here; python:3.11-slim-bookworm
# pulls the official one), TORCH_WHEEL (a CPU torch wheel for the images; default the one in
# /opt/wheels when present), SUPERLINK_PORT (host port, default 8000), KEEP=1 (leave the
# containers and volumes up), DEMO_TIMEOUT (seconds per wait, default 900).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
FLWR="${FLWR:-$REPO/.venv/bin/flwr}"
TIMEOUT="${DEMO_TIMEOUT:-900}"
RUN_NAME=demo
KILLED=supernode-2
export BASE_IMAGE="${BASE_IMAGE:-fedbiot-base:bookworm}"
export SUPERLINK_PORT="${SUPERLINK_PORT:-8000}"
# The SuperLink's state in memory: with its SQLite file, Flower 1.41 gives up on a lock after
# 5 s, and on a busy host a SuperNode got HTTP 500 "database is locked" and exited mid-round.
export SUPERLINK_DATABASE="${SUPERLINK_DATABASE:-:flwr-in-memory:}"
# The containers' user gets the caller's uid, so that it can read the mode-600 keys.
export APP_UID="${APP_UID:-$(id -u)}"
TORCH_WHEEL="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}"
COMPOSE=(docker compose -f docker/compose.yaml -p fedbiot-demo)
WORK="$(mktemp -d)"
START=$SECONDS

say() { echo "demo [$((SECONDS - START))s]: $*"; }
fail() {
  echo "demo: FAILED: $*" >&2
  exit 1
}

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -f "$WORK/run.log" ]; then
    echo "--- flwr run (last lines) ---" >&2
    tail -30 "$WORK/run.log" >&2
  fi
  if [ "$status" -ne 0 ] && [ -n "${STARTED:-}" ]; then
    echo "--- containers (last lines) ---" >&2
    "${COMPOSE[@]}" logs --tail 15 >&2 2>/dev/null || true
    "${COMPOSE[@]}" logs --no-color >"$WORK/containers.log" 2>&1 || true
  fi
  if [ -z "${STARTED:-}" ]; then
    :
  elif [ "${KEEP:-0}" = 1 ]; then
    say "KEEP=1: containers left up; stop them with: ${COMPOSE[*]} down -v"
  else
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || echo "demo: compose down failed" >&2
  fi
  if [ "$status" -eq 0 ]; then
    rm -rf "$WORK"
    say "passed in $((SECONDS - START))s"
  else
    echo "demo: logs kept in $WORK" >&2
  fi
}
trap cleanup EXIT

# Waits until "$@" succeeds, for at most $TIMEOUT seconds; $WHAT names it in the failure.
wait_for() {
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out after ${TIMEOUT}s waiting for $WHAT"
    if [ "$1" != run_finished ] && [ -n "${RUN_ID:-}" ] && run_finished; then
      fail "run $RUN_ID ended ($(run_status)) while waiting for $WHAT"
    fi
    sleep 3
  done
}

# Lines of a file in the SuperLink's run folder (0 while it does not exist).
run_lines() {
  "${COMPOSE[@]}" exec -T superlink sh -c "cat /app/results/$RUN_NAME/$1 2>/dev/null | wc -l"
}
# The SuperLink's status of the run, e.g. running or finished:completed.
run_status() {
  FLWR_HOME="$WORK/flwr-home" "$FLWR" ls docker-demo --run-id "$RUN_ID" --format json |
    python3 -c "import json, sys; print(json.load(sys.stdin)['runs'][0]['status'])"
}
run_finished() { [[ "$(run_status)" == finished* ]]; }
at_least() { [ "$(run_lines "$1")" -ge "$2" ]; }
nodes_online() {
  [ "$(FLWR_HOME="$WORK/flwr-home" "$FLWR" supernode list docker-demo --format json |
    grep -c '"online"')" -ge 3 ]
}

say "checking the tools"
docker info >/dev/null 2>&1 || fail "no Docker daemon answers (docker info)"
docker compose version >/dev/null 2>&1 || fail "the Docker compose plugin is missing (docker compose)"
[ -x "$FLWR" ] || fail "$FLWR is missing: run make install (or set FLWR)"

say "base image $BASE_IMAGE"
if [[ "$BASE_IMAGE" == fedbiot-base:* ]]; then
  docker/base-image.sh "$BASE_IMAGE" || fail "could not build the base image $BASE_IMAGE"
fi
if [ -n "$TORCH_WHEEL" ]; then
  [ -f "$TORCH_WHEEL" ] || fail "TORCH_WHEEL=$TORCH_WHEEL does not exist"
  cp -u "$TORCH_WHEEL" docker/wheels/
  # The wheel in docker/wheels wins; PyPI serves torch's own dependencies.
  export TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://pypi.org/simple}"
fi

say "certificates, node keys, node data (kept when present)"
[ -f docker/certs/server.pem ] || scripts/make_certs.sh docker/certs superlink >/dev/null
mkdir -p docker/keys docker/node-data/supernode-{0,1,2}
for i in 0 1 2; do
  [ -f "docker/keys/supernode-$i" ] ||
    ssh-keygen -q -t ecdsa -b 384 -N '' -f "docker/keys/supernode-$i"
done
[ -f docker/node-data/supernode-0/train.jsonl ] || python3 -c "
import json
rows = [json.loads(line) for line in open('data/gsm8k/train.jsonl')][:200]
with open('docker/node-data/supernode-0/train.jsonl', 'w') as f:
    for r in rows:
        f.write(json.dumps({'instruction': r['question'], 'input': '', 'output': r['answer']}) + '\n')
"
mkdir -p "$WORK/flwr-home"
cat >"$WORK/flwr-home/config.toml" <<EOF
[superlink]
default = "docker-demo"

[superlink.docker-demo]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$REPO/docker/certs/ca.crt"
EOF

say "docker compose up --build -d (the first build takes a while)"
STARTED=1
"${COMPOSE[@]}" up --build -d >"$WORK/up.log" 2>&1 || {
  tail -30 "$WORK/up.log" >&2
  fail "docker compose up --build -d"
}
WHAT="three registered SuperNodes online" wait_for nodes_online

say "flwr run: 2 rounds of FedBiOT on tiny-llama"
config="model='tiny-llama' task='gsm8k' banking77-eval='generate' drop-rate=0.5"
config+=" learning-rate=0.0003 batch-size=2 num-partitions=3 min-train-nodes=3"
config+=" num-server-rounds=2 local-steps=2 seq-length=48 public-examples=8 eval-examples=2"
config+=" eval-every=2 fraction-evaluate=0.0 eval-generation-examples=2 eval-max-new-tokens=8"
config+=" open-ended-examples=0 prealign-steps=2 distill-steps=1 num-threads=1"
config+=" round-timeout=300.0 output-dir='/app/results' run-name='$RUN_NAME'"
# Submitted without --stream: the run's state is polled, so a dropped log stream cannot
# end the demo; the run's log is fetched at the end.
FLWR_HOME="$WORK/flwr-home" "$FLWR" run . docker-demo --run-config "$config" >"$WORK/run.log" 2>&1 ||
  fail "flwr run did not submit the run"
RUN_ID="$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$WORK/run.log" | head -1)"
[ -n "$RUN_ID" ] || fail "flwr run printed no run id"
say "run $RUN_ID submitted"

WHAT="the round-1 train messages" wait_for at_least sent_arrays.jsonl 3
say "round 1 sent: killing $KILLED"
"${COMPOSE[@]}" kill "$KILLED" >/dev/null 2>&1 || fail "docker compose kill $KILLED"
WHAT="round 1 to complete without $KILLED" wait_for at_least metrics.jsonl 2
say "round 1 done: starting $KILLED again (same key, same node)"
"${COMPOSE[@]}" start "$KILLED" >/dev/null 2>&1 || fail "docker compose start $KILLED"
WHAT="run $RUN_ID to finish" wait_for run_finished
FLWR_HOME="$WORK/flwr-home" "$FLWR" log "$RUN_ID" docker-demo --show >>"$WORK/run.log" 2>&1 || true
status="$(run_status)"
[ "$status" = finished:completed ] || fail "run $RUN_ID ended $status"

say "checking the outputs"
"${COMPOSE[@]}" cp "superlink:/app/results/$RUN_NAME" "$WORK/out" >/dev/null 2>&1 ||
  fail "no run folder /app/results/$RUN_NAME in the SuperLink container"
python3 - "$WORK/out" <<'EOF' || fail "the run's outputs (above)"
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
problems = []
if [r["round"] for r in rows] != [0, 1, 2]:
    problems.append(f"metrics.jsonl rounds {[r['round'] for r in rows]}, expected [0, 1, 2]")
elif not (rows[1]["clients_sampled"] == 3 and rows[1]["clients_failed"] == 1):
    problems.append(f"round 1 should count the killed node as failed: {rows[1]}")
elif not (rows[2]["clients_sampled"] == 3 and rows[2]["clients_failed"] == 0):
    problems.append(f"round 2 should have all three nodes back: {rows[2]}")
with open(out / "communication.csv", newline="") as f:
    traffic = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]
failed = [r["node"] for r in traffic if r["round"] == 1 and r["bytes_up"] == 0]
again = [r for r in traffic if r["round"] == 2 and r["node"] in failed and r["bytes_up"] > 0]
if len(failed) != 1 or not again:
    problems.append(f"the killed node should train again in round 2: {traffic}")
if not (out / "adapfu" / "config.json").is_file():
    problems.append("no adapfu/config.json")
for problem in problems:
    print(f"demo: {problem}", file=sys.stderr)
print(f"demo: metrics {[(r['round'], r.get('clients_failed')) for r in rows]} (round, failed)")
sys.exit(1 if problems else 0)
EOF
