"""spec.source.modelscope: the API model, the build it maps to, its digest, the platform's rules and
the fetch step's pure parts (token handling, which failures are permanent). The download itself runs
against a stand-in ModelScope server in tests/integration/test_modelscope_fetch.py."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import modelscope_hub
import pytest
import yaml
from fixtures import fake_tokens
from kquant.operator import build_manifests, builds, config, policy
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import fetch, fetch_modelscope, pipeline, redact, settings, untrusted

REPO = pathlib.Path(__file__).resolve().parents[2]
MODELSCOPE = {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}
ALLOW_BOTH = config.Policy.from_environment({
    "KQUANT_ALLOWED_ENDPOINTS": '["https://huggingface.co", "https://www.modelscope.cn"]',
    "KQUANT_HUB_TOKEN_LABEL_REQUIRED": "true",
})  # fmt: skip


def _body(modelscope: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=1)
    if modelscope is not None:
        body["spec"]["source"] = {"modelscope": modelscope}
    return body


def _qm(modelscope: dict[str, Any] | None = None) -> api.QuantizedModel:
    return api.QuantizedModel.model_validate(_body(modelscope))


def _digests(qm: api.QuantizedModel) -> set[str]:
    return {b.digest for b in builds.plan_builds(qm, "ml")}


def test_api_defaults_are_modelscopes_own() -> None:
    qm = _qm(MODELSCOPE)
    source = qm.spec.source
    assert source.kind == "modelscope" and source.modelscope is not None
    assert source.modelscope.revision == "master"
    assert source.hub is source.modelscope
    spec = builds.plan_builds(qm, "ml")[0].spec
    assert spec.source.huggingface is None and spec.source.modelscope is not None
    assert spec.source.modelscope.url == settings.MODELSCOPE_ENDPOINT
    assert spec.source.repo == MODELSCOPE["repo"]


def test_origin_is_part_of_the_digest_and_tells_the_hubs_apart() -> None:
    """The same owner/name on ModelScope and on Hugging Face, or on two ModelScope endpoints, is
    never one build; an unset endpoint and the default one are."""
    hf = _digests(_qm())
    ms = _digests(_qm(MODELSCOPE))
    named = _digests(_qm({**MODELSCOPE, "endpoint": "https://www.modelscope.cn/"}))
    mirror = _digests(_qm({**MODELSCOPE, "endpoint": "https://modelscope.example.com"}))
    tagged = _digests(_qm({**MODELSCOPE, "revision": "v1.0"}))
    assert ms == named
    for other in (hf, mirror, tagged):
        assert ms.isdisjoint(other)
    identity = settings.source_identity(builds.plan_builds(_qm(MODELSCOPE), "ml")[0].spec.source)
    assert identity["modelscope"]["origin"] == "https://www.modelscope.cn"
    assert "huggingface" in identity and identity["huggingface"] is None


def test_a_huggingface_sources_identity_has_no_modelscope_key() -> None:
    """Digests and work folders of builds made before ModelScope sources existed do not move."""
    spec = builds.plan_builds(_qm(), "ml")[0].spec
    assert set(settings.source_identity(spec.source)) == {"huggingface", "local"}
    ms_spec = builds.plan_builds(_qm(MODELSCOPE), "ml")[0].spec
    assert pipeline.source_key(ms_spec) != pipeline.source_key(spec)


def test_token_reaches_the_build_pod_under_the_modelscope_clients_name() -> None:
    qm = _qm({**MODELSCOPE, "tokenSecretRef": {"name": "ms-token", "key": "token"}})
    build = builds.plan_builds(qm, "ml")[0]
    objects = {o["kind"]: o for o in build_manifests.objects(qm, build)}
    env = {e["name"]: e for e in objects["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[settings.MODELSCOPE_TOKEN_ENV]["valueFrom"] == {"secretKeyRef": {"name": "ms-token", "key": "token"}}
    assert "HF_TOKEN" not in env
    assert env["TQDM_DISABLE"]["value"] == "1"  # no progress bars in the pod's log
    spec_text = objects["ConfigMap"]["data"][builds.SPEC_KEY]
    assert "ms-token" not in spec_text and "token" not in json.loads(spec_text)["source"]["modelscope"]


@pytest.mark.parametrize(("endpoint", "allowed"), [
    (None, True),  # https://www.modelscope.cn, listed
    ("https://www.modelscope.cn", True),
    ("https://www.modelscope.cn.evil.example", False),
    ("http://www.modelscope.cn", False),
])  # fmt: skip
def test_endpoint_rule_covers_modelscope(endpoint: str | None, allowed: bool) -> None:
    qm = _qm({**MODELSCOPE, **({"endpoint": endpoint} if endpoint else {})})
    refusals = policy.build_refusals(qm, ALLOW_BOTH)
    assert (refusals == []) is allowed, refusals
    if not allowed:
        assert "spec.source.modelscope.endpoint is" in refusals[0]


def test_unset_endpoint_means_modelscope_not_huggingface() -> None:
    only_hf = config.Policy.from_environment({"KQUANT_ALLOWED_ENDPOINTS": '["https://huggingface.co"]'})
    refusals = policy.build_refusals(_qm(MODELSCOPE), only_hf)
    assert refusals and "'https://www.modelscope.cn', which is not an allowed hub" in refusals[0]


def test_token_secret_rule_names_the_modelscope_field() -> None:
    qm = _qm({**MODELSCOPE, "tokenSecretRef": {"name": "ms-token"}})
    refusal = policy.token_refusal(qm, ALLOW_BOTH, {})
    assert refusal is not None and "spec.source.modelscope.tokenSecretRef names Secret 'ms-token'" in refusal


def test_take_token_empties_the_environment_and_remembers_the_value() -> None:
    token = fake_tokens.hub_token()
    environ = {fetch_modelscope.TOKEN_ENV: token + "\n", "PATH": "/bin"}
    assert fetch_modelscope.take_token(environ) == token
    assert environ == {"PATH": "/bin"}
    assert token not in redact.redact(f"Authorization: Bearer {token}")
    assert fetch_modelscope.TOKEN_ENV in untrusted.TOKEN_ENV_NAMES  # the converter never sees it


def test_a_token_with_a_line_break_inside_is_refused_naming_the_field() -> None:
    source = settings.ModelScopeSource(repo="a/b")
    with pytest.raises(fetch.FetchError, match=r"spec.source.modelscope.tokenSecretRef"):
        fetch_modelscope.client(source, pathlib.Path("/nonexistent"), {fetch_modelscope.TOKEN_ENV: "ms-a\nb"})


@pytest.mark.parametrize(("error", "permanent"), [
    (modelscope_hub.NotExistError("no such model", status_code=404), True),
    (modelscope_hub.AuthenticationError("login", status_code=401), True),
    (modelscope_hub.PermissionDeniedError("denied", status_code=403), True),
    (modelscope_hub.ServerError("busy", status_code=503), False),
    (modelscope_hub.RateLimitError("slow down", status_code=429), False),
    (modelscope_hub.NetworkError("reset"), False),
    (modelscope_hub.FileIntegrityError("sha256 mismatch"), False),
    (OSError(28, "No space left on device"), True),
    (RuntimeError("a bug"), False),
])  # fmt: skip
def test_which_client_errors_are_permanent(error: BaseException, permanent: bool) -> None:
    assert fetch_modelscope.is_permanent(error) is permanent
    several = modelscope_hub.FileDownloadError("1 of 2 failed", failed_files={"a": error}, total=2)
    assert fetch_modelscope.is_permanent(several) is permanent


def test_the_chosen_files_go_back_to_the_client_as_its_listing_entries() -> None:
    files = [fetch.RemoteFile("model.safetensors", 10, "ab" * 32), fetch.RemoteFile("config.json", 2, None)]
    entries = fetch_modelscope._file_list(files)
    assert entries[0] == {"Path": "model.safetensors", "Size": 10, "Sha256": "ab" * 32, "Type": "blob"}
    assert [e["Path"] for e in entries] == ["model.safetensors", "config.json"]


def test_the_trust_rules_name_the_modelscope_field(tmp_path: pathlib.Path) -> None:
    source = settings.ModelScopeSource(repo="a/b", allow_patterns=("*.gguf",))
    listing = [fetch.RemoteFile("model.safetensors", 1, None), fetch.RemoteFile("modeling.py", 1, None)]
    with pytest.raises(fetch.FetchError, match=r"source.modelscope.allowPatterns \['\*.gguf'\] match none"):
        fetch.choose(source, source.url, listing, tmp_path)
    chosen = fetch.choose(settings.ModelScopeSource(repo="a/b"), source.url, listing, tmp_path)
    assert [f.name for f in chosen] == ["model.safetensors"]  # the code file is left out
    with pytest.raises(fetch.FetchError, match="is absolute"):
        fetch.choose(source, source.url, [fetch.RemoteFile("/etc/passwd", 1, None)], tmp_path)


def test_quantizer_spec_takes_exactly_one_source() -> None:
    both = {"huggingface": {"repo": "a/b"}, "modelscope": {"repo": "a/b"}}
    with pytest.raises(ValueError, match=r"exactly one of source\.huggingface, source\.modelscope"):
        settings.Source.model_validate(both)
    source = settings.Source.model_validate({"modelscope": {"repo": "a/b", "endpoint": "http://10.0.0.1:9/"}})
    assert source.modelscope is not None and source.modelscope.url == "http://10.0.0.1:9"


def test_passthrough_is_refused_for_a_modelscope_source() -> None:
    body = _body(MODELSCOPE)
    body["spec"]["serving"] = None
    body["spec"]["variants"] = [{"name": "asis", "recipe": "passthrough"}]
    with pytest.raises(ValueError, match="a huggingface or modelscope source is always quantized"):
        api.validate_body(copy.deepcopy(body))


def test_a_listed_file_that_is_not_there_is_named_not_blamed_on_the_repo(tmp_path: pathlib.Path) -> None:
    source = settings.ModelScopeSource(repo="a/b", endpoint="http://127.0.0.1:9")
    gone = modelscope_hub.NotExistError("no such file", status_code=404)
    failed = modelscope_hub.FileDownloadError("1 of 3 failed", failed_files={"model.safetensors": gone}, total=3)
    reason = fetch_modelscope.translate(failed, source, fetch_modelscope.client(source, tmp_path, {}))
    assert str(reason) == "ModelScope lists 'model.safetensors' in a/b@master on http://127.0.0.1:9 but answered 404 " \
                          "for its download"
    assert reason.permanent
