"""Serving decisions and status: pure logic over plain node/pod dicts, no cluster."""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

import yaml
from fixtures.gguf_models import Shape, shape_facts
from kquant.operator import artifacts, builds, findings, server_manifests, serving, status
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report

REPO = pathlib.Path(__file__).resolve().parents[2]
GiB = 2**30


def _qm(**serving_changes: Any) -> api.QuantizedModel:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=2)
    body["spec"]["serving"].update({"gpus": 1, "gpuLayers": "auto", **serving_changes})
    return api.QuantizedModel.model_validate(body)


def _node(name: str, gib: int, count: int, product: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {
        "nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": str(gib * 1024),
        "nvidia.com/gpu.count": str(count)}},
        "status": {"allocatable": {"nvidia.com/gpu": str(count)}}}


NODES = [_node("small", 24, 1, "RTX-4090"), _node("big", 80, 1, "A100-80GB"), _node("cpu", 0, 0, "")]
NODES[2] = {"metadata": {"name": "cpu", "labels": {}}, "status": {"allocatable": {"cpu": "8"}}}


def test_a_small_model_goes_to_the_smallest_gpu_with_full_offload() -> None:
    facts = shape_facts(Shape())
    found = serving.candidates(_qm(), facts, NODES, [])
    chosen = serving.choose(found)
    assert chosen is not None and chosen.node == "small" and chosen.full_offload
    assert chosen.offload.gpu_layers == facts.block_count + 1


def test_a_model_too_big_for_every_gpu_is_not_served_and_says_why() -> None:
    # 60 layers of about 3.3 GiB each at F16, all forced onto one GPU: no 24 or 80 GiB card holds them.
    facts = shape_facts(Shape(n_layer=60, n_embd=8192, n_ff=65536, n_head=64, n_head_kv=8, n_vocab=32000))
    qm = _qm(gpuLayers=61)
    found = serving.candidates(qm, facts, NODES, [])
    assert [c.node for c in found] == ["small", "big"]
    assert serving.choose(found) is None
    verdict = serving.no_fit(qm, found, facts)
    assert verdict.reason == "DoesNotFit"
    assert "fits no GPU pool (largest: big, 80 GiB x 1)" in verdict.message


def test_no_gpu_node_matching_the_selector_is_reported() -> None:
    qm = _qm(nodeSelector={"pool": "h200"})
    found = serving.candidates(qm, shape_facts(Shape()), NODES, [])
    assert found == []
    assert serving.no_fit(qm, found, shape_facts(Shape())).reason == "NoGPUNodes"


def _artifact(name: str = "q4km") -> artifacts.Artifact:
    return artifacts.Artifact(variant=name, digest="d" * 16, path=f"{builds.STORAGE_MOUNT}/{'d' * 16}/{name}.gguf",
                              size_bytes=0)


