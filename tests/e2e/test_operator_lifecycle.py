"""A QuantizedModel's life with the operator run under the chart's own ServiceAccount: the
operator writes no finalizer and no annotation (the chart forbids both), so its log holds no
Forbidden and a model stays deletable while the operator is down; what the spec no longer asks for
goes; a build that completed without a report fails with its own reason and runs again on
``kquant retry``; a calibration ConfigMap that does not exist is named, and the build starts once
it does.

Builds and servers run stand-in images (``registry.k8s.io/pause``, ``kquant.test/exits-zero``)
and the test writes a build's report itself where one is needed: what is checked is the
operator, not the quantizer.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from e2e_helpers import OperatorProcess, condition, log_trouble, qm_status
from fixtures import cluster_client
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
PAUSE = "registry.k8s.io/pause:3.10"
EXITS_ZERO = "kquant.test/exits-zero:1"


@pytest.fixture(scope="module")
def chart_operator(cluster: cluster_client.Cluster, crd: None, operator_kubeconfig: pathlib.Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator with the chart's token and a short resync, so that a few seconds cover
    several rounds of it (the kopf timer it replaces wrote a finalizer at its first round)."""
    process = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("lifecycle") / "operator.log",
                              env={"KQUANT_RESYNC_SECONDS": "3"})
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _model(name: str, quantizer_image: str = PAUSE, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"].update({"variant": "q8", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": quantizer_image, "backoffLimit": 0}
    body["spec"].update(spec)
    return body


def _report(digest: str) -> str:
    variant = {"name": "q8", "digest": digest, "type": "Q8_0", "recipe": "uniform", "sizeBytes": 144_810_432,
               "path": f"/var/lib/kquant/{digest}/q8.gguf", "bitsPerWeight": 8.5, "gatePassed": True}
    return json.dumps({"status": "Succeeded", "quantizerVersion": "0.1.0", "variants": [variant]})


def _jobs(batch: client.BatchV1Api, namespace: str, model: str) -> list[Any]:
    """The model's build Jobs (not its sizing Job, labelled kquant.dev/step=size)."""
    selector = f"kquant.dev/model={model},!kquant.dev/step"
    return [j for j in batch.list_namespaced_job(namespace, label_selector=selector).items
            if not j.metadata.deletion_timestamp]


def _reason(cluster: cluster_client.Cluster, namespace: str, name: str, kind: str, reason: str,
            timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = condition(qm_status(cluster, namespace, name), kind)
        return found if found and found["reason"] == reason else None

    return cluster_client.wait_for(check, timeout=timeout, interval=1, what=f"{name}: {kind} reason {reason}")


def _warnings(core: client.CoreV1Api, namespace: str, name: str) -> list[str]:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e.reason for e in events if e.type == "Warning"]


def test_no_finalizer_no_forbidden_and_deletable_while_the_operator_is_down(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    api = cluster.api_client()
    custom, core, batch, apps = (client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api),
                                 client.AppsV1Api(api))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _model("life"))
    [job] = cluster_client.wait_for(lambda: _jobs(batch, namespace, "life"), timeout=120, what="the build Job")
    core.patch_namespaced_config_map(job.metadata.name, namespace, {"data": {
        "progress": "done", "report": _report(job.metadata.labels["kquant.dev/digest"])}})
    cluster_client.wait_for(lambda: apps.list_namespaced_deployment(namespace, label_selector="kquant.dev/model=life")
                            .items, timeout=60, what="the server Deployment")
    time.sleep(8)  # several resync rounds (3 s each)
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "life")
    assert not body["metadata"].get("finalizers"), body["metadata"]
    assert not any("kopf" in key for key in body["metadata"].get("annotations") or {}), body["metadata"]

    # spec.serving removed: the server and status.serving go, and the build stays.
    started = time.monotonic()
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "life",
                                          [{"op": "remove", "path": "/spec/serving"}],
                                          _content_type="application/json-patch+json")
    cluster_client.wait_for(lambda: not apps.list_namespaced_deployment(
        namespace, label_selector="kquant.dev/model=life").items, timeout=30, what="the Deployment to go")
    assert time.monotonic() - started < 15, "a spec change is acted on at once, not after a forbidden retry"
    cluster_client.wait_for(lambda: "serving" not in qm_status(cluster, namespace, "life"), timeout=30,
                            what="status.serving to go")
    assert not _services(core, namespace, "life")
    assert len(_jobs(batch, namespace, "life")) == 1

    # The operator is down (scaled to 0, crashed): the model can still be deleted.
    chart_operator.stop()
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "life")
        cluster_client.wait_for(lambda: not _exists(custom, namespace, "life"), timeout=30,
                                what="the QuantizedModel to be deleted while the operator is down")
    finally:
        chart_operator.start()
    assert log_trouble(chart_operator.log) == []


