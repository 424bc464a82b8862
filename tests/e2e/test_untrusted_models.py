"""Attacks through a QuantizedModel on the local cluster: a model repository that ships code, and a
hub token that could leak into what users read.

The QuantizedModels are created by a user who may only create and read QuantizedModels (a
ServiceAccount with that Role, impersonated); the operator builds them, and the build pods run
the real quantizer on the cluster's node.

* A repository whose ``tokenizer_config.json`` maps ``AutoTokenizer`` to its own
  ``tokenization_evil.py`` (StableLM, whose converter passes ``trust_remote_code=True``): the file
  would write a marker holding ``HF_TOKEN`` on the node. The build fails in convert with kquant's
  reason, and no marker appears.
* A Secret made with ``echo $T > f`` (so its value ends in a newline), for a private repository on
  a hub whose errors quote the request's ``Authorization`` header: the token appears in none of
  the places a user can read: the QuantizedModel (status, conditions), Events, ConfigMaps, the
  pods' status (termination message) and the pods' logs.
"""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_helpers import OperatorProcess, condition, qm_status
from fixtures import cluster_client, fake_tokens, hf_models, smollm2
from hub_server import FakeHub
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
TOKEN = fake_tokens.hub_token()
AUTHOR = "model-author"
EVIL_CODE = '''
import os, pathlib
pathlib.Path({marker!r}).write_text("ran; HF_TOKEN=" + str(os.environ.get("HF_TOKEN")))
raise RuntimeError("the repository's own tokenizer code ran")
'''


def _author_client(cluster: cluster_client.Cluster, namespace: str) -> client.ApiClient:
    """An API client that acts as a ServiceAccount which may only create and read QuantizedModels."""
    admin = cluster.api_client()
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": AUTHOR}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": AUTHOR},
        "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create", "get", "list", "watch"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": AUTHOR},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AUTHOR},
        "subjects": [{"kind": "ServiceAccount", "name": AUTHOR, "namespace": namespace}]})
    author = cluster.api_client()
    author.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{AUTHOR}")
    return author


@pytest.fixture(scope="module")
def hostile_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHub, pathlib.Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "marker"
    tiny = hf_models.write_random_hf_like(tmp / "tiny", smollm2.hf_dir(), num_hidden_layers=1)
    evil = hf_models.write_random_hf_like(tmp / "evil", smollm2.hf_dir(), num_hidden_layers=1)
    config = json.loads((evil / "config.json").read_text())
    config.update(architectures=["StableLmForCausalLM"], partial_rotary_factor=1.0, layer_norm_eps=1e-5,
                  use_parallel_residual=False)  # fmt: skip
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "tokenizer.json").unlink()
    tokenizer_config = json.loads((evil / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="EvilTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})  # fmt: skip
    (evil / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (evil / "tokenization_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    with FakeHub() as hub:
        hub.add_repo("attacker/stablelm-tiny", evil)
        hub.add_repo("team/private", tiny, token=TOKEN, echo_authorization=True)
        yield hub, marker


def _model(name: str, hub: FakeHub, repo: str, **source: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizedModel", "metadata": {"name": name},
        "spec": {
            "source": {"huggingface": {"repo": repo, "endpoint": hub.url, **source}},
            "calibration": {"chunks": 1, "contextSize": 64},
            "variants": [{"name": "q8", "type": "Q8_0"}],
            "evaluation": {"chunks": 1, "contextSize": 64},
            "storage": {"pvc": {"size": "1Gi"}},
            "quantizer": {"backoffLimit": 0},
        },
    }  # fmt: skip


def _build_failed(cluster: cluster_client.Cluster, namespace: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = condition(qm_status(cluster, namespace, name), "Quantized")
        return found if found and found["reason"] == "BuildFailed" else None

    return cluster_client.wait_for(check, timeout=600, interval=2, what=f"{name}: BuildFailed")


def _everything_a_user_reads(cluster: cluster_client.Cluster, namespace: str) -> dict[str, str]:
    """Each place the token could surface, as text: the objects through the API, the logs from the node."""
    api = cluster.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    places = {
        "quantizedmodels": json.dumps(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)),
        "events": json.dumps(api.sanitize_for_serialization(core.list_namespaced_event(namespace))),
        "configmaps": json.dumps(api.sanitize_for_serialization(core.list_namespaced_config_map(namespace))),
        "pods": json.dumps(api.sanitize_for_serialization(core.list_namespaced_pod(namespace))),
    }
    for log in cluster.paths.workloads.glob(f"pods/{namespace}/*/logs/*.log"):
        places[f"log {log.parent.parent.name}"] = log.read_text(errors="replace")
    return places


def test_repository_code_never_runs_in_the_build_pod(
    cluster: cluster_client.Cluster, namespace: str, operator: OperatorProcess,
    hostile_hub: tuple[FakeHub, pathlib.Path],
) -> None:  # fmt: skip
    hub, marker = hostile_hub
    # The model's own token, which the repository's code would have read from its environment.
    client.CoreV1Api(cluster.api_client()).create_namespaced_secret(namespace, {
        "metadata": {"name": "hf-token"}, "stringData": {"token": TOKEN}})
    author = client.CustomObjectsApi(_author_client(cluster, namespace))
    author.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _model(
        "evil", hub, "attacker/stablelm-tiny", tokenSecretRef={"name": "hf-token"}))
    failed = _build_failed(cluster, namespace, "evil")
    assert not marker.exists(), f"the repository's code ran in the build pod: {marker.read_text()}"
    assert "never runs code from a model repository" in failed["message"], failed
    assert not any(r.path.endswith(".py") for r in hub.requests), "a code file was fetched"


def test_newline_token_never_reaches_what_users_read(
    cluster: cluster_client.Cluster, namespace: str, operator: OperatorProcess,
    hostile_hub: tuple[FakeHub, pathlib.Path],
) -> None:  # fmt: skip
    hub, _ = hostile_hub
    core = client.CoreV1Api(cluster.api_client())
    # echo $T > f; kubectl create secret generic hf-token --from-file=token=f
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hf-token"},
                                              "data": {"token": base64.b64encode(f"{TOKEN}\n".encode()).decode()}})
    author = client.CustomObjectsApi(_author_client(cluster, namespace))
    author.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _model(
        "private", hub, "team/private", allowPatterns=["*.json"], tokenSecretRef={"name": "hf-token"}))
    failed = _build_failed(cluster, namespace, "private")
    assert "download of team/private@main" in failed["message"], failed
    places = _everything_a_user_reads(cluster, namespace)
    assert any(name.startswith("log ") for name in places), "no build pod log found on the node"
    leaked = [name for name, text in places.items() if TOKEN in text]
    assert not leaked, f"the token is readable in: {leaked}"
    # the hub was reached with the stripped token, and its errors quoted it back
    assert any(r.authorization == f"Bearer {TOKEN}" and "/resolve/" in r.path for r in hub.requests)
