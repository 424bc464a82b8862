"""What the watches keep of the cluster's nodes and GPU pods: the inputs of placement.

The ``cluster_nodes`` and ``gpu_pods`` indexes hold these reduced copies, so that a pass plans
from memory instead of listing nodes and pods (``reconcile.ClusterView``), and so that a node's
heartbeat or a CPU-only pod costs an index entry, not a pass. Pure code on plain dicts.
"""

from __future__ import annotations

from typing import Any

from kquant.operator.planner import nodes


def node(name: str, labels: dict[str, str], status: dict[str, Any]) -> dict[str, Any]:
    """A node's labels and allocatable resources, the only parts ``nodes.node_gpus`` reads."""
    return {"metadata": {"name": name, "labels": dict(labels)},
            "status": {"allocatable": dict(status.get("allocatable") or {})}}


def gpu_pod(name: str, spec: dict[str, Any], status: dict[str, Any], namespace: str = "") -> dict[str, Any] | None:
    """A running pod that holds GPUs on a node, reduced to what GPU accounting reads; None for
    any other pod (not scheduled, ended, or without GPUs). The namespace tells a model's own server
    pods from the others (their GPUs are the model's to reuse: ``serving.candidates``)."""
    node_name = spec.get("nodeName")
    if not node_name or status.get("phase") in ("Succeeded", "Failed"):
        return None
    containers = [{"resources": c.get("resources") or {}} for c in spec.get("containers") or []]
    inits = [{"resources": c.get("resources") or {}} for c in spec.get("initContainers") or []]
    pod = {"metadata": {"name": name, "namespace": namespace}, "spec": {"nodeName": node_name, "containers": containers,
                                                "initContainers": inits},
           "status": {"phase": status.get("phase")}}
    return pod if nodes.holds_gpus(pod) else None
