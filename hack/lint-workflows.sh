#!/usr/bin/env bash
# Lints .github/workflows with actionlint, built from its Go module (nothing else can be downloaded
# here) and cached by version in ~/.cache/kquant/tools: a second run builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ACTIONLINT_VERSION:-v1.7.7}"
bin="${KQUANT_CACHE:-$HOME/.cache/kquant}/tools/actionlint-${version#v}"
if [ ! -x "$bin/actionlint" ]; then
  GOFLAGS=-trimpath GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOBIN="$bin" \
    go install "github.com/rhysd/actionlint/cmd/actionlint@$version" >&2
fi
"$bin/actionlint" .github/workflows/*.yml
