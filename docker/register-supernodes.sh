#!/bin/sh
# Register every SuperNode public key (*.pub in $KEYS_DIR) with the SuperLink, so that
# `--enable-supernode-auth` admits those nodes. Safe to run again: a key that is already
# registered is reported and skipped, which a SuperLink with a persistent database needs.
set -eu
SUPERLINK_ADDRESS="${SUPERLINK_ADDRESS:-superlink:8000}"
ROOT_CERTIFICATES="${ROOT_CERTIFICATES:-/app/certs/ca.crt}"
KEYS_DIR="${KEYS_DIR:-/app/keys}"
FLWR_HOME="${FLWR_HOME:-$(mktemp -d)}"
export FLWR_HOME
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deployment"

[superlink.deployment]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$ROOT_CERTIFICATES"
TOML

count=0
for key in "$KEYS_DIR"/*.pub; do
  [ -f "$key" ] || continue
  count=$((count + 1))
  if output=$(flwr supernode register "$key" deployment 2>&1); then
    echo "$key: $output"
  elif printf '%s' "$output" | grep -qi "already in use"; then
    echo "$key: already registered"
  else
    printf '%s: %s\n' "$key" "$output" >&2
    exit 1
  fi
done
if [ "$count" -eq 0 ]; then
  echo "no public keys (*.pub) in $KEYS_DIR: make them as docker/README.md shows" >&2
  exit 1
fi
