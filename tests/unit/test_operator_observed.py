"""From watched objects to a build's state: the records the indexes keep and what a pass makes of
them. Pure logic on plain dicts, no cluster."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml
from kquant.operator import builds, findings, manifests, observed, reconcile, server_manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report

REPO = pathlib.Path(__file__).resolve().parents[2]


def _model(token_secret: str | None = None) -> api.QuantizedModel:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=1)
    if token_secret:
        body["spec"]["source"]["huggingface"]["tokenSecretRef"] = {"name": token_secret, "key": "token"}
    return api.QuantizedModel.model_validate(body)


def _first_build(qm: api.QuantizedModel) -> builds.Build:
    return builds.plan_builds(qm, "ml")[0]


def _pod(job: str, created: str, *, waiting: tuple[str, str] | None = None,
         exit_code: int = 0, message: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    if exit_code:
        state["terminated"] = {"exitCode": exit_code, "reason": "Error", "message": message}
    return {"metadata": {"name": f"{job}-{created[-2:]}", "creationTimestamp": created,
                         "labels": {"job-name": job}},
            "status": {"containerStatuses": [{"name": "quantizer", "state": state}]}}


def _failed_job(name: str) -> dict[str, Any]:
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit"}
    return {"metadata": {"name": name}, "status": {"conditions": [failed]}}


def test_no_job_is_queued_and_a_running_job_shows_the_quantizers_progress() -> None:
    qm = _model()
    build = _first_build(qm)
    assert reconcile.observe_build(qm, build, observed.Children()).phase is findings.BuildPhase.QUEUED
    children = observed.Children.collect(
        configmaps=[observed.build_configmap({"metadata": {"name": build.name}, "data": {"progress": "convert 40%"}})],
        jobs=[observed.build_job({"metadata": {"name": build.name}, "status": {"active": 1}})])
    state = reconcile.observe_build(qm, build, children)
    assert (state.phase, state.progress) == (findings.BuildPhase.RUNNING, "convert 40%")


def test_a_failed_job_carries_the_newest_failed_pods_last_words() -> None:
    qm = _model()
    build = _first_build(qm)
    children = observed.Children.collect(
        jobs=[observed.build_job(_failed_job(build.name))],
        pods=[observed.build_pod(_pod(build.name, "2026-01-01T00:00:01Z", exit_code=1, message="first try")),
              observed.build_pod(_pod(build.name, "2026-01-01T00:00:09Z", exit_code=1, message="download: 401")),
              observed.build_pod(_pod("other-job", "2026-01-01T00:00:10Z", exit_code=1, message="not ours"))])
    state = reconcile.observe_build(qm, build, children)
    assert state.phase is findings.BuildPhase.FAILED
    assert "BackoffLimitExceeded" in state.reason and state.reason.endswith("download: 401")


def test_a_pod_waiting_for_a_missing_secret_blocks_the_build_and_says_how_to_fix_it() -> None:
    qm = _model(token_secret="hf-token")
    build = _first_build(qm)
    children = observed.Children.collect(
        jobs=[observed.build_job({"metadata": {"name": build.name}})],
        pods=[observed.build_pod(_pod(build.name, "2026-01-01T00:00:01Z", waiting=(
            "CreateContainerConfigError", 'secret "hf-token" not found')))])
    state = reconcile.observe_build(qm, build, children)
    assert state.phase is findings.BuildPhase.BLOCKED
    assert "kubectl create secret generic hf-token --from-literal=token=<token>" in state.reason
    starting = observed.build_pod(_pod(build.name, "2026-01-01T00:00:01Z", waiting=("ContainerCreating", "")))
    assert starting.waiting is None, "every pod waits in ContainerCreating on its way up"


def test_a_report_in_the_configmap_decides_over_the_job() -> None:
    qm = _model()
    build = _first_build(qm)
    variant = report.VariantReport(name=build.variant, digest=build.digest, type="Q8_0", recipe="uniform",
                                   size_bytes=1, gate_passed=True)
    done = report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0", variants=[variant])
    children = observed.Children.collect(
        configmaps=[observed.build_configmap({"metadata": {"name": build.name}, "data": {"report": done.to_json()}})],
        jobs=[observed.build_job(_failed_job(build.name))])
    assert reconcile.observe_build(qm, build, children).phase is findings.BuildPhase.SUCCEEDED


def test_a_deployment_is_ready_only_when_every_wanted_pod_is_new_and_available() -> None:
    body = {"metadata": {"name": "m-server", "generation": 3,
                         "annotations": {server_manifests.HASH_ANNOTATION: "abc"}},
            "spec": {"template": {"metadata": {"labels": {manifests.VARIANT_LABEL: "q8"}}}},
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2,
                       "readyReplicas": 2}}
    record = observed.server_deployment(body, manifests.VARIANT_LABEL, server_manifests.HASH_ANNOTATION)
    assert (record.variant, record.serving_hash) == ("q8", "abc")
    assert not record.ready(2), "one old pod still serves"
    body["status"].update(updatedReplicas=2)
    assert observed.server_deployment(body, manifests.VARIANT_LABEL, server_manifests.HASH_ANNOTATION).ready(2)
    body["metadata"]["generation"] = 4
    assert not observed.server_deployment(body, manifests.VARIANT_LABEL, server_manifests.HASH_ANNOTATION).ready(2)


def test_only_a_model_that_fits_nowhere_waits_for_capacity() -> None:
    def body(reason: str) -> dict[str, Any]:
        return {"status": {"conditions": [{"type": "Serving", "status": "False", "reason": reason}]}}

    assert reconcile.waits_for_capacity(body("DoesNotFit"))
    assert reconcile.waits_for_capacity(body("NoGPUNodes"))
    assert not reconcile.waits_for_capacity(body("GateFailed"))
    assert not reconcile.waits_for_capacity({"status": {}})
