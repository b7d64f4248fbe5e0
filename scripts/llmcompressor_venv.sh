#!/usr/bin/env bash
# A separate venv with llm-compressor, the reference quantkit's quality is compared against
# (benchmarks/llmcompressor_parity.py). Kept apart from quantkit's own environment: it pins
# its own transformers/compressed-tensors versions.
#
#   bash scripts/llmcompressor_venv.sh [VENV_DIR]        # default /work/llmc-venv
#
# torch is installed FIRST from the CPU build (2.13.0+cpu); a loose torch requirement
# would otherwise pull the CUDA build and several GB of nvidia-* wheels.
set -euo pipefail
VENV="${1:-/work/llmc-venv}"
PY="${PYTHON:-python3}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"

start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install "torch==2.13.0"
t_torch=$(date +%s)
"$VENV/bin/pip" install "llmcompressor==${LLMC_VERSION}"
end=$(date +%s)
"$VENV/bin/python" - <<'PY'
import torch, transformers, llmcompressor, compressed_tensors
print("torch", torch.__version__, "| transformers", transformers.__version__,
      "| llmcompressor", llmcompressor.__version__, "| compressed-tensors", compressed_tensors.__version__)
assert "+cpu" in torch.__version__ or not torch.version.cuda, "a CUDA torch was pulled in"
PY
echo "install times: torch $((t_torch - start)) s, llmcompressor $((end - t_torch)) s, total $((end - start)) s"
