"""Pods sized from the spec and the build sizing: threads, memory, deadline, /tmp, shard size. Pure."""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

import yaml
from fixtures import listings
from fixtures.gguf_models import Shape, shape_facts
from kquant.operator import (
    artifacts,
    build_gpus,
    build_manifests,
    builds,
    findings,
    observed,
    reconcile,
    server_manifests,
    serving,
    status,
)
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report, settings, sizing, units

REPO = pathlib.Path(__file__).resolve().parents[2]


def _body() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=1)
    return body


def _qm(body: dict[str, Any]) -> api.QuantizedModel:
    return api.QuantizedModel.model_validate(body)


SIZING = report.SizingSummary(claim_bytes=300 * units.GiB, memory_bytes=int(13.5 * units.GiB), cpus=8,
                              deadline_seconds=151_200, base_bytes=141 * 10**9)  # fmt: skip


def _job(qm: api.QuantizedModel, sizing: report.SizingSummary | None) -> tuple[dict[str, Any], settings.BuildSpec]:
    build = builds.plan_builds(qm, "ml")[0]
    objects = build_manifests.objects(qm, build, sizing=sizing)
    spec = settings.BuildSpec.model_validate_json(objects[0]["data"][builds.SPEC_KEY])
    return objects[-1], spec


def test_build_threads_follow_the_cpu_request() -> None:
    body = _body()
    _, spec = _job(_qm(body), None)
    assert spec.threads == 2  # examples/01: requests cpu "2"
    body["spec"]["quantizer"]["resources"] = {"requests": {"cpu": "500m"}, "limits": {"cpu": "3"}}
    assert _job(_qm(body), None)[1].threads == 3  # the limit is what the pod may use
    del body["spec"]["quantizer"]["resources"]
    assert _job(_qm(body), None)[1].threads == 0  # nothing set: llama.cpp's own choice


def test_build_job_is_sized_where_the_spec_is_silent() -> None:
    body = _body()
    del body["spec"]["quantizer"]["resources"]
    job, spec = _job(_qm(body), SIZING)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"] == {"memory": "14Gi", "cpu": "8"}
    assert spec.threads == 8 and job["spec"]["activeDeadlineSeconds"] == 151_200
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"sizeLimit": "4Gi"}
    # the spec's own values win
    body["spec"]["quantizer"].update(resources={"requests": {"cpu": "4", "memory": "64Gi"}}, activeDeadlineSeconds=600)
    job, spec = _job(_qm(body), SIZING)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "64Gi"}
    assert spec.threads == 4 and job["spec"]["activeDeadlineSeconds"] == 600


def test_requests_below_the_sizing_are_named() -> None:
    qm = _qm(_body())  # requests cpu 2, memory 4Gi; claim 2Gi
    found = build_manifests.undersized(qm, SIZING)
    assert found == [
        "spec.quantizer.resources.requests.memory is 4Gi, but the build needs about 14Gi",
        "spec.quantizer.resources.requests.cpu is 2; 8 keep the build within its estimated time",
        "spec.storage.pvc.size is 2Gi, but the builds need about 300Gi",
    ]


def test_shard_size_reaches_the_build_and_the_digest_only_when_changed() -> None:
    body = _body()
    default = builds.plan_builds(_qm(body), "ml")
    assert default[0].spec.max_shard_bytes == settings.DEFAULT_SHARD_BYTES
    assert default[0].spec.storage_claim == "smollm2-storage"
    body["spec"]["storage"]["shardSize"] = "50G"
    assert [b.digest for b in builds.plan_builds(_qm(body), "ml")] == [b.digest for b in default]
    body["spec"]["storage"]["shardSize"] = "20Gi"
    smaller = builds.plan_builds(_qm(body), "ml")
    assert smaller[0].spec.max_shard_bytes == 20 * units.GiB
    assert {b.digest for b in smaller}.isdisjoint(b.digest for b in default)


