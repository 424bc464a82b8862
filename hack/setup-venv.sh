#!/usr/bin/env bash
# Creates .venv with kquant and its development tools. pip's wheel cache (~/.cache/pip) keeps the
# llama-cpp-python build, so only the first run on a machine compiles llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
# The top-level operator/ folder would shadow the standard library's operator module for any
# Python started here with the current directory on sys.path; PYTHONSAFEPATH keeps it off.
export PYTHONSAFEPATH=1
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install --quiet -e '.[dev]'
