#!/usr/bin/env bash
# Builds what a real node of the local cluster runs beside containerd and runc (Debian's): the
# kubelet and kube-proxy from the same k8s.io/kubernetes module as the control plane
# (hack/build-k8s.sh), and the pause image's binary from that module's own pause.c (no image can
# be pulled here, so the sandbox image is made from it and imported into containerd).
#
# Output, cached outside the repo and keyed by version (a second run builds nothing):
#   ~/.cache/kquant/k8s/node-<version>/{kubelet,kube-proxy,pause}
# The last line printed is that folder.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.36.3}"
CACHE_ROOT="${KQUANT_CACHE:-$HOME/.cache/kquant}"
OUT="$CACHE_ROOT/k8s/node-$KUBE_VERSION"

if [ -x "$OUT/kubelet" ] && [ -x "$OUT/kube-proxy" ] && [ -x "$OUT/pause" ]; then
  echo "$OUT"
  exit 0
fi

minor="${KUBE_VERSION#*.}"; minor="${minor%%.*}"
patch="${KUBE_VERSION##*.}"
export GOFLAGS=-trimpath GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT.partial"
log() { printf '[build-node %s] %s\n' "$(date +%T)" "$*" >&2; }

# The same wrapper module as hack/build-k8s.sh: the staging modules map to v0.<minor>.<patch>.
log "kubelet and kube-proxy v$KUBE_VERSION"
cd "$work"
go mod init local/node >/dev/null 2>&1
gomod="$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
moddir="$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
for module in $(sed -nE 's#^\s*(k8s\.io/[a-z0-9.-]+) => \./staging/.*#\1#p' "$gomod"); do
  go mod edit -replace="$module=$module@v0.$minor.$patch"
done
cmds="k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy"
go get $(for c in $cmds; do printf '%s@v%s ' "$c" "$KUBE_VERSION"; done) >/dev/null 2>&1
stamp=""
for pkg in component-base/version client-go/pkg/version; do
  stamp="$stamp -X k8s.io/$pkg.gitVersion=v$KUBE_VERSION -X k8s.io/$pkg.gitMajor=1 -X k8s.io/$pkg.gitMinor=$minor"
  stamp="$stamp -X k8s.io/$pkg.gitTreeState=clean"
done
# CGO off like the control plane: the kubelet's cgroup and mount code is pure Go on Linux.
CGO_ENABLED=0 go build -ldflags "-s -w $stamp" -o "$OUT.partial/" $cmds

# pause: a static C program that only reaps zombies and waits for a signal.
log "pause from $moddir/build/pause/linux/pause.c"
cc -Os -Wall -static -DVERSION="v$KUBE_VERSION" -o "$OUT.partial/pause" "$moddir/build/pause/linux/pause.c"
strip "$OUT.partial/pause"

rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
log "done"
echo "$OUT"
