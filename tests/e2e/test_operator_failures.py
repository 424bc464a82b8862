"""What a user sees when something is wrong: each ends in a clear condition and an Event, and
nothing is left running or Pending forever."""

from __future__ import annotations

import base64
import pathlib
import time
from typing import Any

import pytest
import yaml
from e2e_helpers import OperatorProcess, condition, qm_status
from fixtures import cluster_client
from hub_server import FakeHub
from kubernetes import client
from localcluster import nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"


def _manifest(name: str, hub: FakeHub, variant: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["source"]["huggingface"]["endpoint"] = hub.url
    body["spec"]["calibration"]["chunks"] = 4
    body["spec"]["evaluation"] = {"chunks": 2}
    body["spec"]["variants"] = [variant]
    body["spec"]["serving"]["variant"] = variant["name"]
    body["spec"]["storage"] = {"pvc": {"claimName": "models"}}  # shared: later builds reuse the download
    for key, value in spec.items():
        body["spec"][key] = value
    return body


def _wait_condition(cluster: cluster_client.Cluster, namespace: str, name: str, kind: str, reason: str,
                    timeout: float = 600) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = condition(qm_status(cluster, namespace, name), kind)
        return found if found and found["reason"] == reason else None

    return cluster_client.wait_for(check, timeout=timeout, interval=2, what=f"{name}: {kind} reason {reason}")


def _warnings(core: client.CoreV1Api, namespace: str, name: str) -> set[str]:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return {e.reason for e in events if e.type == "Warning"}


@pytest.fixture
def shared_claim(cluster: cluster_client.Cluster, namespace: str) -> str:
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "models"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}})
    return "models"


def _a_bigger_gpu_node_arrives(cluster: cluster_client.Cluster, namespace: str) -> None:
    """A model that fits nowhere is planned again as soon as a node that can hold it joins, not at
    the next resync. The node has no agent behind it, so it goes again before anything runs there."""
    core, apps = client.CoreV1Api(cluster.api_client()), client.AppsV1Api(cluster.api_client())
    giant = nodes.NodeSpec("gpu-giant", "NVIDIA-GIANT-512GB", 524288, 1, memory="2048Gi")
    core.create_node(giant.manifest())
    try:
        core.patch_node_status(giant.name, {"status": {"capacity": giant.resources(),
                                                       "allocatable": giant.resources()}})
        start = time.monotonic()
        served = cluster_client.wait_for(lambda: apps.list_namespaced_deployment(
            namespace, label_selector="kquant.dev/model=huge").items, timeout=60, interval=0.5,
            what="a Deployment for huge once a node can hold it")
        assert time.monotonic() - start < 30, "the new node must trigger a pass, not the resync timer"
        assert served[0].spec.template.spec.node_selector["nvidia.com/gpu.product"] == giant.gpu_product
    finally:
        core.delete_node(giant.name)


def test_failures_are_reported_and_nothing_bad_is_served(
        cluster: cluster_client.Cluster, namespace: str, operator: OperatorProcess, smollm2_hub: FakeHub,
        shared_claim: str) -> None:
    api = cluster.api_client()
    custom, core, batch, apps = (client.CustomObjectsApi(api), client.CoreV1Api(api),
                                 client.BatchV1Api(api), client.AppsV1Api(api))

    def create(body: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    # A token Secret that does not exist: the build pod waits (the kubelet cannot resolve the
    # Secret), the condition says which Secret and how to create it, and an Event says so too.
    # The operator itself never reads Secrets.
    gated = _manifest("gated", smollm2_hub, {"name": "q8", "type": "Q8_0"})
    gated["spec"]["source"]["huggingface"]["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
    create(gated)
    missing = _wait_condition(cluster, namespace, "gated", "Quantized", "SecretNotFound", timeout=120)
    assert "'hf-token'" in missing["message"] and "kubectl create secret" in missing["message"]
    assert "SecretNotFound" in _warnings(core, namespace, "gated")
    # Creating the Secret unblocks the build by itself; the token reaches the pod only by reference.
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hf-token"},
                                              "data": {"token": base64.b64encode(b"hf_test").decode()}})
    _wait_condition(cluster, namespace, "gated", "Quantized", "Building", timeout=120)
    # (Building starts with the sizing Job; the build Job follows once the listing is read.)
    [job] = cluster_client.wait_for(
        lambda: batch.list_namespaced_job(namespace, label_selector="kquant.dev/model=gated,!kquant.dev/step").items,
        timeout=120, what="the gated build Job")
    env = job.spec.template.spec.containers[0].env
    token = next(e for e in env if e.name == "HF_TOKEN")
    assert token.value is None and token.value_from.secret_key_ref.name == "hf-token"
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gated")
    cluster_client.wait_for(
        lambda: not batch.list_namespaced_job(namespace, label_selector="kquant.dev/model=gated").items,
        what="the gated build to be garbage-collected")

    # A revision the hub does not have: the build fails once, with the quantizer's own reason.
    norev = _manifest("norev", smollm2_hub, {"name": "q8", "type": "Q8_0"})
    norev["spec"]["source"]["huggingface"]["revision"] = "no-such-branch"
    norev["spec"]["quantizer"]["backoffLimit"] = 1
    create(norev)
    failed = _wait_condition(cluster, namespace, "norev", "Quantized", "BuildFailed", timeout=300)
    assert "no-such-branch" in failed["message"]
    assert qm_status(cluster, namespace, "norev")["phase"] == "Failed"
    assert "BuildFailed" in _warnings(core, namespace, "norev")

    # A variant that misses its quality gate is never served.
    strict = _manifest("strict", smollm2_hub, {"name": "q4", "type": "Q4_0"},
                       evaluation={"chunks": 2, "maxKLDivergence": 1e-6})
    create(strict)
    gate = _wait_condition(cluster, namespace, "strict", "Serving", "GateFailed", timeout=900)
    assert "q4 failed its quality gate" in gate["message"]
    variant = qm_status(cluster, namespace, "strict")["variants"][0]
    assert variant["gatePassed"] is False and variant["klDivergence"] > 1e-6
    assert not apps.list_namespaced_deployment(namespace, label_selector="kquant.dev/model=strict").items

    # A context no GPU can hold: a clear condition, and no Deployment left Pending.
    huge = _manifest("huge", smollm2_hub, {"name": "q8", "type": "Q8_0"})
    huge["spec"]["serving"].update({"gpus": 1, "gpuLayers": "auto", "contextSize": 4_194_304,
                                    "cacheTypeK": "f32", "cacheTypeV": "f32", "flashAttention": "on",
                                    # room for the 4 GiB host compute buffer of a fully offloaded 4M context
                                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                                                  "limits": {"memory": "8Gi"}}})
    create(huge)
    nofit = _wait_condition(cluster, namespace, "huge", "Serving", "DoesNotFit", timeout=900)
    assert "fits no GPU pool" in nofit["message"]
    assert "DoesNotFit" in _warnings(core, namespace, "huge")
    assert not apps.list_namespaced_deployment(namespace, label_selector="kquant.dev/model=huge").items
    _a_bigger_gpu_node_arrives(cluster, namespace)
