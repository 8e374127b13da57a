#!/usr/bin/env bash
# Prepare gpu-bundle/: what `make gpu-check` needs on a GPU node that has torch, transformers and the
# usual scientific stack but no package index (air-gapped cluster nodes). Run it here, copy the folder
# with the checkout (about 10 MB):
#
#   bitsandbytes   its Python files and the one CUDA library for the node (CUDA=130 by default: the node's
#                  CUDA major+minor as bitsandbytes names it), not the ~40 MB of every CUDA version
#   pytest         and its pure-Python dependencies, for `pytest -m gpu`
#   tokenizer/     the embedded tokenizer, converted (random-weight models use it; the 98 MB GGUF that
#                  holds it stays here)
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=${CUDA:-130}
BNB=${BNB_VERSION:-0.50.2}
PY=${PY:-.venv/bin/python}
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/site" "$out/tokenizer"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
    -d "$tmp" "bitsandbytes==$BNB"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" pytest pluggy iniconfig
for w in "$tmp"/*.whl; do
    "$PY" -m zipfile -e "$w" "$out/site"
done
lib="$out/site/bitsandbytes/libbitsandbytes_cuda$CUDA.so"
[ -f "$lib" ] || { echo "gpu_bundle: bitsandbytes $BNB has no libbitsandbytes_cuda$CUDA.so" >&2; exit 2; }
find "$out/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$CUDA.so" \
    ! -name 'libbitsandbytes_cpu.so' -delete
"$PY" - "$out/tokenizer" <<'PYEOF'
import sys
from zobench.models.load import builtin_tokenizer
builtin_tokenizer().save_pretrained(sys.argv[1])
PYEOF
du -sh "$out"
