"""From a QuantizedModel to a served model, on the local cluster, with every part real.

The Job's pod runs the real quantizer on SmolLM2-135M-Instruct (fetched through a local hub),
the Deployment's pod runs the real llama-server on the quantized file, and a chat completion goes
through the endpoint. Then the other variant is promoted by editing the manifest.
"""

from __future__ import annotations

import copy
import json
import pathlib
import time
import urllib.request
from typing import Any

import pytest
import yaml
from e2e_helpers import OperatorProcess, condition, qm_status
from fixtures import cluster_client
from hub_server import FakeHub
from kubernetes import client
from localcluster import services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD_JOBS = "!kquant.dev/step"
"""Build Jobs only: the sizing Job (label kquant.dev/step=size) runs before the first build."""


def smollm2_manifest(hub: FakeHub) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["spec"]["source"]["huggingface"]["endpoint"] = hub.url
    body["spec"]["calibration"]["chunks"] = 4
    body["spec"]["evaluation"]["chunks"] = 2
    body["spec"]["storage"]["keepIntermediates"] = False  # the last build empties .work
    return body


def _server_pods(core: client.CoreV1Api, namespace: str) -> list[Any]:
    pods = core.list_namespaced_pod(namespace, label_selector="kquant.dev/role=server").items
    return [p for p in pods if not p.metadata.deletion_timestamp]


def _chat(core: client.CoreV1Api, namespace: str, question: str) -> dict[str, Any]:
    """A chat completion through the model's Service, as a client in the cluster would send it."""
    address = services.ready_address(core, namespace, "smollm2")
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 16}).encode()
    request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _ready_with(cluster: cluster_client.Cluster, namespace: str, name: str, variant: str) -> dict[str, Any] | None:
    status = qm_status(cluster, namespace, name)
    ready = condition(status, "Ready")
    if ready and ready["status"] == "True" and (status.get("serving") or {}).get("variant") == variant:
        return status
    failed = condition(status, "Quantized")
    if failed and failed["reason"] in ("BuildFailed", "SecretNotFound"):
        raise AssertionError(f"build failed: {failed['message']}")
    return None


def _assert_only_variants_left(core: client.CoreV1Api, namespace: str) -> None:
    """keepIntermediates: false: the claim holds the two published variants and an empty .work."""
    claim = core.read_namespaced_persistent_volume_claim("smollm2-storage", namespace)
    volume = core.read_persistent_volume(claim.spec.volume_name)
    root = pathlib.Path(volume.spec.host_path.path)
    published = sorted(p.name for p in root.glob("*/*.gguf") if not p.parent.name.startswith("."))
    assert len(published) == 2, published
    left = [p for p in (root / ".work").rglob("*") if p.is_file()]
    assert all(p.name == ".lock" for p in left), left


def _assert_each_event_once(core: client.CoreV1Api, namespace: str) -> None:
    """Events say when Ready changes; a pass that ran before the watch showed the operator's own
    status write must not say it twice (the status ledger)."""
    events = core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=smollm2,involvedObject.kind=QuantizedModel").items
    said = [(e.reason, e.message) for e in events]
    assert ("Serving" in {reason for reason, _ in said}), said
    assert len(said) == len(set(said)), f"an Event was posted twice: {said}"
    assert all((e.count or 1) == 1 for e in events), said


def test_build_serve_and_promote(cluster: cluster_client.Cluster, namespace: str, operator: OperatorProcess,
                                 smollm2_hub: FakeHub) -> None:
    api = cluster.api_client()
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    manifest = smollm2_manifest(smollm2_hub)
    custom.create_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", manifest)

    # The operator dies in the middle of the first build and comes back: the build goes on, and
    # no second Job appears for it.
    # (Killed once the status shows the build: a kill between an Event and the status write that
    # follows it would make the restarted operator say the same thing again.)
    cluster_client.wait_for(
        lambda: batch.list_namespaced_job(namespace, label_selector=BUILD_JOBS).items
        and qm_status(cluster, namespace, "smollm2").get("progress", "").startswith("q8 1/2"),
        what="the first build Job and its progress in status")
    operator.kill()
    time.sleep(2)
    operator.start()

    status = cluster_client.wait_for(lambda: _ready_with(cluster, namespace, "smollm2", "q4km"), timeout=900,
                                     interval=2, what="smollm2 to serve q4km")
    variants = {v["name"]: v for v in status["variants"]}
    assert set(variants) == {"q8", "q4km"}
    for variant in variants.values():
        assert variant["sizeBytes"] > 50_000_000 and variant["klDivergence"] >= 0
        assert variant["gatePassed"] is True
    assert variants["q4km"]["sizeBytes"] < variants["q8"]["sizeBytes"]
    assert status["observedGeneration"] == 1 and status["phase"] == "Ready"
    jobs = batch.list_namespaced_job(namespace, label_selector=BUILD_JOBS).items
    assert len(jobs) == 2  # one per variant, no duplicates
    _assert_only_variants_left(core, namespace)
    _assert_each_event_once(core, namespace)

    [pod] = _server_pods(core, namespace)
    args = pod.spec.containers[0].args
    assert args[args.index("--ctx-size") + 1] == "2048" and "--metrics" in args
    answer = _chat(core, namespace, "What is the capital of France?")
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["model"] == "smollm2-q4km"

    promoted = copy.deepcopy(manifest)
    promoted["spec"]["serving"]["variant"] = "q8"
    custom.patch_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", "smollm2",
                                          {"spec": {"serving": {"variant": "q8"}}})
    cluster_client.wait_for(lambda: _ready_with(cluster, namespace, "smollm2", "q8"), timeout=300, interval=2,
                            what="smollm2 to serve q8")
    cluster_client.wait_for(
        lambda: len(_server_pods(core, namespace)) == 1 and _server_pods(core, namespace)[0].metadata.uid
        != pod.metadata.uid, timeout=120, what="the old server pod to go")
    [new_pod] = _server_pods(core, namespace)
    assert _chat(core, namespace, "Say hello.")["model"] == "smollm2-q8"
    assert new_pod.metadata.labels["kquant.dev/variant"] == "q8"
    assert len(batch.list_namespaced_job(namespace, label_selector=BUILD_JOBS).items) == 2  # promotion rebuilt nothing