def _served(**serving_changes: Any) -> dict[str, Any]:
    body = _body()
    body["spec"]["serving"].update({"gpus": 1, "gpuLayers": "auto", **serving_changes})
    qm = _qm(body)
    nodes = [{"metadata": {"name": "n", "labels": {"nvidia.com/gpu.product": "L4", "nvidia.com/gpu.memory": "24576",
                                                   "nvidia.com/gpu.count": "1"}},
              "status": {"allocatable": {"nvidia.com/gpu": "1"}}}]  # fmt: skip
    chosen = serving.choose(serving.candidates(qm, shape_facts(Shape()), nodes, []))
    artifact = artifacts.Artifact(variant="q4km", digest="d" * 16, path="/m/q4km.gguf", size_bytes=0)
    container: dict[str, Any] = server_manifests.deployment(qm, artifact, chosen, surge=False)["spec"]["template"][
        "spec"]["containers"][0]  # fmt: skip
    return container


def test_server_threads_and_memory_request() -> None:
    # examples/01 serving: requests cpu 1, memory 1Gi, limits memory 2Gi
    container = _served()
    args = container["args"]
    assert args[args.index("--threads") + 1] == "1"
    assert container["resources"]["requests"]["memory"] == "1Gi"
    # no memory set: the plan's host bytes plus headroom
    container = _served(resources={"limits": {"cpu": "6"}})
    assert container["args"][container["args"].index("--threads") + 1] == "6"
    assert container["resources"]["requests"]["memory"] == "2Gi"  # a small model: 1 GiB of headroom + its host part
    # extraArgs may set the threads itself
    container = _served(resources={"requests": {"cpu": "4"}}, extraArgs=["--threads", "2"])
    assert container["args"].count("--threads") == 1


