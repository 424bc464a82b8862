"""Pods sized from the spec and the build sizing: threads, memory, deadline, /tmp, shard size. Pure."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml
from fixtures.gguf_models import Shape, shape_facts
from kquant.operator import artifacts, build_manifests, builds, findings, observed, reconcile, server_manifests, serving
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report, settings, units

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
    qm = _qm(_body())  # requests cpu 2, memory 2Gi; claim 2Gi
    found = build_manifests.undersized(qm, SIZING)
    assert found == [
        "spec.quantizer.resources.requests.memory is 2Gi, but the build needs about 14Gi",
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

    def event(self, qm: object, kind: str, reason: str, message: str) -> None:
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
    assert "spec.quantizer.resources.requests.memory is 2Gi, but the build needs about 14Gi" in client.events[0][2]
