#!/usr/bin/env bash
# The images' base, built without a registry: Debian bookworm by debootstrap (the Debian
# mirror, no Docker Hub), Python 3.11 in a virtual environment at /opt/python whose
# `python` and `pip` come first on PATH, as in the python:3.11-slim images. Needs root.
#   docker/base-image.sh [TAG]     # skips the build when TAG exists
set -euo pipefail
tag="${1:-fedbiot-base:bookworm}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag: present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v debootstrap >/dev/null; then
  echo "base image $tag is missing and building it needs root and debootstrap" >&2
  exit 1
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "base image $tag: debootstrap bookworm into $root (a few minutes)"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$root.log" 2>&1 || {
  tail -20 "$root.log" >&2
  echo "debootstrap failed (log: $root.log)" >&2
  exit 1
}
# The host's own CAs too (a TLS-inspecting proxy on the way to PyPI), and pip told to use
# the system store rather than its bundled one.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" /usr/sbin/update-ca-certificates >/dev/null
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
chroot "$root" /usr/bin/python3 -m venv /opt/python
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python"]' - "$tag" >/dev/null
rm -f "$root.log"
echo "base image $tag: built"
