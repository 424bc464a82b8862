#!/usr/bin/env bash
# The static checks that need the import layout: mypy --strict over kquant.operator and
# kquant.quantizer, then import-linter's layering contracts (pyproject.toml). Their sources live in
# operator/ and quantizer/ (mapped by pyproject.toml), which neither tool can follow; a throwaway
# folder of symlinks gives them the import layout, and hack/ the local-cluster package.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
layout="$(mktemp -d)"
trap 'rm -rf "$layout"' EXIT
mkdir -p "$layout/kquant"
ln -s "$repo/operator" "$layout/kquant/operator"
ln -s "$repo/quantizer" "$layout/kquant/quantizer"
cd "$repo"
MYPYPATH="$layout:$repo/hack" "$repo/.venv/bin/mypy" -p kquant.operator -p kquant.quantizer -p localcluster "$@"
# lint-imports reads the working directory's own packages first; from the layout, operator/ cannot
# shadow the standard library and kquant resolves to the symlinks.
(cd "$layout" && PYTHONPATH="$layout" "$repo/.venv/bin/lint-imports" "$repo/pyproject.toml" --no-cache)