def _services(core: client.CoreV1Api, namespace: str, model: str) -> list[Any]:
    return core.list_namespaced_service(namespace, label_selector=f"kquant.dev/model={model},!kquant.dev/step").items


def _exists(custom: client.CustomObjectsApi, namespace: str, name: str) -> bool:
    try:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_a_build_that_completed_without_a_report_fails_and_runs_again_on_retry(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    api = cluster.api_client()
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _model("silent", EXITS_ZERO))
    missing = _reason(cluster, namespace, "silent", "Quantized", "ReportMissing", timeout=120)
    assert "holds no final report" in missing["message"] and "kquant retry silent" in missing["message"]
    assert qm_status(cluster, namespace, "silent")["phase"] == "Failed"
    assert "ReportMissing" in _warnings(core, namespace, "silent")
    [first] = _jobs(batch, namespace, "silent")

    # kquant retry: the failed build runs again, once.
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONSAFEPATH": "1"}
    done = subprocess.run([str(pathlib.Path(sys.executable).with_name("kquant")), "retry", "silent", "-n", namespace],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    retried = cluster_client.wait_for(
        lambda: [j for j in _jobs(batch, namespace, "silent") if j.metadata.uid != first.metadata.uid],
        timeout=60, what="a new Job for the retried build")
    assert len(retried) == 1
    _reason(cluster, namespace, "silent", "Quantized", "ReportMissing", timeout=120)
    time.sleep(5)
    assert [j.metadata.uid for j in _jobs(batch, namespace, "silent")] == [retried[0].metadata.uid], \
        "one retry per token"
    assert log_trouble(chart_operator.log) == []


def test_a_missing_calibration_configmap_is_named_and_the_build_starts_once_it_exists(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    api = cluster.api_client()
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    body = _model("calib", calibration={"configMapRef": {"name": "calib-text", "key": "text.txt"}, "chunks": 4})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    missing = _reason(cluster, namespace, "calib", "Quantized", "ConfigNotFound")
    assert "spec.calibration.configMapRef names ConfigMap 'calib-text'" in missing["message"]
    assert "ConfigNotFound" in _warnings(core, namespace, "calib")
    assert not _jobs(batch, namespace, "calib"), "no pod left in ContainerCreating"
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "calib-text"},
                                                  "data": {"text.txt": "some calibration text"}})
    cluster_client.wait_for(lambda: _jobs(batch, namespace, "calib"), timeout=120,
                            what="the build to start once the ConfigMap exists")
    _reason(cluster, namespace, "calib", "Quantized", "Building", timeout=30)
    assert log_trouble(chart_operator.log) == []


def test_a_build_whose_digest_left_the_spec_is_cancelled(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess) -> None:
    api = cluster.api_client()
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _model("edit"))
    [old] = cluster_client.wait_for(lambda: _jobs(batch, namespace, "edit"), timeout=120, what="the first build Job")
    # The variant's type changes mid-build: a new digest, a new build; the old one must not run on.
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edit",
                                          {"spec": {"variants": [{"name": "q8", "type": "Q6_K"}]}})
    def only_the_new_build() -> list[Any] | None:
        jobs = _jobs(batch, namespace, "edit")
        return jobs if jobs and all(j.metadata.name != old.metadata.name for j in jobs) else None

    [new] = cluster_client.wait_for(only_the_new_build, timeout=60,
                                    what="the old build cancelled and the new one started")
    assert new.metadata.labels["kquant.dev/digest"] != old.metadata.labels["kquant.dev/digest"]

    def gone(read: Any) -> bool:
        try:
            read(old.metadata.name, namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    # Its account and Role went with it; its ConfigMap (no report) goes in a later pass.
    rbac = client.RbacAuthorizationV1Api(api)
    for read in (core.read_namespaced_service_account, rbac.read_namespaced_role, rbac.read_namespaced_role_binding,
                 core.read_namespaced_config_map):
        cluster_client.wait_for(lambda read=read: gone(read), timeout=30, what=f"{old.metadata.name} removed")
    assert log_trouble(chart_operator.log) == []
