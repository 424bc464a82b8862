"""A bnb-nf4 variant's build Job as the operator renders it, run by the real quantizer on the local
cluster (a simulated node runs the pod as a host process): it fetches SmolLM2 from the fake hub,
quantizes it with transformers + bitsandbytes on the CPU, gates and publishes it, and the result
ConfigMap carries the report the operator copies into ``status.variants``. A model whose
architecture transformers does not know fails with its first pod (exit 3), naming the field.

As in ``test_build_job_retries``, the QuantizedModel is created for real (owner references hold)
and no operator runs: the Job controller alone decides.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
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


def _start_bnb_build(cluster: cluster_client.Cluster, namespace: str, name: str, endpoint: str,
                     repo: str | None = None) -> str:
    """Create the model (a served q8 and the nf4 variant), its claim and the nf4 build's objects."""
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["source"]["huggingface"]["endpoint"] = endpoint
    if repo is not None:
        body["spec"]["source"]["huggingface"]["repo"] = repo
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}, {"name": "nf4", "format": "bnb-nf4"}]
    body["spec"]["serving"]["variant"] = "q8"
    body["spec"]["evaluation"] = {"chunks": 2, "contextSize": 256, "maxKLDivergence": 0.5}
    body["spec"]["quantizer"] = {"backoffLimit": 1, "resources": {"requests": {"cpu": "2", "memory": "3Gi"}}}
    api_client = cluster.api_client()
    created = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body)
    qm = api.QuantizedModel.model_validate(created)
    build = next(b for b in builds.plan_builds(qm, namespace) if b.variant == "nf4")
    claim = manifests.storage_claim(qm)
    assert claim is not None
    for obj in [claim, *build_manifests.objects(qm, build)]:
        utils.create_from_dict(api_client, obj, namespace=namespace)
    return build.name


def _finished(cluster: cluster_client.Cluster, namespace: str, job: str, timeout: float) -> Any:
    batch = client.BatchV1Api(cluster.api_client())

    def done() -> Any:
        conditions = batch.read_namespaced_job(job, namespace).status.conditions or []
        return next((c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None)

    return cluster_client.wait_for(done, timeout=timeout, interval=2, what=f"Job {job} to finish")


def _report(cluster: cluster_client.Cluster, namespace: str, job: str) -> report.BuildReport:
    data = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(job, namespace).data
    return report.BuildReport.model_validate_json(data["report"])


@pytest.mark.timeout(900)
def test_a_bnb_variant_builds_in_its_job_and_reports_its_format_and_gate(
        cluster: cluster_client.Cluster, namespace: str, crd: None, smollm2_hub: FakeHub) -> None:
    job = _start_bnb_build(cluster, namespace, "bnb", smollm2_hub.url)
    finished = _finished(cluster, namespace, job, timeout=800)
    built = _report(cluster, namespace, job)
    assert finished.type == "Complete", (finished.reason, built.reason)
    [variant] = built.variants
    assert (variant.name, variant.format, variant.gate_passed) == ("nf4", "bnb-nf4", True)
    assert variant.metrics is not None and variant.kl_divergence is not None and 0 < variant.kl_divergence < 0.5
    assert variant.path.endswith(f"/{variant.digest}/nf4") and job.endswith(variant.digest[:8])
    assert any(f.name == "config.json" for f in variant.files) and variant.sha256
    kinds = [s.kind for s in built.steps]
    assert "converting" not in kinds and "calibrating" not in kinds, "a bnb build makes no GGUF"
    print(f"\nbnb build Job {job}: KL {variant.kl_divergence:.4f}, {variant.size_bytes} bytes at {variant.path}")


@pytest.mark.timeout(400)
def test_an_architecture_transformers_cannot_load_fails_the_job_with_its_first_pod(
        cluster: cluster_client.Cluster, namespace: str, crd: None, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    config = {"model_type": "kquant-custom", "architectures": ["KquantCustomForCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_custom.KquantCustomForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file({"w": np.zeros((4, 4), np.float16)}, str(folder / "model.safetensors"))
    with FakeHub() as hub:
        hub.add_repo("acme/custom", folder)
        job = _start_bnb_build(cluster, namespace, "custom", hub.url, repo="acme/custom")
        finished = _finished(cluster, namespace, job, timeout=300)
    assert (finished.type, finished.reason) == ("Failed", "PodFailurePolicy"), finished.message
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    assert [p.status.container_statuses[0].state.terminated.exit_code for p in pods] == [report.ExitCode.PERMANENT]
    reason = _report(cluster, namespace, job).reason or ""
    assert reason.startswith("spec.variants[1].format asks for a bitsandbytes variant"), reason
    assert "'kquant-custom' is unknown to transformers" in reason