def test_server_arguments_follow_the_spec_and_the_plan() -> None:
    qm = _qm(cacheTypeK="q4_0", sampling={"temperature": 0.6, "minP": 0.05, "seed": 3407})
    chosen = serving.choose(serving.candidates(qm, shape_facts(Shape()), NODES, []))
    deployment = server_manifests.deployment(qm, _artifact(), chosen, surge=False)
    served = status.serving_status(qm, _artifact(), chosen)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert pairs["--model"] == f"{builds.STORAGE_MOUNT}/{'d' * 16}/q4km.gguf"
    assert args[args.index("--n-gpu-layers") + 1] == "9" and args[args.index("--cache-type-k") + 1] == "q4_0"
    assert "--kv-unified" in args and args[args.index("--fit") + 1] == "off"
    assert args[args.index("--temp") + 1] == "0.6" and args[args.index("--seed") + 1] == "3407"
    assert "--metrics" in args
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert deployment["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "RTX-4090"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert served.gpu_layers == 9 and served.node_gpu_bytes == 24 * GiB
    assert served.endpoint == "http://smollm2.ml.svc.cluster.local:8080/v1"
    # the level that logs the buffers the plan is checked against, and no prompts
    assert args[args.index("--log-verbosity") + 1] == "4"
    # the prediction per device, recorded at rollout, before any pod ran
    check = served.plan_check
    assert check is not None and check.devices is not None and check.verified is None
    assert [d.device for d in check.devices] == ["GPU0", "Host"]
    assert check.devices[0].predicted_bytes == served.predicted_gpu_bytes and check.planned_layers == 9


def test_a_users_own_log_verbosity_is_kept() -> None:
    qm = _qm(extraArgs=["-lv", "2"])
    args = server_manifests.server_args(qm, "/m.gguf", None)
    assert "--log-verbosity" not in args and args[-2:] == ["-lv", "2"]


def _gpu_pod(name: str, node: str, namespace: str = "ml", gpus: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"nodeName": node, "containers": [
        {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}, "status": {"phase": "Running"}}


def test_rolling_update_only_where_a_second_pod_fits() -> None:
    """The model's own server holds the small GPU: the new rollout may take it back (Recreate),
    so the small pool stays the choice, but there is no room for a surge pod beside it."""
    qm = _qm()
    own_pod = _gpu_pod("smollm2-server-abc", "small")
    free = serving.candidates(qm, shape_facts(Shape()), NODES, [])
    busy = serving.candidates(qm, shape_facts(Shape()), NODES, [own_pod], own=["smollm2-server-abc"])
    assert serving.surge_fits(serving.choose(free), free)
    chosen = serving.choose(busy)
    assert chosen is not None and chosen.node == "small"
    assert not serving.surge_fits(chosen, busy)


def test_a_pool_whose_gpus_another_server_holds_is_skipped() -> None:
    """Seen in bench/plan_check_latency.py: a second GPU model sent to the full 1-GPU node stayed
    Pending. Another model's pod (same name in another namespace, too) does not count as ours."""
    qm = _qm()
    others = [_gpu_pod("other-server-xyz", "small", namespace="team-b"),
              _gpu_pod("smollm2-server-abc", "small", namespace="team-b")]
    found = serving.candidates(qm, shape_facts(Shape()), NODES, others, own=["smollm2-server-abc"])
    small = next(c for c in found if c.node == "small")
    assert (small.pool.free, small.free, small.has_room) == (0, 0, False)
    chosen = serving.choose(found)
    assert chosen is not None and chosen.node == "big" and chosen.has_room


def test_a_model_that_fits_only_taken_gpus_waits_and_says_why() -> None:
    qm = _qm()
    taken = [_gpu_pod("a", "small", namespace="team-b"), _gpu_pod("b", "big", namespace="team-c")]
    facts = shape_facts(Shape())
    found = serving.candidates(qm, facts, NODES, taken)
    assert [c.node for c in found] == ["small", "big"] and all(c.offload.fits for c in found)
    assert serving.choose(found) is None
    verdict = serving.no_fit(qm, found, facts)
    assert verdict.reason is findings.Reason.GPUS_BUSY
    assert verdict.reason.waits_for_capacity and not verdict.reason.stalled and verdict.reason.warning
    assert "fits 2 GPU pool(s), but none has 1 free GPU(s) now" in verdict.message
    assert "small (RTX-4090: 0 of 1 free)" in verdict.message and "big (A100-80GB: 0 of 1 free)" in verdict.message


def _state(variant: str, phase: findings.BuildPhase, gate: bool = True) -> findings.BuildState:
    build = builds.Build(model="smollm2", variant=variant, digest="e" * 16, spec=None)  # type: ignore[arg-type]
    rep = None
    if phase is findings.BuildPhase.SUCCEEDED:
        rep = report.VariantReport(name=variant, digest="e" * 16, type="Q4_K_M", recipe="uniform",
                                   path=f"/data/{'e' * 16}/{variant}.gguf", size_bytes=100, gate_passed=gate)
    return findings.BuildState(build, phase, progress="quantizing 40%", reason="boom", report=rep)


NOW = datetime.datetime(2026, 11, 25, tzinfo=datetime.UTC)


def test_status_while_building_and_when_ready() -> None:
    qm = _qm()
    building = status.compute(qm, [_state("q8", findings.BuildPhase.SUCCEEDED),
                                   _state("q4km", findings.BuildPhase.RUNNING)], None, NOW)
    assert building.phase is api.Phase.QUANTIZING
    assert building.progress == "q4km 2/2 quantizing 40%"
    assert building.observed_generation == 2
    quantized = building.condition("Quantized")
    assert quantized is not None and quantized.reason == "Building"
    done = [_state("q8", findings.BuildPhase.SUCCEEDED), _state("q4km", findings.BuildPhase.SUCCEEDED)]
    ready = status.compute(qm, done, findings.ServingState(True, findings.Reason.SERVING, "ok"), NOW)
    assert ready.phase is api.Phase.READY
    assert {c.type: c.status.value for c in ready.conditions or []} == {
        "Quantized": "True", "Evaluated": "True", "Serving": "True", "Ready": "True",
        "Stalled": "False", "Reconciling": "False"}
    assert ready.variants is not None and ready.variants[0].path == f"{builds.STORAGE_MOUNT}/{'e' * 16}/q8.gguf"


def test_a_failed_build_fails_the_model_with_its_reason() -> None:
    failed = status.compute(_qm(), [_state("q8", findings.BuildPhase.FAILED),
                                    _state("q4km", findings.BuildPhase.QUEUED)], None, NOW)
    assert failed.phase is api.Phase.FAILED
    quantized = failed.condition("Quantized")
    assert quantized is not None and quantized.reason == "BuildFailed" and "q8: boom" in quantized.message
    stalled = failed.condition("Stalled")
    assert stalled is not None and stalled.status.value == "True" and stalled.reason == "BuildFailed"


def test_a_promoted_variant_that_failed_its_gate_stalls_the_model() -> None:
    done = [_state("q8", findings.BuildPhase.SUCCEEDED), _state("q4km", findings.BuildPhase.SUCCEEDED, gate=False)]
    gated = findings.ServingState(False, findings.Reason.GATE_FAILED, "q4km failed")
    result = status.compute(_qm(), done, gated, NOW)
    assert result.phase is api.Phase.FAILED
    assert result.condition("Stalled").status.value == "True"  # type: ignore[union-attr]
    assert result.condition("Reconciling").status.value == "False"  # type: ignore[union-attr]


def test_condition_transition_time_survives_an_unchanged_status() -> None:
    qm = _qm()
    first = status.compute(qm, [_state("q8", findings.BuildPhase.RUNNING)], None, NOW)
    later = NOW + datetime.timedelta(minutes=5)
    again = status.compute(qm.model_copy(update={"status": first}), [_state("q8", findings.BuildPhase.RUNNING)],
                           None, later)
    assert again.condition("Quantized").last_transition_time == NOW  # type: ignore[union-attr]


def test_host_memory_bounds_partial_offload() -> None:
    # 4M tokens of f32 KV cache (32 GiB) overflow the 24 GiB GPU; the layers left on the CPU need
    # more than the node's 8 GiB, so the variant fits nowhere. Unknown memory leaves it to the GPU.
    small = NODES[0]
    small_8g = {**small, "status": {"allocatable": {**small["status"]["allocatable"], "memory": "8Gi"}}}
    qm = _qm(contextSize=4_194_304, cacheTypeK="f32", cacheTypeV="f32", flashAttention="on", resources=None)
    facts = shape_facts(Shape())
    assert serving.choose(serving.candidates(qm, facts, [small], [])) is not None
    assert serving.choose(serving.candidates(qm, facts, [small_8g], [])) is None
