"""kopf handlers: watches feed indexes and a work queue; workers run ``reconcile.reconcile``.

Every event of a QuantizedModel or of an object it owns (a build's ConfigMap, Job and pods, the
claim, the server Deployment, all labelled with the model's name) only records what the pass will
read (the ``@kopf.index`` functions) and puts the model's key in the work queue. A few workers
take keys from the queue and run one pass each, in a thread (the Kubernetes client blocks). The
queue coalesces: a model that gets twenty events while a pass is running gets one more pass, not
twenty. A slow timer per model is the safety net for anything a lost watch event missed.

The operator uses kopf for watching, indexing, peering and probes, but no create/update/resume
handlers: the pass is level-triggered, so the diff kopf would store in an annotation (one more
write per change) has no reader.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from typing import Any, TypeVar

import kopf
from kquant.operator import kube, ledger, manifests, metrics, observed, reconcile, server_manifests, workqueue
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import nodes

log = logging.getLogger("kquant.operator")
MODEL = (api.GROUP, api.VERSION, api.PLURAL)
OWNED = {manifests.MODEL_LABEL: kopf.PRESENT, **manifests.MANAGED_BY}
BUILD = {**OWNED, manifests.ROLE_LABEL: "build"}
SERVER = {**OWNED, manifests.ROLE_LABEL: "server"}
STORAGE = {**OWNED, manifests.ROLE_LABEL: "storage"}
WORKERS = 4
"""Passes that run at once. Each is mostly waiting on the API server; more would only queue there."""
RESYNC_SECONDS = 600
Key = tuple[str, str]
"""A model's (namespace, name)."""
V = TypeVar("V")


@dataclasses.dataclass
class Runtime:
    """What the workers share; lives in ``memo`` from startup to cleanup."""

    kube: kube.Kube
    queue: workqueue.WorkQueue[Key]
    ledger: ledger.StatusLedger
    executor: concurrent.futures.ThreadPoolExecutor
    indexes: dict[str, kopf.Index[Any, Any]]
    metrics: metrics.Metrics
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    node_shapes: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Each node's labels and allocatable resources as last seen, to tell a change from a heartbeat."""


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    # kopf stores nothing on the models today (no create/update handlers); should it ever, it uses
    # our group, not kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kquant.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kquant.dev", key="last-handled-configuration")
    settings.persistence.finalizer = "kquant.dev/finalizer"
    settings.posting.enabled = False  # reconcile posts its own Events, with reasons a user can act on
    settings.watching.server_timeout = 300
    # Only what the operator labelled travels from the API server: other tenants' ConfigMaps,
    # Jobs and Deployments are filtered there, not here.
    for resource in ("configmaps", "persistentvolumeclaims", ("batch", "jobs"), ("apps", "deployments")):
        settings.watching.label_selectors[resource] = "app.kubernetes.io/managed-by=kquant"
    client = kube.Kube.from_environment()
    settings.peering.priority = client.settings.peering_priority
    runtime = Runtime(kube=client, queue=workqueue.WorkQueue(), ledger=ledger.StatusLedger(),
                      executor=concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="kquant-pass"),
                      indexes={name: kwargs[name] for name in INDEXES}, metrics=metrics.Metrics())
    runtime.metrics.track(queue_depth=lambda: len(runtime.queue), models=lambda: len(runtime.indexes["models"]))
    if client.settings.metrics_port:
        runtime.metrics.serve(client.settings.metrics_port)
    runtime.tasks = [asyncio.create_task(_worker(runtime), name=f"kquant-worker-{i}") for i in range(WORKERS)]
    memo.runtime = runtime


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    runtime.queue.close()
    for task in runtime.tasks:
        task.cancel()
    await asyncio.gather(*runtime.tasks, return_exceptions=True)
    runtime.executor.shutdown(wait=True)
    runtime.kube.close()


# -- the work queue ---------------------------------------------------------------------------


