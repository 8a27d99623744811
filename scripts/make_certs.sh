#!/usr/bin/env bash
# A private CA and a SuperLink certificate for 127.0.0.1/localhost (or the names given).
#   scripts/make_certs.sh <out-dir> [extra DNS name ...]
# Writes ca.crt, ca.key, server.pem, server.key; SuperNodes and `flwr` trust ca.crt.
set -euo pipefail
out="${1:?usage: make_certs.sh <out-dir> [dns-name ...]}"
shift
mkdir -p "$out"
san="IP:127.0.0.1,DNS:localhost"
for name in "$@"; do san="$san,DNS:$name"; done
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=fedbiot-ca" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=superlink" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf "subjectAltName=%s\n" "$san" > "$out/san.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days 365 -extfile "$out/san.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/san.ext" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
echo "certificates in $out (SANs: $san)"