def test_server_memory_request_is_the_plans_host_bytes() -> None:
    body = _body()
    body["spec"]["serving"].update({"gpus": 1, "gpuLayers": "auto"})
    del body["spec"]["serving"]["resources"]
    qm = _qm(body)
    nodes = [{"metadata": {"name": "n", "labels": {"nvidia.com/gpu.product": "L4", "nvidia.com/gpu.memory": "24576",
                                                   "nvidia.com/gpu.count": "1"}},
              "status": {"allocatable": {"nvidia.com/gpu": "1"}}}]  # fmt: skip
    chosen = serving.choose(serving.candidates(qm, shape_facts(Shape()), nodes, []))
    assert chosen is not None
    host = chosen.offload.host.total
    expected = -(-int(host * 1.1 + units.GiB) // units.GiB)
    assert server_manifests.memory_request(chosen.offload) == f"{expected}Gi"
    assert "--threads" not in server_manifests.server_args(qm, "/m.gguf", chosen.offload)


class _RecordingClient:
    settings = build_manifests.config.DEFAULTS

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.created.append(manifest)
        return manifest

    def model_exists(self, namespace: str, name: str, uid: str) -> bool:
        return True

    def event(self, qm: object, kind: str, reason: str, message: str, once: str | None = None) -> None:
        self.events.append((kind, reason, message))


def test_the_next_build_is_sized_from_an_earlier_builds_report() -> None:
    """The first build's report carries the sizing its fetch step computed (here: a failed build whose
    claim was too small); the next Job gets its requests, and the spec's lower ones a Warning Event."""
    qm = _qm(_body())
    first, second = builds.plan_builds(qm, "ml")
    failed = report.BuildReport(status=report.BuildStatus.FAILED, reason="claim too small", quantizer_version="0",
                                sizing=SIZING)  # fmt: skip
    children = observed.Children.collect(configmaps=[observed.build_configmap(
        {"metadata": {"name": first.name}, "data": {"report": failed.to_json()}})])  # fmt: skip
    states = [reconcile.observe_build(qm, b, children) for b in (first, second)]
    assert states[0].phase is findings.BuildPhase.FAILED and states[0].sizing == SIZING
    client = _RecordingClient()
    reconcile.start_next_build(client, qm, states)  # type: ignore[arg-type]
    job = client.created[-1]
    assert job["kind"] == "Job" and job["metadata"]["name"] == second.name
    assert job["spec"]["activeDeadlineSeconds"] == SIZING.deadline_seconds
    reasons = [(kind, reason) for kind, reason, _ in client.events]
    assert reasons == [("Warning", "BuildUnderSized")] * 3
    assert "spec.quantizer.resources.requests.memory is 4Gi, but the build needs about 14Gi" in client.events[0][2]


class _Writer(_RecordingClient):
    """A pass's writer for ``start_next_build`` and ``clean_up``: creates (an existing object is None),
    deletes, events; no user ConfigMaps or Secrets to read."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[tuple[str, str]] = []

    def delete(self, manifest: dict[str, Any]) -> bool:
        self.deleted.append((manifest["kind"], manifest["metadata"]["name"]))
        return True

    def config_map_keys(self, namespace: str, name: str) -> list[str] | None:
        return None

    def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        return None


def _llama70b() -> report.SourceListing:
    """The sizing Job's listing of meta-llama/Llama-3.1-70B-Instruct (examples/sizing/llama-3.1-70b)."""
    folder = REPO / "examples/sizing/llama-3.1-70b"
    files = sizing.listing_from_json(json.loads((folder / "files.json").read_text()))
    config = sizing.trim_config(json.loads((folder / "config.json").read_text()))
    return report.SourceListing(status=report.BuildStatus.SUCCEEDED, quantizer_version="0", revision="a" * 40,
                                files=[report.ListedFile(name=f.name, size_bytes=f.size) for f in files],
                                config=config)  # fmt: skip


def _first_pass(body: dict[str, Any], children: observed.Children) -> tuple[_Writer, list[findings.BuildState]]:
    qm = _qm(body)
    now = datetime.datetime.now(datetime.UTC)
    states = [reconcile.observe_build(qm, b, children, now) for b in builds.plan_builds(qm, "ml")]
    client = _Writer()
    return client, reconcile.start_next_build(client, qm, states, children, now)  # type: ignore[arg-type]


def test_the_first_build_waits_for_the_sizing_job_which_reads_no_weights() -> None:
    """No listing yet: the sizing Job is made (the quantizer's ``size`` command, the hub token, no
    claim mounted, small fixed resources) and no build Job; the first build says it is sizing."""
    body = _body()
    body["spec"]["source"]["huggingface"]["tokenSecretRef"] = {"name": "hf", "key": "token"}
    client, states = _first_pass(body, observed.Children())
    step = builds.plan_sizing(_qm(body), "ml")
    assert [(m["kind"], m["metadata"]["name"]) for m in client.created] == [
        (kind, step.name) for kind in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job")]
    job = client.created[-1]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["size"] and job["spec"]["activeDeadlineSeconds"] == 600
    assert {v["name"] for v in pod["volumes"]} == {"tmp"}, "the sizing pod mounts no claim"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    spec = settings.BuildSpec.model_validate_json(client.created[0]["data"][builds.SPEC_KEY])
    assert spec.result_config_map is not None and spec.result_config_map.name == step.name
    assert states[0].phase is findings.BuildPhase.RUNNING and "sizing" in states[0].progress
    shown = status.compute(_qm(body), states, None, datetime.datetime.now(datetime.UTC))
    assert shown.phase is api.Phase.PENDING and shown.progress.startswith("q8 1/2 sizing: listing the source")
    # While it runs, the next pass makes nothing more.
    running = observed.Children.collect(jobs=[observed.build_job({"metadata": {"name": step.name}})])
    client, states = _first_pass(body, running)
    assert client.created == [] and states[0].phase is findings.BuildPhase.RUNNING


def test_a_claim_too_small_for_the_listing_is_refused_before_any_build() -> None:
    """Llama-3.1-70B in the example's 2Gi claim: no build Job; the reason has the number and the field."""
    body = _body()
    body["spec"]["source"]["huggingface"]["repo"] = "meta-llama/Llama-3.1-70B-Instruct"
    client, states = _first_pass(body, listings.with_sizing(body, observed.Children(), _llama70b()))
    assert client.created == []
    assert states[0].phase is findings.BuildPhase.BLOCKED and states[0].why is findings.Reason.CLAIM_TOO_SMALL
    expected = build_gpus.size_from_listing(_qm(body), _llama70b())[0]
    assert expected.claim_bytes > 200 * units.GiB
    assert states[0].reason is not None and states[0].reason.startswith(
        f"spec.storage.pvc.size is 2Gi, but the builds need about {sizing.claim_quantity(expected)} (download ")
    assert "nothing was downloaded" in states[0].reason
    # Grown to what it needs, the build starts, sized from the same listing: no second sizing Job.
    body["spec"]["storage"]["pvc"]["size"] = sizing.claim_quantity(expected)
    del body["spec"]["quantizer"]["resources"]
    expected = build_gpus.size_from_listing(_qm(body), _llama70b())[0]  # now with the rule's CPUs
    client, states = _first_pass(body, listings.with_sizing(body, observed.Children(), _llama70b()))
    job = client.created[-1]
    assert job["kind"] == "Job" and job["metadata"]["name"] == builds.plan_builds(_qm(body), "ml")[0].name
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"memory": sizing.memory_quantity(expected),
                                                  "cpu": str(expected.cpus)}
    assert job["spec"]["activeDeadlineSeconds"] == expected.deadline_seconds
    spec = settings.BuildSpec.model_validate_json(client.created[0]["data"][builds.SPEC_KEY])
    assert spec.threads == expected.cpus == 8


def test_requests_below_the_listings_sizing_get_a_warning_event() -> None:
    body = _body()
    body["spec"]["source"]["huggingface"]["repo"] = "meta-llama/Llama-3.1-70B-Instruct"
    body["spec"]["storage"]["pvc"]["size"] = "400Gi"
    client, states = _first_pass(body, listings.with_sizing(body, observed.Children(), _llama70b()))
    assert states[0].phase is findings.BuildPhase.RUNNING and client.created[-1]["kind"] == "Job"
    warnings = [m for kind, reason, m in client.events if kind == "Warning" and reason == "BuildUnderSized"]
    assert any("spec.quantizer.resources.requests.memory is 4Gi, but the build needs about" in m for m in warnings)
    # 2 CPUs is a choice, not a failure: the deadline is estimated for 2 (no warning for it)
    qm = _qm(body)
    deadline = client.created[-1]["spec"]["activeDeadlineSeconds"]
    assert deadline == build_gpus.size_from_listing(qm, _llama70b())[0].deadline_seconds
    assert not any("requests.cpu" in m for m in warnings)


def test_a_listing_that_failed_holds_no_build_back() -> None:
    """The hub refused the sizing Job: the build starts on the spec's own requests, and its fetch
    step meets the same refusal and reports it as every fetch failure is reported."""
    body = _body()
    failed = report.SourceListing(status=report.BuildStatus.FAILED, reason="401 Unauthorized", quantizer_version="0")
    client, states = _first_pass(body, listings.with_sizing(body, observed.Children(), failed))
    job = client.created[-1]
    assert job["kind"] == "Job" and "activeDeadlineSeconds" not in job["spec"]
    assert states[0].phase is findings.BuildPhase.RUNNING


def test_the_finished_sizing_job_goes_and_its_listing_stays() -> None:
    body = _body()
    qm = _qm(body)
    step = builds.plan_sizing(qm, "ml")
    done = observed.build_job({"metadata": {"name": step.name, "uid": "j"},
                               "status": {"conditions": [{"type": "Complete", "status": "True"}]}})
    children = listings.with_sizing(body, observed.Children.collect(jobs=[done]))
    states = [reconcile.observe_build(qm, b, children) for b in builds.plan_builds(qm, "ml")]
    client = _Writer()
    reconcile.clean_up(client, qm, states, children)  # type: ignore[arg-type]
    assert sorted(client.deleted) == sorted((kind, step.name) for kind in ("Job", "RoleBinding", "Role",
                                                                           "ServiceAccount"))
    # Another source is another sizing: the old step's ConfigMap is superseded and goes.
    body["spec"]["source"]["huggingface"]["revision"] = "b" * 40
    moved = _qm(body)
    assert builds.plan_sizing(moved, "ml").name != step.name
    states = [reconcile.observe_build(moved, b, children) for b in builds.plan_builds(moved, "ml")]
    client = _Writer()
    reconcile.clean_up(client, moved, states, observed.Children(configmaps=children.configmaps))  # type: ignore[arg-type]
    assert ("ConfigMap", step.name) in client.deleted


H100_NODE = {"metadata": {"name": "h100", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                                    "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "8"}},
             "status": {"allocatable": {"nvidia.com/gpu": "8"}}}
L4_NODE = {"metadata": {"name": "l4", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4",
                                                "nvidia.com/gpu.memory": "23034", "nvidia.com/gpu.count": "1"}},
           "status": {"allocatable": {"nvidia.com/gpu": "1"}}}


def test_the_build_pods_gpus_are_planned_when_the_spec_sets_none() -> None:
    """Llama-3.1-70B's 16-bit reference (131 GiB) on a cluster of one L4 node and one 8 x H100 node:
    the planner puts it whole on 2 H100s; the build Job asks for 2 GPUs of that product, and the
    deadline is estimated for them. A spec that sets gpus keeps its count and selector."""
    body = _body()
    body["spec"]["source"]["huggingface"]["repo"] = "meta-llama/Llama-3.1-70B-Instruct"
    body["spec"]["storage"]["pvc"]["size"] = "400Gi"
    del body["spec"]["quantizer"]["gpus"]
    qm = _qm(body)
    found, gpus = build_gpus.size_from_listing(qm, _llama70b(), [L4_NODE, H100_NODE])
    assert (gpus.count, gpus.product, gpus.full_offload) == (2, "NVIDIA-H100-80GB-HBM3", True)
    assert found.gpus == 2
    children = listings.with_sizing(body, observed.Children(), _llama70b())
    now = datetime.datetime.now(datetime.UTC)
    states = [reconcile.observe_build(qm, b, children, now) for b in builds.plan_builds(qm, "ml")]
    client = _Writer()
    view = reconcile.ClusterView(nodes=[L4_NODE, H100_NODE], pods=[])
    reconcile.start_next_build(client, qm, states, children, now, view)  # type: ignore[arg-type]
    job = client.created[-1]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert job["spec"]["activeDeadlineSeconds"] == found.deadline_seconds
    # No GPU node: a CPU build (before the planner it asked for 1 GPU and never scheduled).
    _, none = build_gpus.size_from_listing(qm, _llama70b(), [])
    assert none.count == 0
    # The spec's own count wins.
    body["spec"]["quantizer"]["gpus"] = 1
    _, kept = build_gpus.size_from_listing(_qm(body), _llama70b(), [H100_NODE])
    assert kept.count == 1 and kept.from_spec


def test_a_missing_token_secret_blocks_the_sizing_pod_and_says_so() -> None:
    """The sizing pod gets the token as the build pod does: a missing Secret holds it in
    CreateContainerConfigError, and the first build says SecretNotFound with the fix."""
    body = _body()
    body["spec"]["source"]["huggingface"]["tokenSecretRef"] = {"name": "hf", "key": "token"}
    step = builds.plan_sizing(_qm(body), "ml")
    pod = observed.build_pod({"metadata": {"name": "p", "labels": {"job-name": step.name},
                                           "ownerReferences": [{"uid": "sizing-job"}]},
                              "status": {"containerStatuses": [{"state": {"waiting": {
                                  "reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}}}]}})
    job = observed.build_job({"metadata": {"name": step.name, "uid": "sizing-job"}})
    client, states = _first_pass(body, observed.Children.collect(jobs=[job], pods=[pod]))
    assert client.created == []
    assert states[0].phase is findings.BuildPhase.BLOCKED and states[0].why is findings.Reason.SECRET_NOT_FOUND
    assert states[0].reason is not None and "kubectl create secret generic hf" in states[0].reason
