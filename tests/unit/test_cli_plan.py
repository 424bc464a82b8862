"""``kquant plan``: the numbers printed are the planner's own, for builtin shapes and real GGUF facts."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml
from fixtures import gguf_models
from kquant.operator import cli, serving
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import shapes
from kquant.operator.planner import memory, plan, seed
from typer.testing import CliRunner

REPO = pathlib.Path(__file__).resolve().parents[2]
DEEPSEEK_GGUF = REPO / "examples/03-prequantized-gguf/quantizedmodel.yaml"
SMOLLM2 = REPO / "examples/01-smollm2/quantizedmodel.yaml"
GiB = 1 << 30
runner = CliRunner()


def _qm(path: pathlib.Path) -> api.QuantizedModel:
    return api.QuantizedModel.model_validate(yaml.safe_load(path.read_text()))


def _json(args: list[str]) -> dict[str, object]:
    result = runner.invoke(cli.app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


def test_deepseek_builtin_shape_matches_the_published_file() -> None:
    qm = _qm(DEEPSEEK_GGUF)
    facts, how = shapes.estimate(qm, qm.spec.variant("ud-iq1s"))
    assert facts.block_count == 61 and facts.is_mla and facts.is_moe and facts.expert_count == 256
    assert abs(facts.total_bytes / GiB - 131) < 0.5, facts.total_bytes / GiB
    assert "published 131 GiB" in how
    # MLA caches the 576-wide latent only: one KV head, K only.
    assert facts.head_count_kv == (1,) * 61 and facts.key_length == 576


@pytest.mark.parametrize("gpu_gib", [24, 80])
def test_plan_prints_the_planners_numbers(gpu_gib: int) -> None:
    qm = _qm(DEEPSEEK_GGUF)
    facts, _ = shapes.estimate(qm, qm.spec.variant("ud-iq1s"))
    assert qm.spec.serving is not None
    ctx = serving.context_settings(qm.spec.serving)
    expected = plan.plan(plan.PlanRequest(facts, ctx, (gpu_gib * GiB,)))
    data = _json([str(DEEPSEEK_GGUF), "--gpu", f"{gpu_gib}GiB"])
    auto, seed_plan = data["kquant"], data["seed"]
    assert isinstance(auto, dict) and isinstance(seed_plan, dict)
    assert auto == json.loads(json.dumps(plan.plan_to_dict(expected)))
    assert seed_plan["gpuLayers"] == seed.seed_gpu_layers(gpu_gib * GiB, facts.file_bytes, 61)
    # The planner keeps attention and KV on the GPU and moves experts out; the seed drops whole layers.
    assert auto["fits"] and auto["gpuLayers"] == 62 and isinstance(auto["nCpuMoe"], int) and auto["nCpuMoe"] > 0
    assert seed_plan["gpuLayers"] < 62


def test_eight_gpus_hold_everything_and_two_are_enough() -> None:
    data = _json([str(DEEPSEEK_GGUF), "--gpu", "80GiB", "--gpus", "8"])
    auto, fewest = data["kquant"], data["fewestGPUs"]
    assert isinstance(auto, dict) and auto["fullOffload"] and auto["gpus"] == 8
    # What the operator requests from a pool of 80 GiB GPUs (docs/memory-model.md).
    assert isinstance(fewest, dict) and fewest["fullOffload"] and fewest["gpus"] == 2


def test_human_output_shows_both_planners_and_the_args() -> None:
    result = runner.invoke(cli.app, ["plan", str(DEEPSEEK_GGUF), "--gpu", "24GiB"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("kquant", "seed formula", "--n-cpu-moe", "llama-server --n-gpu-layers 62", "estimate: published",
                 "a pool of 24.00 GiB GPUs: request 6 GPU(s) for full offload"):
        assert text in result.output


def test_facts_from_a_real_gguf_header(tmp_path: pathlib.Path) -> None:
    path = gguf_models.write_model(tmp_path / "tiny.gguf", gguf_models.Shape(n_layer=4, n_embd=256, n_ff=512,
                                                                             n_vocab=1000))  # fmt: skip
    result = runner.invoke(cli.app, ["plan", str(SMOLLM2), "--gpu", "64MiB", "--gpus", "1", "--gguf", str(path),
                                     "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["facts"] == f"GGUF header of {path}"
    assert data["kquant"]["totalLayers"] == 5


def test_facts_from_a_quantizer_report(tmp_path: pathlib.Path) -> None:
    qm = _qm(SMOLLM2)
    facts, _ = shapes.estimate(qm, qm.spec.variant("q4km"))
    report = {"status": "Succeeded", "variants": [{"name": "q4km", "facts": facts.model_dump(mode="json")}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    data = _json([str(SMOLLM2), "--gpu", "8GiB", "--gpus", "1", "--facts", str(path)])
    assert data["facts"] == f"facts in {path}"
    missing = runner.invoke(cli.app, ["plan", str(SMOLLM2), "--gpu", "8GiB", "--variant", "q8", "--facts", str(path)])
    assert missing.exit_code == 1 and "no variant 'q8'" in missing.output


def test_smollm2_uniform_estimate_is_close_to_its_measured_size() -> None:
    # The Q4_K_M build (Q8_0 embedding) of SmolLM2-135M measured 105,453,920 bytes (shared research
    # notes, quantizer-pipeline.md); llama.cpp raises a few tensors the estimate keeps: within 10%.
    qm = _qm(SMOLLM2)
    facts, how = shapes.estimate(qm, qm.spec.variant("q4km"))
    assert "uniform Q4_K_M" in how
    assert facts.tied_embeddings and facts.block_count == 30
    assert abs(facts.total_bytes - 105_453_920) / 105_453_920 < 0.1


def test_errors_name_the_field_and_the_rule(tmp_path: pathlib.Path) -> None:
    bad_size = runner.invoke(cli.app, ["plan", str(SMOLLM2), "--gpu", "lots"])
    assert bad_size.exit_code == 1 and "--gpu is 'lots'" in bad_size.output
    unknown = runner.invoke(cli.app, ["plan", str(SMOLLM2), "--gpu", "8GiB", "--variant", "nope"])
    assert unknown.exit_code == 1 and "--variant is 'nope', but spec.variants has only q8, q4km" in unknown.output
    body = yaml.safe_load(SMOLLM2.read_text())
    body["spec"]["source"]["huggingface"]["repo"] = "someone/unknown-model"
    other = tmp_path / "qm.yaml"
    other.write_text(yaml.safe_dump(body))
    result = runner.invoke(cli.app, ["plan", str(other), "--gpu", "8GiB"])
    assert result.exit_code == 1 and "no builtin shape" in result.output and "--gguf" in result.output


def test_an_impossible_dynamic_budget_is_reported_as_a_failing_build(tmp_path: pathlib.Path) -> None:
    body = yaml.safe_load((REPO / "examples/02-deepseek-r1-dynamic/quantizedmodel.yaml").read_text())
    body["spec"]["variants"][0]["targetSizeGiB"] = 100
    path = tmp_path / "qm.yaml"
    path.write_text(yaml.safe_dump(body))
    result = runner.invoke(cli.app, ["plan", str(path), "--gpu", "24GiB"])
    assert result.exit_code == 1 and "would fail" in result.output and "targetSizeGiB 100" in result.output


def test_context_settings_follow_the_serving_spec() -> None:
    qm = _qm(DEEPSEEK_GGUF)
    assert qm.spec.serving is not None
    ctx = serving.context_settings(qm.spec.serving)
    # llama-server reserves one logits row per slot (--parallel), not a whole ubatch
    assert ctx == memory.ContextSettings(8192, cache_type_k=api.CacheType.Q4_0, outputs=qm.spec.serving.parallel)


def test_a_bnb_variant_has_no_offload_plan_and_plan_says_why(tmp_path: pathlib.Path) -> None:
    body = yaml.safe_load(SMOLLM2.read_text())
    body["spec"]["variants"].append({"name": "nf4", "format": "bnb-nf4"})
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(body))
    result = runner.invoke(cli.app, ["plan", str(manifest), "--gpu", "24GiB", "--variant", "nf4"])
    assert result.exit_code != 0
    assert "variant nf4 is format bnb-nf4: llama-server serves GGUF only" in result.output
