"""The operator's writes against the real API server: server-side apply removes what kquant no
longer wants, an object the model does not own is neither used nor changed, and a value the API
server refuses becomes a condition that names the field. Each runs a real pass
(``reconcile.reconcile`` with ``kube.Kube``) over a real QuantizedModel; no operator process, so
the test decides exactly what the pass sees."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
import yaml
from fixtures import listings
from kquant.operator import artifacts, builds, findings, kube, observed, reconcile, server_manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report
from kubernetes import client

pytestmark = pytest.mark.integration
REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
PAUSE = "registry.k8s.io/pause:3.10"


def _create_model(api_client: client.ApiClient, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"].update({"variant": "q8", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    body["spec"].update(spec)
    created: dict[str, Any] = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body)
    return created


def _status(api_client: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    body = client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    status: dict[str, Any] = body.get("status") or {}
    return status


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == kind)


def _pass(kube_client: kube.Kube, body: dict[str, Any], children: observed.Children | None = None) -> None:
    """A real pass; the model's sizing Job has listed SmolLM2 already (test_sizing_job covers it)."""
    seen = listings.with_sizing(body, children or observed.Children())
    reconcile.reconcile(kube_client, body, seen, reconcile.ClusterView([], []))


def _events(api_client: client.ApiClient, namespace: str, name: str) -> list[Any]:
    return [e for e in client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}").items if e.type == "Warning"]


def test_a_removed_setting_leaves_the_live_deployment(cluster: Any, crd: None, namespace: str) -> None:
    api_client = cluster.api_client()
    kube_client = kube.Kube(api_client)
    body = _create_model(api_client, namespace, "ssa")
    qm = api.QuantizedModel.model_validate(body)
    artifact = artifacts.Artifact(variant="q8", digest="d" * 16, path=f"{builds.STORAGE_MOUNT}/{'d' * 16}/q8.gguf",
                                  size_bytes=1)
    on_cpu = server_manifests.deployment(qm, artifact, None, True)
    # What the GPU rollout wanted before ``gpus: 1 -> 0``: a GPU limit, the product's nodeSelector,
    # a toleration and an extra argument.
    on_gpu = copy.deepcopy(on_cpu)
    pod = on_gpu["spec"]["template"]["spec"]
    pod["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    pod["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A100"}
    pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod["containers"][0]["args"] = [*pod["containers"][0]["args"], "--verbose"]
    kube_client.apply(on_gpu)
    apps = client.AppsV1Api(api_client)
    live = apps.read_namespaced_deployment("ssa-server", namespace).spec.template.spec
    assert live.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100"}
    kube_client.apply(on_cpu)
    live = apps.read_namespaced_deployment("ssa-server", namespace).spec.template.spec
    container = live.containers[0]
    assert not (container.resources.limits or {}).get("nvidia.com/gpu"), container.resources
    assert not live.node_selector, live.node_selector
    assert not live.tolerations, live.tolerations
    assert "--verbose" not in container.args
    managers = {m.manager for m in apps.read_namespaced_deployment("ssa-server", namespace).metadata.managed_fields}
    assert kube.FIELD_MANAGER in managers


def test_a_precreated_build_configmap_is_neither_used_nor_changed(cluster: Any, crd: None, namespace: str) -> None:
    api_client = cluster.api_client()
    body = _create_model(api_client, namespace, "victim")
    build = builds.plan_builds(api.QuantizedModel.model_validate(body), namespace)[0]
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    planted = {"metadata": {"name": build.name, "labels": {"kquant.dev/model": "victim"}},
               "data": {"spec.json": '{"source": "the attacker\'s"}'}}
    core.create_namespaced_config_map(namespace, planted)
    _pass(kube.Kube(api_client), body)
    quantized = _condition(_status(api_client, namespace, "victim"), "Quantized")
    assert quantized["reason"] == findings.Reason.CONFLICT
    assert f"ConfigMap {namespace}/{build.name} exists and belongs to" in quantized["message"]
    assert core.read_namespaced_config_map(build.name, namespace).data == planted["data"]
    assert not batch.list_namespaced_job(namespace).items, "no Job runs on a spec someone else wrote"
    assert [e.reason for e in _events(api_client, namespace, "victim")] == [findings.Reason.CONFLICT]


def test_a_service_named_like_the_model_that_is_someone_elses_is_not_rewritten(
        cluster: Any, crd: None, namespace: str) -> None:
    api_client = cluster.api_client()
    core = client.CoreV1Api(api_client)
    theirs = {"metadata": {"name": "shop"}, "spec": {"selector": {"app": "shop"}, "ports": [{"port": 80}]}}
    core.create_namespaced_service(namespace, theirs)
    body = _create_model(api_client, namespace, "shop")
    qm = api.QuantizedModel.model_validate(body)
    build = builds.plan_builds(qm, namespace)[0]
    variant = report.VariantReport(name="q8", digest=build.digest, type="Q8_0", recipe="uniform", size_bytes=1,
                                   path=f"/var/lib/kquant/{build.digest}/q8.gguf", gate_passed=True)
    done = report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0", variants=[variant])
    owner = [{"uid": body["metadata"]["uid"]}]
    children = observed.Children.collect(
        configmaps=[observed.build_configmap({"metadata": {"name": build.name, "ownerReferences": owner},
                                              "data": {"report": done.to_json()}})],
        claims=["shop-storage"], owner=body["metadata"]["uid"])
    _pass(kube.Kube(api_client), body, children)
    serving = _condition(_status(api_client, namespace, "shop"), "Serving")
    assert serving["reason"] == findings.Reason.CONFLICT and f"Service {namespace}/shop" in serving["message"]
    assert core.read_namespaced_service("shop", namespace).spec.selector == {"app": "shop"}


def test_a_value_the_api_server_refuses_is_a_condition_naming_the_field(
        cluster: Any, crd: None, namespace: str) -> None:
    api_client = cluster.api_client()
    quantizer = {"gpus": 0, "image": PAUSE, "resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}
    body = _create_model(api_client, namespace, "badres", quantizer=quantizer)
    _pass(kube.Kube(api_client), body)  # no exception: nothing for the work queue to retry for ever
    status = _status(api_client, namespace, "badres")
    quantized = _condition(status, "Quantized")
    assert quantized["reason"] == findings.Reason.REFUSED, quantized
    assert "spec.quantizer.resources" in quantized["message"] and "limit" in quantized["message"]
    assert _condition(status, "Stalled")["status"] == "True"
    assert findings.Reason.REFUSED in [e.reason for e in _events(api_client, namespace, "badres")]
    assert not client.BatchV1Api(api_client).list_namespaced_job(namespace).items


@pytest.mark.parametrize(("change", "field"), [
    ({"storage": {"pvc": {"size": "1Gi", "storageClassName": "Bad_Name"}}}, "storageClassName"),
    ({"quantizer": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}}, "value"),
])
def test_values_the_api_server_would_refuse_are_refused_at_admission(
        cluster: Any, crd: None, namespace: str, change: dict[str, Any], field: str) -> None:
    with pytest.raises(client.ApiException) as refused:
        _create_model(cluster.api_client(), namespace, "early", **change)
    assert refused.value.status == 422 and field in (refused.value.body or "")
