"""A burst of 200 QuantizedModel applies with kube-apiserver killed (SIGKILL) and started again
in the middle of it. The client goes on applying through the outage, as a GitOps controller
retries; the operator, whose watches and writes die with the server, must then see every model:
each gets exactly one build Job and a status for its generation, no Job is made twice, nothing
lacks its owner, no Event is posted twice, and deleting all 200 leaves nothing behind.

The pods ask for a node label no node has, so they stay Pending: the burst measures the operator,
not 200 processes on a shared machine. The one Job each model gets is therefore its sizing Job
(the first Job of every model; its builds wait for its listing), and exactly one it must be.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import control_plane
import model_checks as mc
import pytest
from e2e_helpers import OperatorProcess
from fixtures import cluster_client
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
MODELS = 200
KILL_AT = 60
"""The apply that kills kube-apiserver: a third of the way in, with the operator busy."""
DOWN_SECONDS = 5


def _model(i: int) -> dict[str, Any]:
    body = mc.model(f"burst-{i:03d}", variants=("q8",))
    body["spec"]["quantizer"]["nodeSelector"] = {"kquant.dev/fault-test": "no-such-node"}
    return body


APPLY_DEADLINE = 400.0
"""Seconds the whole burst may take: a retry loop in a test thread always ends."""
RETRIED_STATUSES = {409, 429, 500, 502, 503, 504}
"""Answers a GitOps controller retries; any other 4xx (a refused model) no retry can change."""


def _apply_all(cluster: cluster_client.Cluster, namespace: str, killed: threading.Event,
               failed: list[str], refused: list[str]) -> None:
    """Create every model, retrying one that meets a dead or starting server; 409 means an
    earlier try landed before its answer was lost. An answer no retry changes stops the burst."""
    apis = mc.Apis(cluster)
    deadline = time.monotonic() + APPLY_DEADLINE
    for i in range(MODELS):
        if i == KILL_AT:
            killed.set()
        while time.monotonic() < deadline:
            try:
                apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL, _model(i),
                                                            _request_timeout=10)
                break
            except client.ApiException as exc:
                if exc.status == 409:
                    break
                if exc.status not in RETRIED_STATUSES and exc.status != 0:
                    refused.append(f"burst-{i:03d}: {exc.status} {exc.reason}")
                    return
                failed.append(f"burst-{i:03d}: {exc.status}")
            except Exception as exc:  # refused or reset while the server is away
                failed.append(f"burst-{i:03d}: {type(exc).__name__}")
                apis = mc.Apis(cluster)
            time.sleep(0.2)


def test_200_applies_through_an_api_server_restart(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    killed, failed, refused = threading.Event(), [], []
    applier = threading.Thread(target=_apply_all, args=(cluster, namespace, killed, failed, refused), daemon=True)
    applier.start()
    assert killed.wait(timeout=120), "the burst did not reach the kill point"
    argv = control_plane.kill(cluster, "kube-apiserver")
    time.sleep(DOWN_SECONDS)
    control_plane.start(cluster, "kube-apiserver", argv)
    control_plane.api_ready(cluster)
    recovered = time.monotonic()
    applier.join(timeout=300)
    assert not applier.is_alive(), "the burst never finished"
    assert refused == [], "the API server refused a model: no retry changes that"
    assert failed, "no apply met the dead API server: the fault missed the burst"

    apis = mc.Apis(cluster)

    def every_model_has_its_job() -> list[Any] | None:
        jobs = apis.batch.list_namespaced_job(namespace, label_selector="kquant.dev/model").items
        per_model = collections.Counter(j.metadata.labels["kquant.dev/model"] for j in jobs)
        return jobs if len(per_model) == MODELS else None

    cluster_client.wait_for(every_model_has_its_job, timeout=300, interval=2,
                            what=f"a build Job for each of the {MODELS} models")

    def every_status_written() -> list[dict[str, Any]] | None:
        items = apis.custom.list_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL)["items"]
        done = [m for m in items if (m.get("status") or {}).get("observedGeneration") == 1]
        return items if len(done) == MODELS else None

    models = cluster_client.wait_for(every_status_written, timeout=300, interval=2,
                                     what=f"a status for each of the {MODELS} models")
    print(f"\n{MODELS} applies, {len(failed)} failed tries; every model built and reported "
          f"{time.monotonic() - recovered:.1f}s after the API server came back")

    jobs = apis.batch.list_namespaced_job(namespace, label_selector="kquant.dev/model").items
    per_model = collections.Counter(j.metadata.labels["kquant.dev/model"] for j in jobs)
    assert [m for m, n in per_model.items() if n != 1] == [], "a model with more than one Job"
    uids = {m["metadata"]["name"]: m["metadata"]["uid"] for m in models}
    selector = "app.kubernetes.io/managed-by=kquant"
    made = [*jobs, *apis.core.list_namespaced_config_map(namespace, label_selector=selector).items,
            *apis.core.list_namespaced_service_account(namespace, label_selector=selector).items]
    orphans = [o.metadata.name for o in made if uids.get(o.metadata.labels["kquant.dev/model"])
               not in {r.uid for r in o.metadata.owner_references or []}]
    assert orphans == []
    said = [(e.involved_object.name, e.reason, e.message) for e in apis.core.list_namespaced_event(namespace).items
            if e.involved_object.kind == "QuantizedModel"]
    assert sorted({s for s in said if said.count(s) > 1}) == []

    apis.custom.delete_collection_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL)
    cluster_client.wait_for(
        lambda: not apis.batch.list_namespaced_job(namespace, label_selector=selector).items
        and not apis.core.list_namespaced_config_map(namespace, label_selector=selector).items,
        timeout=240, interval=2, what="every model's objects to be collected")
