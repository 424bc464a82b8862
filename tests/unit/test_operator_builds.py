"""Build digests and the objects of one build: pure logic, no cluster."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import yaml
from kquant.operator import build_manifests, builds, manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report as quantizer_report

REPO = pathlib.Path(__file__).resolve().parents[2]


def _body(**spec_changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=1)
    body["spec"].update(spec_changes)
    return body


def _digests(body: dict[str, Any]) -> dict[str, str]:
    qm = api.QuantizedModel.model_validate(body)
    return {b.variant: b.digest for b in builds.plan_builds(qm, "ml")}


def test_digest_ignores_serving_and_evaluation_but_not_the_recipe_or_revision() -> None:
    base = _digests(_body())
    serving_change = _body()
    serving_change["spec"]["serving"]["variant"] = "q8"
    serving_change["spec"]["serving"]["contextSize"] = 8192
    serving_change["spec"]["evaluation"]["maxKLDivergence"] = 0.01
    assert _digests(serving_change) == base

    revision = _body()
    revision["spec"]["source"]["huggingface"]["revision"] = "0123456789abcdef0123456789abcdef01234567"
    assert set(_digests(revision).values()).isdisjoint(base.values())

    recipe = _body()
    recipe["spec"]["variants"][1]["tokenEmbeddingType"] = "Q6_K"
    changed = _digests(recipe)
    assert changed["q8"] == base["q8"] and changed["q4km"] != base["q4km"]


def test_a_mirror_or_an_opt_in_switch_is_another_build() -> None:
    """The same repo@revision from a mirror never shares a build (Job, ConfigMap, published folder)
    with the hub's; letting pickles in is another build too. Naming the public hub is the default."""
    base = _digests(_body())
    mirror = _body()
    mirror["spec"]["source"]["huggingface"]["endpoint"] = "https://hf-mirror.example.com"
    pickles = _body()
    pickles["spec"]["source"]["huggingface"]["allowPickles"] = True
    for changed in (mirror, pickles):
        assert set(_digests(changed).values()).isdisjoint(base.values())
    public = _body()
    public["spec"]["source"]["huggingface"]["endpoint"] = "https://huggingface.co"
    assert _digests(public) == base
    qm = api.QuantizedModel.model_validate(pickles)
    hub = builds.plan_builds(qm, "ml")[0].spec.source.huggingface
    assert hub is not None and hub.allow_pickles and not hub.allow_code_files


def test_each_variant_gets_its_own_named_build_with_the_digest_pinned() -> None:
    qm = api.QuantizedModel.model_validate(_body())
    planned = builds.plan_builds(qm, "ml")
    assert [b.variant for b in planned] == ["q8", "q4km"]
    for build in planned:
        assert build.name == f"smollm2-{build.variant}-{build.digest[:8]}"
        assert len(build.name) <= 63
        assert build.spec.variants[0].digest == build.digest
        assert build.spec.result_config_map is not None and build.spec.result_config_map.name == build.name


