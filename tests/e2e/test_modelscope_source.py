"""A QuantizedModel whose weights come from ModelScope, on the local cluster with the operator running.

The stand-in ModelScope API (``tests/modelscope_server.py``) serves SmolLM2 as a private model; the
sizing Job and the build Job run the real quantizer, whose fetch step uses the ModelScope client with
the token the kubelet resolved from the Secret. A second model names a repository that does not
exist: its build fails once (exit 3, no retry), with a condition and a Warning Event that name
``spec.source.modelscope.repo``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from e2e_helpers import OperatorProcess, condition, qm_status
from fixtures import cluster_client, fake_tokens, smollm2
from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import settings
from kubernetes import client
from modelscope_server import FakeModelScope

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
PRIVATE = "acme/SmolLM2-135M-Instruct"
TOKEN = fake_tokens.hub_token()
BUILD_JOBS = "!kquant.dev/step"


@pytest.fixture(scope="module")
def modelscope() -> Iterator[FakeModelScope]:
    with FakeModelScope() as served:
        served.add_repo(PRIVATE, smollm2.hf_dir(), token=TOKEN)
        yield served


def _manifest(name: str, ms: FakeModelScope, repo: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["source"] = {"modelscope": {
        "repo": repo, "endpoint": ms.url, "tokenSecretRef": {"name": "ms-token", "key": "token"},
    }}  # fmt: skip
    body["spec"]["calibration"]["chunks"] = 2
    body["spec"]["evaluation"] = {"chunks": 1}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    del body["spec"]["serving"]  # built and evaluated: serving is the Hugging Face tests' part
    return body


def _quantized(cluster: cluster_client.Cluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = condition(qm_status(cluster, namespace, name), "Quantized")
        if found and found["reason"] == "BuildFailed" and reason != "BuildFailed":
            raise AssertionError(f"{name}: build failed: {found['message']}")
        return found if found and found["reason"] == reason else None

    return cluster_client.wait_for(check, timeout=900, interval=2, what=f"{name}: Quantized reason {reason}")


def test_a_modelscope_source_builds_and_a_missing_repo_is_named(
        cluster: cluster_client.Cluster, namespace: str, operator: OperatorProcess, modelscope: FakeModelScope,
) -> None:  # fmt: skip
    api_client = cluster.api_client()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    batch = client.BatchV1Api(api_client)
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="ms-token", labels={"kquant.dev/hub-token": "true"}),
        string_data={"token": TOKEN + "\n"}))  # fmt: skip
    for name, repo in (("msmodel", PRIVATE), ("nomodel", "nobody/no-such-model")):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _manifest(name, modelscope, repo))

    # The repository that does not exist: one failed pod (exit 3 ends the Job), and the field named.
    failed = _quantized(cluster, namespace, "nomodel", "BuildFailed")
    assert "spec.source.modelscope.repo 'nobody/no-such-model' was not found" in failed["message"], failed
    assert qm_status(cluster, namespace, "nomodel")["phase"] == "Failed"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=nomodel").items
    warned = [e.message for e in events if e.type == "Warning" and e.reason == "BuildFailed"]
    assert any("spec.source.modelscope.repo" in m for m in warned), warned
    [job] = batch.list_namespaced_job(namespace, label_selector=f"kquant.dev/model=nomodel,{BUILD_JOBS}").items
    assert (job.status.failed or 0) == 1

    # The private model: sized from the ModelScope listing, then built with the token in the fetch only.
    _quantized(cluster, namespace, "msmodel", "Built")
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "msmodel")
    [variant] = body["status"]["variants"]
    [planned] = builds.plan_builds(api.QuantizedModel.model_validate(body), namespace)
    assert variant["digest"] == planned.digest and variant["sizeBytes"] > 100 * 2**20
    [job] = batch.list_namespaced_job(namespace, label_selector=f"kquant.dev/model=msmodel,{BUILD_JOBS}").items
    env = {e.name: e for e in job.spec.template.spec.containers[0].env}
    ref = env[settings.MODELSCOPE_TOKEN_ENV].value_from.secret_key_ref
    assert (ref.name, ref.key) == ("ms-token", "token") and "HF_TOKEN" not in env
    private = [s for s in modelscope.seen if s.path.startswith(f"/api/v1/models/{PRIVATE}")]
    assert {s.authorization for s in private} == {f"Bearer {TOKEN}"}
    assert any(s.query.get("FilePath") == "model.safetensors" for s in private)

    # The token is in no status, Event or ConfigMap the operator or the quantizer wrote.
    written = [json.dumps(body["status"])]
    written += [e.message or "" for e in core.list_namespaced_event(namespace).items]
    written += [json.dumps(c.data or {}) for c in core.list_namespaced_config_map(namespace).items]
    assert not [w for w in written if TOKEN in w]
