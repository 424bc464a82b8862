#!/usr/bin/env bash
# import-linter over the contracts in pyproject.toml. Like hack/typecheck.sh, it needs the import
# layout (kquant/operator, kquant/quantizer) as real folders, which a throwaway tree of symlinks gives.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
layout="$(mktemp -d)"
trap 'rm -rf "$layout"' EXIT
mkdir -p "$layout/kquant"
ln -s "$repo/operator" "$layout/kquant/operator"
ln -s "$repo/quantizer" "$layout/kquant/quantizer"
cd "$layout"
PYTHONPATH="$layout" "$repo/.venv/bin/lint-imports" "$repo/pyproject.toml" --no-cache
