"""The first build of a model is sized before anything is downloaded, on the local cluster.

The sizing Job runs the real ``kquant-quantize size`` (the node agent runs the quantizer image as
the venv's command) against the local hub stand-in serving SmolLM2; the operator's passes are real
(``reconcile.reconcile`` with ``kube.Kube``) and read back what the API server holds. The hub's
request log shows that no weights were fetched, and the private repository's token reaches the
sizing pod alone and no result.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml
from fixtures import cluster_client, fake_tokens, smollm2
from hub_server import FakeHub
from kquant.operator import builds, findings, kube, observed, reconcile
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report, settings
from kubernetes import client

pytestmark = pytest.mark.integration
REPO = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
HUB_REPO = "test/smollm2-sizing"
TOKEN = fake_tokens.hub_token()
PAUSE = "registry.k8s.io/pause:3.10"


@pytest.fixture(scope="module")
def hub() -> Any:
    with FakeHub() as served:
        served.add_repo(HUB_REPO, smollm2.hf_dir(), token=TOKEN)
        yield served


def _weights_fetched(hub: FakeHub) -> list[str]:
    return [r.path for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]


def test_size_command_lists_and_reads_config_json_only(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    spec = {"source": {"huggingface": {"repo": HUB_REPO, "endpoint": hub.url,
                                       "allowPatterns": ["*.json", "*.safetensors"]}},
            "variants": [{"name": "q8", "type": "Q8_0"}], "storageRoot": str(tmp_path / "store")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}
    before = len(hub.requests)
    done = subprocess.run([sys.executable, "-P", "-m", "kquant.quantizer.cli", "size", "--spec",
                           str(tmp_path / "spec.json"), "--report", str(tmp_path / "listing.json")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "listing.json").read_text()
    listing = report.SourceListing.model_validate_json(text)
    assert listing.status is report.BuildStatus.SUCCEEDED and listing.revision
    sizes = {f.name: f.size_bytes for f in listing.files}
    assert sizes["model.safetensors"] == (smollm2.hf_dir() / "model.safetensors").stat().st_size
    assert "chat_template.jinja" not in sizes, "allowPatterns apply as in the fetch"
    assert listing.config == {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                              "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                              "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                              "dtype": json.loads((smollm2.hf_dir() / "config.json").read_text())["dtype"]}
    assert not _weights_fetched(hub) and not (tmp_path / "store").exists()
    assert any(r.path.endswith("/config.json") for r in hub.requests[before:])
    assert TOKEN not in text and TOKEN not in done.stdout + done.stderr
    # A repository that needs a token it was not given: a reason, exit 1, still no download.
    env.pop("HF_TOKEN")
    refused = subprocess.run([sys.executable, "-P", "-m", "kquant.quantizer.cli", "size", "--spec",
                              str(tmp_path / "spec.json"), "--report", str(tmp_path / "refused.json")],
                             env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    failed = report.SourceListing.model_validate_json((tmp_path / "refused.json").read_text())
    assert refused.returncode == 1 and failed.status is report.BuildStatus.FAILED and failed.reason


def _model(api_client: client.ApiClient, namespace: str, name: str, hub: FakeHub, claim: str,
           memory: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["source"]["huggingface"].update(repo=HUB_REPO, endpoint=hub.url,
                                                 tokenSecretRef={"name": "hub-token", "key": "token"})
    body["spec"]["storage"]["pvc"]["size"] = claim
    # The build Job itself only sleeps: what is asserted is how it was made, before any fetch.
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE, "resources": {"requests": {"cpu": "2", "memory": memory}}}
    del body["spec"]["serving"]
    made: dict[str, Any] = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body)
    return made


def _children(api_client: client.ApiClient, namespace: str, uid: str) -> observed.Children:
    """What the watches would show the pass: the model's ConfigMaps and Jobs as the API holds them."""
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    as_dict = api_client.sanitize_for_serialization
    selector = "app.kubernetes.io/managed-by=kquant"
    configmaps = [observed.build_configmap(as_dict(c))
                  for c in core.list_namespaced_config_map(namespace, label_selector=selector).items]
    jobs = [observed.build_job(as_dict(j)) for j in batch.list_namespaced_job(namespace, label_selector=selector).items]
    return observed.Children.collect(configmaps=configmaps, jobs=jobs, owner=uid,
                                     claims=[c.metadata.name for c in core.list_namespaced_persistent_volume_claim(
                                         namespace).items])  # fmt: skip


