"""One QuantizedModel under a fault and the checks every fault test makes after it converges.

Builds and the server run ``registry.k8s.io/pause`` and a test writes each build's report into
its ConfigMap itself (``finish``), as the quantizer does last: what is under test is the
operator's recovery, not the quantizer. The checks are the issue's list: the model converges to
its spec, one Job per build and no duplicate, no object without the model's ownerReference, no
Event posted twice, and nothing left once the model is deleted.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import yaml
from e2e_helpers import qm_status
from fixtures import cluster_client
from kubernetes import client

REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
PAUSE = "registry.k8s.io/pause:3.10"
RESYNC_SECONDS = "15"
"""The operator's full resync, shorter than its default so a missed event is caught within a test."""


def model(name: str, variants: tuple[str, ...] = ("q8", "q4")) -> dict[str, Any]:
    """The SmolLM2 example with pause images; ``variants`` from q8 (Q8_0) and q4 (Q4_0), q8 served."""
    types = {"q8": "Q8_0", "q4": "Q4_0"}
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": v, "type": types[v]} for v in variants]
    body["spec"]["serving"].update({"variant": "q8", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    return body


class Apis:
    """The typed clients on one connection pool (make a new one after an API server restart)."""

    def __init__(self, cluster: cluster_client.Cluster) -> None:
        api = cluster.api_client()
        self.custom, self.core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        self.batch, self.apps = client.BatchV1Api(api), client.AppsV1Api(api)


def selector(name: str) -> str:
    return f"kquant.dev/model={name}"


def jobs(apis: Apis, namespace: str, name: str) -> list[Any]:
    """The model's build Jobs (its sizing Job, labelled kquant.dev/step, is not a build)."""
    return list(apis.batch.list_namespaced_job(namespace, label_selector=f"{selector(name)},!kquant.dev/step").items)


def finish(apis: Apis, namespace: str, job: Any, progress: str = "done") -> None:
    """What the quantizer does last: its report into the build's ConfigMap."""
    digest = job.metadata.labels["kquant.dev/digest"]
    variant = job.metadata.labels["kquant.dev/variant"]
    entry = {"name": variant, "digest": digest, "type": "Q8_0", "recipe": "uniform", "sizeBytes": 144_810_432,
             "path": f"/var/lib/kquant/{digest}/{variant}.gguf", "bitsPerWeight": 8.5, "gatePassed": True}
    apis.core.patch_namespaced_config_map(job.metadata.name, namespace, {"data": {"progress": progress, "report": (
        json.dumps({"status": "Succeeded", "quantizerVersion": "0.1.0", "variants": [entry]}))}})


def set_progress(apis: Apis, namespace: str, job: Any, progress: str) -> None:
    """The quantizer's progress line, as it writes it when a phase starts."""
    apis.core.patch_namespaced_config_map(job.metadata.name, namespace, {"data": {"progress": progress}})


def converged(cluster: cluster_client.Cluster, namespace: str, name: str, built: int) -> dict[str, Any] | None:
    """The model's status once ``built`` variants passed and q8 is served; None before."""
    status = qm_status(cluster, namespace, name)
    passed = [v for v in status.get("variants") or [] if v.get("gatePassed")]
    served = (status.get("serving") or {}).get("variant") == "q8"
    return status if len(passed) == built and served else None


def made(apis: Apis, namespace: str, name: str) -> list[Any]:
    """Every object the operator makes for a model, found by its label."""
    sel = selector(name)
    return [*jobs(apis, namespace, name),
            *apis.core.list_namespaced_config_map(namespace, label_selector=sel).items,
            *apis.core.list_namespaced_service_account(namespace, label_selector=sel).items,
            *apis.apps.list_namespaced_deployment(namespace, label_selector=sel).items,
            *apis.core.list_namespaced_service(namespace, label_selector=sel).items]


def not_owned(objects: list[Any], uid: str) -> list[str]:
    """``Kind/name`` of the objects that do not carry the model's ownerReference."""
    return [f"{type(o).__name__}/{o.metadata.name}" for o in objects
            if uid not in {r.uid for r in o.metadata.owner_references or []}]


def duplicate_jobs(apis: Apis, namespace: str, name: str) -> list[str]:
    """Builds (digest and variant) that have more than one Job."""
    seen: dict[tuple[str, str], int] = {}
    for job in jobs(apis, namespace, name):
        key = (job.metadata.labels["kquant.dev/digest"], job.metadata.labels["kquant.dev/variant"])
        seen[key] = seen.get(key, 0) + 1
    return [f"{digest}/{variant}" for (digest, variant), count in seen.items() if count > 1]


def model_events(apis: Apis, namespace: str, name: str) -> list[Any]:
    """The Events on the model itself (its Service shares its name, and the Service's Events)."""
    events = apis.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in events if e.involved_object.kind == "QuantizedModel"]


def events_twice(apis: Apis, namespace: str, name: str) -> list[tuple[str, str]]:
    """The model's Events whose reason and message were posted more than once."""
    said = [(e.reason, e.message) for e in model_events(apis, namespace, name)]
    return sorted({s for s in said if said.count(s) > 1})


def check_after(apis: Apis, namespace: str, name: str, uid: str) -> None:
    """The invariants after a fault: no duplicate Job, no orphan, no Event twice."""
    duplicates, orphans = duplicate_jobs(apis, namespace, name), not_owned(made(apis, namespace, name), uid)
    assert duplicates == [], f"builds with more than one Job: {duplicates}"
    assert orphans == [], f"objects without the model's ownerReference: {orphans}"
    twice = events_twice(apis, namespace, name)
    assert twice == [], f"Events posted twice: {twice}"


def delete_and_check_nothing_left(apis: Apis, namespace: str, name: str, timeout: float = 90) -> None:
    apis.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    cluster_client.wait_for(lambda: not made(apis, namespace, name), timeout=timeout,
                            what=f"model {name}'s objects to be collected")
