"""The platform's rules (kquant.operator.policy) and the pod settings that keep secrets out of reach."""

from __future__ import annotations

import pathlib
from typing import Any

import pydantic
import pytest
import yaml
from kquant.operator import artifacts, build_manifests, builds, config, policy, server_manifests
from kquant.operator.api import v1alpha1 as api

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART_LIKE = config.Policy.from_environment({
    "KQUANT_ALLOWED_ENDPOINTS": '["https://huggingface.co", "https://www.modelscope.cn", "http://10.0.0.5:8000"]',
    "KQUANT_ALLOWED_QUANTIZER_IMAGES": '["ghcr.io/kquant-dev/quantizer:0.1.0"]',
    "KQUANT_ALLOWED_SERVER_IMAGES": '["ghcr.io/kquant-dev/llama-server:0.1.0-cuda", "registry.example.com/llama:*"]',
    "KQUANT_HUB_TOKEN_LABEL_REQUIRED": "true",
})


def _qm(hub: dict[str, Any] | None = None, **spec: Any) -> api.QuantizedModel:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=1)
    body["spec"]["source"]["huggingface"].update(hub or {})
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    return api.QuantizedModel.model_validate(body)


@pytest.mark.parametrize(("endpoint", "allowed"), [
    (None, True),  # the default hub
    ("https://huggingface.co/", True),
    ("https://www.modelscope.cn/api", True),
    ("http://10.0.0.5:8000", True),  # http only because the platform listed it
    ("http://huggingface.co", False),  # the listed hub over cleartext
    ("https://huggingface.co.evil.example", False),
    ("https://huggingface.co@evil.example", False),
    ("https://evil.example/https://huggingface.co", False),
    ("http://10.0.0.5:8001", False),
])  # fmt: skip
def test_endpoints_are_compared_on_the_whole_host(endpoint: str | None, allowed: bool) -> None:
    qm = _qm({"endpoint": endpoint} if endpoint else {})
    refusals = policy.build_refusals(qm, CHART_LIKE)
    assert (refusals == []) is allowed, refusals
    if not allowed:
        assert "QuantizedModel ml/smollm2: spec.source.huggingface.endpoint is" in refusals[0]
        assert "policy.allowedEndpoints" in refusals[0]


def test_images_exact_or_by_prefix() -> None:
    assert policy.build_refusals(_qm(quantizer={"image": "ghcr.io/kquant-dev/quantizer:0.1.0"}), CHART_LIKE) == []
    [refusal] = policy.build_refusals(_qm(quantizer={"image": "evil.example/miner:1"}), CHART_LIKE)
    assert "spec.quantizer.image is 'evil.example/miner:1'" in refusal and "allowedQuantizerImages" in refusal
    assert policy.serving_refusals(_qm(serving={"image": "registry.example.com/llama:b1"}), CHART_LIKE) == []
    [refusal] = policy.serving_refusals(_qm(serving={"image": "registry.example.com/llama-evil:1"}), CHART_LIKE)
    assert "spec.serving.image" in refusal


def test_without_the_chart_nothing_is_restricted() -> None:
    loose = config.Policy.from_environment({})
    qm = _qm({"endpoint": "http://127.0.0.1:9", "tokenSecretRef": {"name": "anything"}},
             quantizer={"image": "any/image:1"})
    assert policy.build_refusals(qm, loose) == [] and policy.token_refusal(qm, loose, {}) is None


def test_a_bad_policy_value_stops_the_operator() -> None:
    with pytest.raises(ValueError, match="KQUANT_ALLOWED_ENDPOINTS must be a JSON list"):
        config.Policy.from_environment({"KQUANT_ALLOWED_ENDPOINTS": '"https://huggingface.co"'})


def test_a_hub_token_secret_must_opt_in() -> None:
    qm = _qm({"tokenSecretRef": {"name": "db-password", "key": "password"}})
    unlabelled = policy.token_refusal(qm, CHART_LIKE, {"app": "postgres"})
    assert unlabelled is not None and "not labelled kquant.dev/hub-token=true" in unlabelled
    assert "kubectl label secret db-password kquant.dev/hub-token=true" in unlabelled
    missing = policy.token_refusal(qm, CHART_LIKE, None)
    assert missing is not None and "does not exist" in missing
    assert policy.token_refusal(qm, CHART_LIKE, {policy.HUB_TOKEN_LABEL: "true"}) is None


def _artifact() -> artifacts.Artifact:
    return artifacts.Artifact(variant="q4km", digest="d" * 64, path=f"{builds.STORAGE_MOUNT}/{'d' * 16}/q4km.gguf",
                              size_bytes=1)


def test_api_key_is_a_mounted_file_never_an_argument_value() -> None:
    qm = _qm(serving={"gpus": 0, "apiKeySecretRef": {"name": "chat-keys", "key": "keys"}})
    pod = server_manifests.deployment(qm, _artifact(), None, surge=False)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    path = args[args.index("--api-key-file") + 1]
    assert path == f"{server_manifests.API_KEY_MOUNT}/{server_manifests.API_KEY_FILE}"
    [volume] = [v for v in pod["volumes"] if v["name"] == "api-key"]
    assert volume["secret"] == {"secretName": "chat-keys", "defaultMode": 0o440,
                                "items": [{"key": "keys", "path": server_manifests.API_KEY_FILE}]}
    assert {"name": "api-key", "mountPath": server_manifests.API_KEY_MOUNT, "readOnly": True} \
        in pod["containers"][0]["volumeMounts"]
    assert "--api-key" not in args and "chat-keys" not in " ".join(args)


def test_no_pod_but_the_build_gets_a_service_account_token() -> None:
    qm = _qm(serving={"gpus": 0})
    server = server_manifests.deployment(qm, _artifact(), None, surge=False)["spec"]["template"]["spec"]
    assert server["automountServiceAccountToken"] is False
    job = build_manifests.objects(qm, builds.plan_builds(qm, "ml")[0])[-1]
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


@pytest.mark.parametrize("arg", ["--api-key", "--api-key=s3cret", "--api-key-file", "--api-key-file=/etc/passwd",
                                 "--api_key=s3cret"])
def test_api_keys_in_extra_args_are_refused(arg: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="never put an API key into extraArgs"):
        _qm(serving={"extraArgs": [arg]})
