"""The build Job as the operator renders it, running the real quantizer on the local cluster: a
failure every rerun meets again ends the Job with its first pod; a transient one is retried.

The quantizer exits ``report.ExitCode.PERMANENT`` (3) for the first and ``FAILED`` (1) for the
second; the Job controller reads that code from the pod's
``status.containerStatuses[].state.terminated.exitCode`` (written by the node agent from the
process's exit status) and applies the Job's podFailurePolicy. The QuantizedModel is created for
real, so the objects' owner reference is valid (the garbage collector would otherwise delete
them), but no operator runs: only the Job controller decides here.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml
from fixtures import cluster_client
from hub_server import FakeHub
from kquant.operator import build_manifests, builds, manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report
from kubernetes import client, utils

pytestmark = pytest.mark.integration
REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"


def _start_build(cluster: cluster_client.Cluster, namespace: str, name: str, backoff_limit: int,
                 **huggingface: str) -> str:
    """Create the model, its claim and its first variant's build objects; return the Job's name."""
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["source"]["huggingface"].update(huggingface)
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"]["variant"] = "q8"
    body["spec"]["quantizer"] = {"backoffLimit": backoff_limit,
                                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}
    api_client = cluster.api_client()
    created = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body)
    qm = api.QuantizedModel.model_validate(created)
    [build] = builds.plan_builds(qm, namespace)
    claim = manifests.storage_claim(qm)
    assert claim is not None
    for obj in [claim, *build_manifests.objects(qm, build)]:
        utils.create_from_dict(api_client, obj, namespace=namespace)
    return build.name


def _failed_job(cluster: cluster_client.Cluster, namespace: str, job: str) -> Any:
    batch = client.BatchV1Api(cluster.api_client())

    def failed() -> Any:
        conditions = batch.read_namespaced_job(job, namespace).status.conditions or []
        return next((c for c in conditions if c.type == "Failed" and c.status == "True"), None)

    return cluster_client.wait_for(failed, timeout=240, interval=1, what=f"Job {job} to fail")


def _exit_codes(cluster: cluster_client.Cluster, namespace: str, job: str) -> list[int]:
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
        namespace, label_selector=f"job-name={job}").items
    return [p.status.container_statuses[0].state.terminated.exit_code for p in pods]


@pytest.mark.timeout(400)
def test_a_revision_that_does_not_exist_fails_the_job_with_its_first_pod(
        cluster: cluster_client.Cluster, namespace: str, crd: None, smollm2_hub: FakeHub) -> None:
    job = _start_build(cluster, namespace, "norev", backoff_limit=2, endpoint=smollm2_hub.url,
                       revision="no-such-branch")
    failed = _failed_job(cluster, namespace, job)
    assert failed.reason == "PodFailurePolicy", (failed.reason, failed.message)
    # backoffLimit 2 would have run three pods; the policy stops at the first.
    assert _exit_codes(cluster, namespace, job) == [report.ExitCode.PERMANENT]
    data = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(job, namespace).data
    assert "no-such-branch" in (report.BuildReport.model_validate_json(data["report"]).reason or "")


@pytest.mark.timeout(400)
def test_a_hub_that_cannot_be_reached_keeps_the_jobs_retries(
        cluster: cluster_client.Cluster, namespace: str, crd: None) -> None:
    job = _start_build(cluster, namespace, "nohub", backoff_limit=1, endpoint="http://127.0.0.1:9")
    failed = _failed_job(cluster, namespace, job)
    assert failed.reason == "BackoffLimitExceeded", (failed.reason, failed.message)
    assert _exit_codes(cluster, namespace, job) == [report.ExitCode.FAILED] * 2
