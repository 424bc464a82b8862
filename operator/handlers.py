"""kopf handlers: watches feed indexes and a work queue; ``workers`` run ``reconcile.reconcile``.

Every event of a QuantizedModel or of an object it owns (a build's ConfigMap, Job and pods, the
claim, the server Deployment, all labelled with the model's name) only records what the pass will
read (the ``@kopf.index`` functions) and puts the model's key in the work queue. A few workers
take keys from the queue and run one pass each, in a thread (the Kubernetes client blocks). The
queue coalesces: a model that gets twenty events while a pass is running gets one more pass, not
twenty. A resync inside the worker pool (``workers.WorkerPool.resync``) puts every known model in
the queue every few minutes: the safety net for anything a lost watch event missed.

No kopf timer, daemon or change handler is registered on QuantizedModels: kopf would then add a
finalizer (timers and daemons need one to stop on deletion) or annotations to the object, which
the chart's RBAC rightly forbids (the spec and metadata are the user's), and a finalizer would
keep a QuantizedModel from being deleted while the operator is down.

The operator uses kopf for watching, indexing, peering and probes, but no create/update/resume
handlers: the pass is level-triggered, so the diff kopf would store in an annotation (one more
write per change) has no reader. This module only registers: what the indexes keep comes from
``observed`` and ``capacity``, the worker loop from ``workers``.
"""

from __future__ import annotations

from typing import Any

import kopf
from kquant.operator import capacity, kube, manifests, observed, reconcile, server_manifests, workers
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import nodes

MODEL = (api.GROUP, api.VERSION, api.PLURAL)
OWNED = {manifests.MODEL_LABEL: kopf.PRESENT, **manifests.MANAGED_BY}
BUILD = {**OWNED, manifests.ROLE_LABEL: "build"}
SERVER = {**OWNED, manifests.ROLE_LABEL: "server"}
STORAGE = {**OWNED, manifests.ROLE_LABEL: "storage"}
SERVER_PODS = {manifests.MODEL_LABEL: kopf.PRESENT, manifests.ROLE_LABEL: "server"}
"""The server Deployment's pod template carries these two labels only (the Service selects by them)."""


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    settings.posting.enabled = False  # reconcile posts its own Events, with reasons a user can act on
    settings.watching.server_timeout = 300
    # Only what the operator labelled travels from the API server: other tenants' ConfigMaps,
    # Jobs and Deployments are filtered there, not here.
    for resource in ("configmaps", "persistentvolumeclaims", ("batch", "jobs"), ("apps", "deployments")):
        settings.watching.label_selectors[resource] = "app.kubernetes.io/managed-by=kquant"
    client = kube.Kube.from_environment()
    settings.peering.priority = client.settings.peering_priority
    peering = None if settings.peering.standalone else workers.Peering(
        name=settings.peering.name, clusterwide=settings.peering.clusterwide, priority=settings.peering.priority)
    memo.workers = workers.WorkerPool.start(client, {name: kwargs[name] for name in INDEXES}, peering,
                                            client.settings.resync_seconds)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    pool: workers.WorkerPool = memo.workers
    await pool.stop()


def _enqueue(memo: kopf.Memo, namespace: str | None, name: str) -> None:
    pool: workers.WorkerPool = memo.workers
    pool.queue.add((namespace or "", name))


# -- indexes: what a pass reads, kept current by the watches -----------------------------------


def _model_key(namespace: str | None, labels: dict[str, str]) -> workers.Key:
    return namespace or "", labels[manifests.MODEL_LABEL]


