"""A build pod evicted through the Eviction API (as a node drain or the kubelet under pressure
evicts it): the API server marks it DisruptionTarget and deletes it, the Job's podFailurePolicy
ignores that failure (it does not count against backoffLimit), the Job starts another pod, and
the build goes on to converge, with no failure in the model's status or Events.
"""

from __future__ import annotations

from typing import Any

import model_checks as mc
import pytest
from e2e_helpers import OperatorProcess, qm_status
from fixtures import cluster_client
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _pods(apis: mc.Apis, namespace: str, job: Any) -> list[Any]:
    return list(apis.core.list_namespaced_pod(namespace, label_selector=f"job-name={job.metadata.name}").items)


def _condition(pod: Any, kind: str) -> Any:
    return next((c for c in pod.status.conditions or [] if c.type == kind), None)


def test_an_evicted_build_pod_is_replaced_and_the_build_goes_on(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    apis = mc.Apis(cluster)
    name = "evicted"
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL,
                                                          mc.model(name, variants=("q8",)))
    [job] = cluster_client.wait_for(lambda: mc.jobs(apis, namespace, name), timeout=60, what="the build Job")
    [first] = cluster_client.wait_for(
        lambda: [p for p in _pods(apis, namespace, job) if p.status.phase == "Running"], timeout=60,
        what="the build pod to run")
    mc.set_progress(apis, namespace, job, "q8 1/1 converting 30%")

    apis.core.create_namespaced_pod_eviction(first.metadata.name, namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=first.metadata.name, namespace=namespace)))

    cluster_client.wait_for(
        lambda: [p for p in _pods(apis, namespace, job)
                 if p.metadata.name != first.metadata.name and p.status.phase == "Running"],
        timeout=90, interval=0.5, what="the Job to start another pod after the eviction")
    live = apis.batch.read_namespaced_job(job.metadata.name, namespace).status
    assert not live.failed, f"the eviction counted against backoffLimit: status.failed={live.failed}"
    assert not any(c.type == "Failed" for c in live.conditions or [])
    status = qm_status(cluster, namespace, name)
    assert status.get("phase") != "Failed", status
    # What the Job saw: the evicted pod ended with the DisruptionTarget condition the policy ignores.
    evicted = [p for p in _pods(apis, namespace, job) if p.metadata.name == first.metadata.name]
    if evicted:  # the Job controller may already have removed it
        assert _condition(evicted[0], "DisruptionTarget") is not None

    mc.finish(apis, namespace, job)
    status = cluster_client.wait_for(lambda: mc.converged(cluster, namespace, name, built=1), timeout=120,
                                     interval=0.5, what="the model to converge after the eviction")
    assert status["observedGeneration"] == 1
    mc.check_after(apis, namespace, name, created["metadata"]["uid"])
    failures = [e.reason for e in mc.model_events(apis, namespace, name) if e.type == "Warning"]
    assert failures == [], f"the eviction surfaced as a warning: {failures}"
    mc.delete_and_check_nothing_left(apis, namespace, name)
