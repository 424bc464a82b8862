#!/usr/bin/env bash
# Builds the local cluster's NetworkPolicy enforcer: kube-router's firewall controller (its pod
# routing and service proxy stay off; the real node keeps its CNI bridge and kube-proxy). The
# bridge CNI plugin enforces no NetworkPolicy, so without it a policy is an object that nothing
# acts on. Only tests use it; it is never part of what kquant ships.
#
# Output, cached outside the repo and keyed by version (a second run builds nothing):
#   ~/.cache/kquant/netpolicy/kube-router-<version>/kube-router
# The last line printed is that folder.
set -euo pipefail

# The one version the Go module proxy serves here.
KUBE_ROUTER_VERSION="${KUBE_ROUTER_VERSION:-v2.1.0}"
CACHE_ROOT="${KQUANT_CACHE:-$HOME/.cache/kquant}"
OUT="$CACHE_ROOT/netpolicy/kube-router-$KUBE_ROUTER_VERSION"

if [ -x "$OUT/kube-router" ]; then
  echo "$OUT"
  exit 0
fi

export CGO_ENABLED=0 GOFLAGS=-trimpath GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
work="$(mktemp -d)"
trap 'rm -rf "$work" "$OUT.partial"' EXIT
mkdir -p "$OUT.partial"
printf '[build-netpolicy %s] kube-router %s\n' "$(date +%T)" "$KUBE_ROUTER_VERSION" >&2
cd "$work"
go mod init local/netpolicy >/dev/null 2>&1
GOBIN="$OUT.partial" go install -ldflags "-s -w" \
  "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
echo "$OUT"