@kopf.index(*MODEL)
async def models(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[workers.Key, Any]:
    pool: workers.WorkerPool = memo.workers
    pool.ledger.seen(str(body["metadata"]["uid"]), str(body["metadata"].get("resourceVersion")))
    return {(namespace, name): dict(body)}


@kopf.index("configmaps", labels=BUILD)
async def build_configmaps(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[workers.Key, Any]:
    return {_model_key(namespace, labels): observed.build_configmap(body)}


@kopf.index("batch", "v1", "jobs", labels=BUILD)
async def build_jobs(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[workers.Key, Any]:
    return {_model_key(namespace, labels): observed.build_job(body)}


@kopf.index("pods", labels=BUILD)
async def build_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[workers.Key, Any]:
    return {_model_key(namespace, labels): observed.build_pod(body)}


@kopf.index("apps", "v1", "deployments", labels=SERVER)
async def server_deployments(namespace: str, labels: dict[str, str], body: kopf.Body,
                             **_: Any) -> dict[workers.Key, Any]:
    return {_model_key(namespace, labels): observed.server_deployment(body, manifests.VARIANT_LABEL,
                                                                      server_manifests.HASH_ANNOTATION)}


@kopf.index("pods", labels=SERVER_PODS)
async def server_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[workers.Key, Any]:
    return {_model_key(namespace, labels): observed.server_pod(body, manifests.DIGEST_LABEL)}


@kopf.index("persistentvolumeclaims", labels=STORAGE)
async def storage_claims(namespace: str, name: str, labels: dict[str, str], **_: Any) -> dict[workers.Key, Any]:
    return {_model_key(namespace, labels): name}


@kopf.index("nodes")
async def cluster_nodes(name: str, labels: dict[str, str], status: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Nodes' labels and allocatable resources: planning lists nothing."""
    return {name: capacity.node(name, labels, status)}


@kopf.index("pods")
async def gpu_pods(name: str, namespace: str, spec: dict[str, Any], status: dict[str, Any],
                   **_: Any) -> dict[str, Any] | None:
    """Pods that hold GPUs, by node."""
    pod = capacity.gpu_pod(name, spec, status, namespace)
    return {pod["spec"]["nodeName"]: pod} if pod is not None else None


INDEXES = ("models", "build_configmaps", "build_jobs", "build_pods", "server_deployments", "storage_claims",
           "cluster_nodes", "gpu_pods", "server_pods")


# -- events: each asks for a pass over the model it concerns -----------------------------------


@kopf.on.event(*MODEL)
async def on_model(event: dict[str, Any], namespace: str, name: str, uid: str, memo: kopf.Memo, **_: Any) -> None:
    pool: workers.WorkerPool = memo.workers
    if event.get("type") == "DELETED":
        pool.queue.forget((namespace, name))
        pool.ledger.forget(uid)
        return
    pool.queue.add((namespace, name))


def _on_child(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo) -> None:
    if event.get("type") is not None:  # None: the initial listing, which the models' own listing covers
        _enqueue(memo, namespace, labels[manifests.MODEL_LABEL])


@kopf.on.event("configmaps", labels=BUILD)
async def on_build_configmap(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                             **_: Any) -> None:
    _on_child(event, namespace, labels, memo)


@kopf.on.event("batch", "v1", "jobs", labels=BUILD)
async def on_build_job(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                       **_: Any) -> None:
    _on_child(event, namespace, labels, memo)


@kopf.on.event("apps", "v1", "deployments", labels=SERVER)
async def on_server(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                    **_: Any) -> None:
    _on_child(event, namespace, labels, memo)


@kopf.on.event("pods", labels=SERVER_PODS)
async def on_server_pod(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                        **_: Any) -> None:
    """A server pod that turned Ready: its startup log is the measurement of the plan."""
    if observed.server_pod(event.get("object") or {}, manifests.DIGEST_LABEL).ready:
        _on_child(event, namespace, labels, memo)


@kopf.on.event("persistentvolumeclaims", labels=STORAGE)
async def on_claim(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                   **_: Any) -> None:
    _on_child(event, namespace, labels, memo)


@kopf.on.event("pods", labels=BUILD)
async def on_build_pod(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                       **_: Any) -> None:
    """A build pod that cannot start (a missing Secret, an image that cannot be pulled) or that
    failed changes only the pod, not its Job, at first; other pod changes show in the Job or the
    ConfigMap, so they are not worth a pass."""
    record = observed.build_pod(event.get("object") or {})
    if record.last_words or (record.waiting is not None and record.waiting[0] in reconcile.WAITING_REASONS):
        _on_child(event, namespace, labels, memo)


# -- capacity: a model that fits nowhere gets a pass when the cluster changes ---------------------


@kopf.on.event("nodes")
async def on_node(event: dict[str, Any], name: str, labels: dict[str, str], status: dict[str, Any],
                  memo: kopf.Memo, **_: Any) -> None:
    """A node that appears, goes, or changes its labels or allocatable resources (not a heartbeat)."""
    pool: workers.WorkerPool = memo.workers
    if event.get("type") == "DELETED":
        pool.node_shapes.pop(name, None)
    else:
        shape = (dict(labels), dict(status.get("allocatable") or {}))
        if pool.node_shapes.get(name) == shape:
            return
        pool.node_shapes[name] = shape
    pool.capacity_changed()


@kopf.on.event("pods")
async def on_pod_gone(event: dict[str, Any], spec: dict[str, Any], status: dict[str, Any], memo: kopf.Memo,
                      **_: Any) -> None:
    """A pod that held GPUs ended: its GPUs are free for a model that fitted nowhere."""
    ended = event.get("type") == "DELETED" or status.get("phase") in ("Succeeded", "Failed")
    if ended and spec.get("nodeName") and nodes.gpu_resources({"spec": spec}):
        pool: workers.WorkerPool = memo.workers
        pool.capacity_changed()
