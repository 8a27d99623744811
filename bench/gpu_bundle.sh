#!/usr/bin/env bash
# Everything bench/gpu_check.sh needs on a GPU node that has CUDA torch but no internet and
# none of Flower's or this repo's other dependencies (the lent H200 machines: PyTorch,
# transformers and accelerate are there; Flower, datasets and bitsandbytes are not). Run it
# here, where PyPI is reachable; it writes .gpu/ (git-ignored, under the 64 MiB a device call
# carries):
#   .gpu/wheels/      Python 3.12 manylinux wheels at the versions this environment runs
#   .gpu/site/        bitsandbytes with only the library for the node's CUDA (BNB_CUDA, default
#                     130: the lent machines' torch is a CUDA 13.0 build; the wheel's 43 MB
#                     is mostly libraries for other CUDA and ROCm versions)
#   .gpu/smollm2-135m-shape/   SmolLM2-135M's config and tokenizer, without its weights
#                     (the 98 MB GGUF does not fit; gpu_check --random-weights uses the shape)
# On the GPU node: bench/gpu_check.sh --bundle .gpu [gpu_check options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT=.gpu
# Flower and its runtime (grpcio is already there) (SuperLink, SuperNode, ClientApp processes), datasets, and the
# versions of transformers/peft this repo pins; each one at this environment's version.
DISTS="flwr flwr-datasets datasets dill multiprocess transformers peft gguf cryptography cffi
pycparser pycryptodome grpcio-health-checking googleapis-common-protos protobuf
iterators tomli tomli_w typer rich pathspec prompt_toolkit wcwidth SQLAlchemy greenlet alembic
Mako fastapi starlette uvicorn httptools watchfiles websockets pydantic pydantic_core
annotated-types typing-inspection sniffio"
BNB_VERSION="${BNB_VERSION:-0.50.2}"
BNB_CUDA="${BNB_CUDA:-130}"
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/site"
PINS=$("$PYTHON" - $DISTS <<'EOF'
import importlib.metadata as m
import sys

print(" ".join(f"{d}=={m.version(d)}" for d in sys.argv[1:]))
EOF
)
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $PLATFORMS -d "$OUT/wheels" $PINS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $PLATFORMS -d "$TMP" "bitsandbytes==$BNB_VERSION"
"$PYTHON" -m zipfile -e "$TMP"/bitsandbytes-*.whl "$OUT/site"
find "$OUT/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$BNB_CUDA.so" \
  -delete
"$PYTHON" - "$OUT/smollm2-135m-shape" <<'EOF'
import sys

from transformers import AutoConfig, AutoTokenizer

from models.loading import resolve_model_dir

source = resolve_model_dir("smollm2-135m")
AutoConfig.from_pretrained(source).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(source).save_pretrained(sys.argv[1])
EOF
du -sh "$OUT"