def test_token_reaches_only_the_build_pod_through_a_secret_ref() -> None:
    body = _body()
    body["spec"]["source"]["huggingface"]["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
    qm = api.QuantizedModel.model_validate(body)
    build = builds.plan_builds(qm, "ml")[0]
    objects = {o["kind"]: o for o in build_manifests.objects(qm, build)}
    env = objects["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "hf-token" not in objects["ConfigMap"]["data"][builds.SPEC_KEY]
    assert "token" not in json.loads(objects["ConfigMap"]["data"][builds.SPEC_KEY])["source"]["huggingface"]


def test_build_service_account_may_patch_only_its_own_configmap() -> None:
    qm = api.QuantizedModel.model_validate(_body())
    build = builds.plan_builds(qm, "ml")[0]
    objects = {o["kind"]: o for o in build_manifests.objects(qm, build)}
    assert objects["Role"]["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                         "resourceNames": [build.name], "verbs": ["get", "patch"]}]
    pod = objects["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == build.name and pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    for obj in objects.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "1234"


def test_gpu_builds_ask_for_gpus_and_a_gpu_node() -> None:
    body = _body()
    body["spec"]["quantizer"] = {"gpus": 2, "backoffLimit": 1, "activeDeadlineSeconds": 3600}
    qm = api.QuantizedModel.model_validate(body)
    job = build_manifests.objects(qm, builds.plan_builds(qm, "ml")[0])[-1]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (1, 3600)


def test_storage_claim_is_kept_on_delete_only_when_asked() -> None:
    kept = manifests.storage_claim(api.QuantizedModel.model_validate(_body()))
    assert kept is not None and "ownerReferences" not in kept["metadata"]  # kept by default
    drop = _body()
    drop["spec"]["storage"]["pvc"]["keepOnDelete"] = False
    dropped = manifests.storage_claim(api.QuantizedModel.model_validate(drop))
    assert dropped is not None and dropped["metadata"]["ownerReferences"][0]["uid"] == "1234"
    existing = copy.deepcopy(_body())
    existing["spec"]["storage"]["pvc"] = {"claimName": "shared-models"}
    assert manifests.storage_claim(api.QuantizedModel.model_validate(existing)) is None


def test_replicas_get_distinct_peering_priorities() -> None:
    from kquant.operator import config

    first = config.OperatorConfig.from_environment({"POD_NAME": "kquant-operator-6f4fbc4546-dghj7"})
    second = config.OperatorConfig.from_environment({"POD_NAME": "kquant-operator-6f4fbc4546-x2k9p"})
    assert first.peering_priority != second.peering_priority
    assert config.OperatorConfig.from_environment({"KQUANT_PEERING_PRIORITY": "100", "POD_NAME": "a"}) \
        .peering_priority == 100
    images = config.OperatorConfig.from_environment({"KQUANT_SERVER_IMAGE": "registry.local/llama:1"})
    qm = api.QuantizedModel.model_validate(_body())
    assert images.server_image == "registry.local/llama:1" and images.quantizer_image == config.DEFAULT_QUANTIZER_IMAGE
    job = build_manifests.objects(qm, builds.plan_builds(qm, "ml")[0], images)[-1]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == config.DEFAULT_QUANTIZER_IMAGE


def test_only_the_last_build_of_a_model_that_keeps_no_intermediates_removes_them() -> None:
    keep = api.QuantizedModel.model_validate(_body())
    body = _body()
    body["spec"]["storage"]["keepIntermediates"] = False
    drop = api.QuantizedModel.model_validate(body)
    build = builds.plan_builds(drop, "ml")[-1]
    assert not builds.discarding_intermediates(builds.plan_builds(keep, "ml")[-1], keep).spec.remove_intermediates
    last = builds.discarding_intermediates(build, drop)
    assert last.spec.remove_intermediates and last.digest == build.digest and last.name == build.name
    configmap = build_manifests.objects(drop, last)[0]
    assert json.loads(configmap["data"][builds.SPEC_KEY])["removeIntermediates"] is True
    assert _digests(body) == _digests(_body()), "keeping intermediates or not makes the same files"


def test_a_permanent_quantizer_exit_fails_the_job_at_once_an_eviction_is_ignored() -> None:
    """The Job retries exit 1 (network, hub 5xx) up to backoffLimit, ignores evictions, and fails at
    once on the codes the quantizer uses for what a rerun meets again (claim full, spec refused)."""
    qm = api.QuantizedModel.model_validate(_body())
    job = build_manifests.objects(qm, builds.plan_builds(qm, "ml")[0])[-1]
    ignore, fail = job["spec"]["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail["action"] == "FailJob"
    codes = fail["onExitCodes"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert codes["operator"] == "In" and codes["containerName"] == container["name"]
    assert sorted(codes["values"]) == [quantizer_report.ExitCode.USAGE, quantizer_report.ExitCode.PERMANENT]
    assert quantizer_report.ExitCode.FAILED not in codes["values"] and 0 not in codes["values"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # onExitCodes needs it