def _sized_pass(api_client: client.ApiClient, namespace: str, name: str) -> tuple[dict[str, Any], str]:
    """Pass once (it makes the sizing Job), wait for the Job's listing, pass again; the model after."""
    objects = client.CustomObjectsApi(api_client)
    kube_client = kube.Kube(api_client)
    body = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    reconcile.reconcile(kube_client, body, observed.Children(), reconcile.ClusterView([], []))
    step = builds.plan_sizing(api.QuantizedModel.model_validate(body), namespace)
    core = client.CoreV1Api(api_client)
    cluster_client.wait_for(
        lambda: (core.read_namespaced_config_map(step.name, namespace).data or {}).get(reconcile.LISTING_KEY),
        timeout=180, what=f"the listing of sizing Job {step.name}")
    body = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    reconcile.reconcile(kube_client, body, _children(api_client, namespace, body["metadata"]["uid"]),
                        reconcile.ClusterView([], []))
    return objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name), step.name


def _warnings(api_client: client.ApiClient, namespace: str, name: str) -> list[Any]:
    return [e for e in client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}").items if e.type == "Warning"]


def test_the_first_build_is_sized_before_a_byte_is_fetched(cluster: cluster_client.Cluster, crd: None,
                                                           namespace: str, hub: FakeHub) -> None:
    api_client = cluster.api_client()
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="hub-token"),
                                                             string_data={"token": TOKEN}))
    # A claim too small for SmolLM2's builds: refused with the number, no build Job, no download.
    _model(api_client, namespace, "small", hub, claim="1Gi", memory="4Gi")
    body, step = _sized_pass(api_client, namespace, "small")
    listing = report.SourceListing.model_validate_json(
        core.read_namespaced_config_map(step, namespace).data[reconcile.LISTING_KEY])
    assert listing.status is report.BuildStatus.SUCCEEDED, listing.reason
    quantized = next(c for c in body["status"]["conditions"] if c["type"] == "Quantized")
    assert quantized["reason"] == findings.Reason.CLAIM_TOO_SMALL, quantized
    assert quantized["message"].startswith("q8: spec.storage.pvc.size is 1Gi, but the builds need about 2Gi (download")
    assert findings.Reason.CLAIM_TOO_SMALL in {e.reason for e in _warnings(api_client, namespace, "small")}
    listed = batch.list_namespaced_job(namespace, label_selector="kquant.dev/model=small").items
    jobs = [j.metadata.name for j in listed]
    assert set(jobs) <= {step}, f"no build Job is made: {jobs}"
    assert not _weights_fetched(hub)
    assert TOKEN not in json.dumps(core.read_namespaced_config_map(step, namespace).data)

    # A claim that fits and a memory request below the need: the build Job is sized, with a Warning.
    _model(api_client, namespace, "fits", hub, claim="2Gi", memory="1Gi")
    body, step = _sized_pass(api_client, namespace, "fits")
    qm = api.QuantizedModel.model_validate(body)
    first = builds.plan_builds(qm, namespace)[0]
    job = batch.read_namespaced_job(first.name, namespace)
    assert job.spec.active_deadline_seconds == 7200  # 2 x the estimate + 1 h, in whole hours
    assert job.spec.template.spec.containers[0].resources.requests == {"cpu": "2", "memory": "1Gi"}
    spec = settings.BuildSpec.model_validate_json(core.read_namespaced_config_map(first.name, namespace).data[
        builds.SPEC_KEY])
    assert spec.threads == 2
    undersized = [e.message for e in _warnings(api_client, namespace, "fits") if e.reason == "BuildUnderSized"]
    assert any("spec.quantizer.resources.requests.memory is 1Gi, but the build needs about 4Gi" in m
               for m in undersized), undersized
    assert not _weights_fetched(hub)
