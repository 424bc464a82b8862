"""``kquant status`` against a real QuantizedModel on the local control plane.

The status is the one the operator's own status code computes (``status.compute``) from a
finished build of each variant and a served one, written through the status subresource as the
operator writes it; ``kquant status`` then reads it back through the current kubeconfig.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml
from fixtures import cluster_client
from kquant.operator import builds, findings, status
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report
from kubernetes import client

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
KQUANT = pathlib.Path(sys.executable).with_name("kquant")
NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def custom(cluster: cluster_client.Cluster, crd: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client())


def _measured(variant: str, file_type: str, size: int, bpw: float, kl: float, ppl: float,
              gate: bool) -> report.VariantReport:  # fmt: skip
    return report.VariantReport(
        name=variant, digest="0" * 16, type=file_type, recipe="uniform", size_bytes=size, sha256="a" * 64,
        bits_per_weight=bpw, kl_divergence=kl, perplexity=ppl, gate_passed=gate,
        path=f"/var/lib/kquant/0000000000000000/smollm2-{variant}.gguf",
        gate=report.Gate(passed=gate, reasons=[] if gate else ["KL divergence 0.4120 > maxKLDivergence 0.3"]),
    )  # fmt: skip


def _status(qm: api.QuantizedModel) -> dict[str, Any]:
    """What the operator writes once both variants are built and q4km serves: numbers measured on
    SmolLM2-135M (the research notes' table), the plan of a CPU-only server."""
    reports = {"q8": _measured("q8", "Q8_0", 144_810_848, 8.47, 0.014, 16.46, True),
               "q4km": _measured("q4km", "Q4_K_M", 105_453_920, 6.17, 0.187, 15.63, True)}  # fmt: skip
    states = [findings.BuildState(build, findings.BuildPhase.SUCCEEDED, report=reports[build.variant].model_copy(
        update={"digest": build.digest})) for build in builds.plan_builds(qm, qm.metadata.namespace or "default")]
    serving = findings.ServingState(ready=True, reason=findings.Reason.SERVING, message="1/1 replicas of q4km ready",
                                  serving=api.ServingStatus(
                                      variant="q4km", gpu_layers=0, total_layers=31, ready_replicas=1,
                                      endpoint=f"http://smollm2.{qm.metadata.namespace}.svc.cluster.local:8080/v1",
                                      explanation="served on CPU: spec.serving.gpus is 0"))  # fmt: skip
    return status.compute(qm, states, serving, NOW).to_patch()


def _kquant(cluster: cluster_client.Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "COLUMNS": "200", "PYTHONSAFEPATH": "1"}
    return subprocess.run([str(KQUANT), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_status_shows_variants_serving_and_conditions(
    cluster: cluster_client.Cluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    body = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    created = custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    qm = api.QuantizedModel.model_validate(created)
    custom.patch_namespaced_custom_object_status(api.GROUP, api.VERSION, namespace, api.PLURAL, "smollm2",
                                                 {"status": _status(qm)})  # fmt: skip

    result = _kquant(cluster, "status", "smollm2", "-n", namespace)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    q4km = next(line for line in lines if "Q4_K_M" in line)
    q8 = next(line for line in lines if "Q8_0" in line)
    assert "* serving" in q4km and "0.1870" in q4km and "100.57 MiB" in q4km and "6.17" in q4km and "passed" in q4km
    assert "* serving" not in q8 and "0.0140" in q8
    assert "phase: Ready" in result.stdout and "2/2 variants built" in result.stdout
    assert "gpuLayers 0/31" in result.stdout
    assert f"http://smollm2.{namespace}.svc.cluster.local:8080/v1" in result.stdout
    for condition in ("Quantized", "Evaluated", "Serving", "Ready"):
        assert any(line.strip().startswith(condition) and "True" in line for line in lines), condition


def test_status_before_the_operator_wrote_anything(
    cluster: cluster_client.Cluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    body = yaml.safe_load((REPO / "examples/04-promotion/quantizedmodel.yaml").read_text())
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    result = _kquant(cluster, "status", "smollm2-promo", "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert "Pending (no status yet)" in result.stdout
    assert "promoted" in next(line for line in result.stdout.splitlines() if line.strip().startswith("q8"))


def test_status_of_a_missing_model_says_so(cluster: cluster_client.Cluster, custom: client.CustomObjectsApi,
                                           namespace: str) -> None:
    result = _kquant(cluster, "status", "nothing-here", "-n", namespace)
    assert result.returncode == 1
    assert f"QuantizedModel {namespace}/nothing-here not found" in result.stderr
