"""kopf handlers: thin entry points that all end in ``reconcile.reconcile``.

The QuantizedModel's own changes arrive through create/update/resume; progress arrives through
events of the objects the operator owns (a build's ConfigMap and Job, the server Deployment),
which carry the model's name in a label. A slow timer catches anything a lost watch event missed.
A per-model lock keeps two passes over one model from interleaving.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import kopf
from kquant.operator import kube, manifests, reconcile
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import nodes

log = logging.getLogger("kquant.operator")
MODEL = (api.GROUP, api.VERSION, api.PLURAL)
OWNED = {manifests.MODEL_LABEL: kopf.PRESENT, **manifests.MANAGED_BY}


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kquant.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kquant.dev", key="last-handled-configuration")
    settings.persistence.finalizer = "kquant.dev/finalizer"
    settings.posting.enabled = False  # reconcile posts its own Events, with reasons a user can act on
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    memo.kube = kube.Kube.from_environment()
    settings.peering.priority = memo.kube.settings.peering_priority
    memo.locks = defaultdict(threading.Lock)
    memo.locks_guard = threading.Lock()


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.kube.close()


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo.locks_guard:
        lock: threading.Lock = memo.locks[(namespace, name)]
        return lock


@kopf.index("nodes")
def cluster_nodes(name: str, labels: dict[str, str], status: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Nodes' labels and allocatable resources, kept current by the watch: planning lists nothing."""
    return {name: {"metadata": {"name": name, "labels": dict(labels)},
                   "status": {"allocatable": dict(status.get("allocatable") or {})}}}


@kopf.index("pods")
def gpu_pods(name: str, spec: dict[str, Any], status: dict[str, Any], **_: Any) -> dict[str, Any] | None:
    """Pods that hold GPUs on a node, reduced to what GPU accounting reads."""
    node = spec.get("nodeName")
    if not node or status.get("phase") in ("Succeeded", "Failed"):
        return None
    containers = [{"resources": c.get("resources") or {}} for c in spec.get("containers") or []]
    inits = [{"resources": c.get("resources") or {}} for c in spec.get("initContainers") or []]
    pod = {"metadata": {"name": name}, "spec": {"nodeName": node, "containers": containers,
                                                "initContainers": inits},
           "status": {"phase": status.get("phase")}}
    return {node: pod} if any(nodes.pod_request(pod, r) for r in _gpu_resources(pod)) else None


def _gpu_resources(pod: dict[str, Any]) -> set[str]:
    found = set()
    for container in [*pod["spec"]["containers"], *pod["spec"]["initContainers"]]:
        for kind in ("requests", "limits"):
            found |= {r for r in (container["resources"].get(kind) or {}) if r.startswith("nvidia.com/")}
    return found


def _cluster_view(cluster_nodes: kopf.Index, gpu_pods: kopf.Index) -> reconcile.ClusterView:
    node_list = [body for key in cluster_nodes for body in cluster_nodes[key]]
    pods = [pod for key in gpu_pods for pod in gpu_pods[key]]
    return reconcile.ClusterView(nodes=node_list, pods=pods)


def _reconcile(memo: kopf.Memo, namespace: str, name: str, indexes: dict[str, Any]) -> None:
    with _lock(memo, namespace, name):
        fresh = memo.kube.get_model(namespace, name)  # the newest status, not the event's copy
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        view = _cluster_view(indexes["cluster_nodes"], indexes["gpu_pods"])
        reconcile.reconcile(memo.kube, fresh, view)


@kopf.on.create(*MODEL)
@kopf.on.update(*MODEL)
@kopf.on.resume(*MODEL)
def on_model(namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    _reconcile(memo, namespace, name, kwargs)


@kopf.timer(*MODEL, interval=120, initial_delay=60)
def on_timer(namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    _reconcile(memo, namespace, name, kwargs)


def _from_child(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                indexes: dict[str, Any]) -> None:
    if event.get("type") is None:  # the initial listing: resume handles those models
        return
    _reconcile(memo, namespace, labels[manifests.MODEL_LABEL], indexes)


@kopf.on.event("configmaps", labels={**OWNED, manifests.ROLE_LABEL: "build"})
def on_build_configmap(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                       **kwargs: Any) -> None:
    _from_child(event, namespace, labels, memo, kwargs)


@kopf.on.event("batch", "v1", "jobs", labels={**OWNED, manifests.ROLE_LABEL: "build"})
def on_build_job(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                 **kwargs: Any) -> None:
    _from_child(event, namespace, labels, memo, kwargs)


@kopf.on.event("apps", "v1", "deployments", labels={**OWNED, manifests.ROLE_LABEL: "server"})
def on_server(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
              **kwargs: Any) -> None:
    _from_child(event, namespace, labels, memo, kwargs)


@kopf.on.event("pods", labels={**OWNED, manifests.ROLE_LABEL: "build"})
def on_build_pod(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                 **kwargs: Any) -> None:
    """A build pod that cannot start (a missing Secret, an image that cannot be pulled) changes
    only the pod, not its Job: watch the pods to say so in the model's status at once. Other pod
    changes show in the Job or the ConfigMap, so they are not worth a pass."""
    statuses = (event.get("object") or {}).get("status", {}).get("containerStatuses") or []
    reasons = {((s.get("state") or {}).get("waiting") or {}).get("reason") for s in statuses}
    if reasons & reconcile.WAITING_REASONS:
        _from_child(event, namespace, labels, memo, kwargs)