async def _worker(runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key, waited = await runtime.queue.get()
        runtime.metrics.queue_wait_seconds.observe(waited)
        started = loop.time()
        try:
            snapshot = _snapshot(runtime, key)
            if snapshot is None:
                runtime.queue.done(key)
                continue
            body, children, view = snapshot
            written = await loop.run_in_executor(runtime.executor, reconcile.reconcile,
                                                 runtime.kube, body, children, view)
        except Exception as exc:  # an API error or a bug: log it, retry later, keep the others going
            runtime.metrics.passes.labels(result="error").inc()
            delay = runtime.queue.failed(key)
            log.warning("QuantizedModel %s/%s: pass failed (%s); retrying in %.1fs", key[0], key[1],
                        kube.describe_error(exc), delay, exc_info=log.isEnabledFor(logging.DEBUG))
            continue
        runtime.metrics.passes.labels(result="success").inc()
        runtime.metrics.pass_seconds.observe(loop.time() - started)
        if written is not None:
            runtime.ledger.wrote(str(body["metadata"]["uid"]), written)
        runtime.queue.done(key)


def _snapshot(runtime: Runtime, key: Key) -> tuple[dict[str, Any], observed.Children, reconcile.ClusterView] | None:
    """What the pass reads, copied out of the indexes in the event loop's thread (the watches
    change them there)."""
    idx = runtime.indexes
    body = next(iter(_values(idx["models"], key)), None)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    children = observed.Children.collect(
        configmaps=_values(idx["build_configmaps"], key), jobs=_values(idx["build_jobs"], key),
        pods=_values(idx["build_pods"], key), deployments=_values(idx["server_deployments"], key),
        claims=_values(idx["storage_claims"], key))
    view = reconcile.ClusterView(nodes=[n for k in idx["cluster_nodes"] for n in idx["cluster_nodes"][k]],
                                 pods=[p for k in idx["gpu_pods"] for p in idx["gpu_pods"][k]])
    return dict(runtime.ledger.newest(body)), children, view


def _values(index: kopf.Index[Key, V], key: Key) -> list[V]:
    return list(index[key]) if key in index else []


def _enqueue(memo: kopf.Memo, namespace: str | None, name: str) -> None:
    runtime: Runtime = memo.runtime
    runtime.queue.add((namespace or "", name))


# -- indexes: what a pass reads, kept current by the watches -----------------------------------


def _model_key(namespace: str | None, labels: dict[str, str]) -> Key:
    return namespace or "", labels[manifests.MODEL_LABEL]


@kopf.index(*MODEL)
async def models(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[Key, Any]:
    runtime: Runtime = memo.runtime
    runtime.ledger.seen(str(body["metadata"]["uid"]), str(body["metadata"].get("resourceVersion")))
    return {(namespace, name): dict(body)}


@kopf.index("configmaps", labels=BUILD)
async def build_configmaps(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Key, Any]:
    return {_model_key(namespace, labels): observed.build_configmap(body)}


@kopf.index("batch", "v1", "jobs", labels=BUILD)
async def build_jobs(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Key, Any]:
    return {_model_key(namespace, labels): observed.build_job(body)}


@kopf.index("pods", labels=BUILD)
async def build_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Key, Any]:
    return {_model_key(namespace, labels): observed.build_pod(body)}


@kopf.index("apps", "v1", "deployments", labels=SERVER)
async def server_deployments(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Key, Any]:
    return {_model_key(namespace, labels): observed.server_deployment(body, manifests.VARIANT_LABEL,
                                                                      server_manifests.HASH_ANNOTATION)}


@kopf.index("persistentvolumeclaims", labels=STORAGE)
async def storage_claims(namespace: str, name: str, labels: dict[str, str], **_: Any) -> dict[Key, Any]:
    return {_model_key(namespace, labels): name}


@kopf.index("nodes")
async def cluster_nodes(name: str, labels: dict[str, str], status: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Nodes' labels and allocatable resources: planning lists nothing."""
    return {name: {"metadata": {"name": name, "labels": dict(labels)},
                   "status": {"allocatable": dict(status.get("allocatable") or {})}}}


@kopf.index("pods")
async def gpu_pods(name: str, spec: dict[str, Any], status: dict[str, Any], **_: Any) -> dict[str, Any] | None:
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
    spec = pod["spec"]
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for kind in ("requests", "limits"):
            requested = (container.get("resources") or {}).get(kind) or {}
            found |= {r for r in requested if r.startswith("nvidia.com/")}
    return found


INDEXES = ("models", "build_configmaps", "build_jobs", "build_pods", "server_deployments", "storage_claims",
           "cluster_nodes", "gpu_pods")


# -- events: each asks for a pass over the model it concerns -----------------------------------


@kopf.on.event(*MODEL)
async def on_model(event: dict[str, Any], namespace: str, name: str, uid: str, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    if event.get("type") == "DELETED":
        runtime.queue.forget((namespace, name))
        runtime.ledger.forget(uid)
        return
    runtime.queue.add((namespace, name))


@kopf.timer(*MODEL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, idle=None)
async def resync(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    _enqueue(memo, namespace, name)


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


def _capacity_changed(runtime: Runtime) -> None:
    for key in runtime.indexes["models"]:
        if any(reconcile.waits_for_capacity(body) for body in runtime.indexes["models"][key]):
            runtime.queue.add(key)


@kopf.on.event("nodes")
async def on_node(event: dict[str, Any], name: str, labels: dict[str, str], status: dict[str, Any],
                  memo: kopf.Memo, **_: Any) -> None:
    """A node that appears, goes, or changes its labels or allocatable resources (not a heartbeat)."""
    runtime: Runtime = memo.runtime
    if event.get("type") == "DELETED":
        runtime.node_shapes.pop(name, None)
    else:
        shape = (dict(labels), dict(status.get("allocatable") or {}))
        if runtime.node_shapes.get(name) == shape:
            return
        runtime.node_shapes[name] = shape
    _capacity_changed(runtime)


@kopf.on.event("pods")
async def on_pod_gone(event: dict[str, Any], spec: dict[str, Any], status: dict[str, Any], memo: kopf.Memo,
                      **_: Any) -> None:
    """A pod that held GPUs ended: its GPUs are free for a model that fitted nowhere."""
    ended = event.get("type") == "DELETED" or status.get("phase") in ("Succeeded", "Failed")
    if ended and spec.get("nodeName") and _gpu_resources({"spec": spec}):
        _capacity_changed(memo.runtime)
