#!/usr/bin/env bash
# The README's main job on the built-in local defaults (see hack/demo.py for the steps).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONSAFEPATH=1
exec "$repo/.venv/bin/python" -P "$repo/hack/demo.py" "$@"
