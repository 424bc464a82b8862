#!/usr/bin/env bash
# mypy --strict over kquant.operator and kquant.quantizer. Their sources live in operator/ and
# quantizer/ (mapped by pyproject.toml), which mypy cannot follow; a throwaway folder of symlinks
# gives it the import layout, and hack/ the local-cluster package.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
layout="$(mktemp -d)"
trap 'rm -rf "$layout"' EXIT
mkdir -p "$layout/kquant"
ln -s "$repo/operator" "$layout/kquant/operator"
ln -s "$repo/quantizer" "$layout/kquant/quantizer"
cd "$repo"
MYPYPATH="$layout:$repo/hack" "$repo/.venv/bin/mypy" -p kquant.operator -p kquant.quantizer -p localcluster "$@"
