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


def _reconcile(memo: kopf.Memo, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
    with _lock(memo, namespace, name):
        fresh = memo.kube.get_model(namespace, name)  # the newest status, not the event's copy
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        reconcile.reconcile(memo.kube, fresh)


@kopf.on.create(*MODEL)
@kopf.on.update(*MODEL)
@kopf.on.resume(*MODEL)
def on_model(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(memo, namespace, name)


@kopf.timer(*MODEL, interval=120, initial_delay=60)
def on_timer(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(memo, namespace, name)


def _from_child(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo) -> None:
    if event.get("type") is None:  # the initial listing: resume handles those models
        return
    _reconcile(memo, namespace, labels[manifests.MODEL_LABEL])


@kopf.on.event("configmaps", labels={**OWNED, manifests.ROLE_LABEL: "build"})
def on_build_configmap(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                       **_: Any) -> None:
    _from_child(event, namespace, labels, memo)


@kopf.on.event("batch", "v1", "jobs", labels={**OWNED, manifests.ROLE_LABEL: "build"})
def on_build_job(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                 **_: Any) -> None:
    _from_child(event, namespace, labels, memo)


@kopf.on.event("apps", "v1", "deployments", labels={**OWNED, manifests.ROLE_LABEL: "server"})
def on_server(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
              **_: Any) -> None:
    _from_child(event, namespace, labels, memo)


@kopf.on.event("pods", labels={**OWNED, manifests.ROLE_LABEL: "build"})
def on_build_pod(event: dict[str, Any], namespace: str, labels: dict[str, str], memo: kopf.Memo,
                 **_: Any) -> None:
    """A build pod that cannot start (a missing Secret, an image that cannot be pulled) changes
    only the pod, not its Job: watch the pods to say so in the model's status at once."""
    _from_child(event, namespace, labels, memo)
