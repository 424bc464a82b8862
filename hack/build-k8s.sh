#!/usr/bin/env bash
# Builds a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) and helm from Go modules through the module proxy. Nothing else can be
# downloaded on these machines, and no container runtime exists, so this is the only way to
# test against a real API server. Output is cached outside the repo, keyed by version: a second
# run builds nothing.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE_ROOT="${KQUANT_CACHE:-$HOME/.cache/kquant}"
OUT="$CACHE_ROOT/k8s/$KUBE_VERSION-etcd$ETCD_VERSION-helm$HELM_VERSION"

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/etcd" ] && [ -x "$OUT/helm" ] \
   && [ -x "$OUT/kube-controller-manager" ] && [ -x "$OUT/kube-scheduler" ]; then
  echo "$OUT"
  exit 0
fi

minor="${KUBE_VERSION#*.}"; minor="${minor%%.*}"
patch="${KUBE_VERSION##*.}"
export CGO_ENABLED=0 GOFLAGS=-trimpath GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT.partial" "$work/cp" "$work/etcd"

log() { printf '[build-k8s %s] %s\n' "$(date +%T)" "$*" >&2; }

# k8s.io/kubernetes points its staging modules at ./staging with version v0.0.0; a wrapper
# module maps each of them to the published v0.<minor>.<patch>.
log "control plane v$KUBE_VERSION"
cd "$work/cp"
go mod init local/controlplane >/dev/null 2>&1
gomod="$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
for module in $(sed -nE 's#^\s*(k8s\.io/[a-z0-9.-]+) => \./staging/.*#\1#p' "$gomod"); do
  go mod edit -replace="$module=$module@v0.$minor.$patch"
done
cmds="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler"
go get $(for c in $cmds; do printf '%s@v%s ' "$c" "$KUBE_VERSION"; done) >/dev/null 2>&1
stamp=""
for pkg in component-base/version client-go/pkg/version; do
  stamp="$stamp -X k8s.io/$pkg.gitVersion=v$KUBE_VERSION -X k8s.io/$pkg.gitMajor=1 -X k8s.io/$pkg.gitMinor=$minor"
  stamp="$stamp -X k8s.io/$pkg.gitTreeState=clean"
done
go build -ldflags "-s -w $stamp" -o "$OUT.partial/" $cmds

log "etcd $ETCD_VERSION"
cd "$work/etcd"
go mod init local/etcd >/dev/null 2>&1
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
go build -ldflags "-s -w" -o "$OUT.partial/etcd" go.etcd.io/etcd/server/v3

log "helm $HELM_VERSION"
GOBIN="$OUT.partial" go install \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
log "done"
echo "$OUT"
