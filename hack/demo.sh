#!/usr/bin/env bash
# The README's main job on the built-in local defaults: start the local control plane and show
# its GPU nodes. (The operator's full demo grows here as the operator lands.)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
"$repo/hack/cluster" up
export KUBECONFIG="${KQUANT_CACHE:-$HOME/.cache/kquant}/cluster/kubeconfig"
kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.memory,nvidia.com/gpu.count
echo
echo "The cluster keeps running. Use it with: export KUBECONFIG=$KUBECONFIG"
echo "Stop it with: hack/cluster down"
