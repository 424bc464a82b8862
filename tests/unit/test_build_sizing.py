"""Builds sized from the hub's listing and config.json, for three real models.

Inputs: ``examples/sizing/<model>/{config.json,files.json}`` (the repositories' own config.json
values, and their file lists with the published totals; sources in examples/sizing/README.md):

* DeepSeek-R1 (deepseek-ai/DeepSeek-R1): 163 FP8 safetensors shards, 688.6 GB; hidden 7168,
  61 layers (3 dense, 58 MoE), 256 routed experts + 1 shared of width 2048, MLA (q_lora 1536,
  kv_lora 512), vocabulary 129280, one multi-token-prediction layer.
* Llama-3.1-405B (meta-llama): 191 bf16 shards, 811.7 GB; hidden 16384, 126 layers, 128 heads
  (8 KV), FFN 53248.
* Llama-3.1-70B (meta-llama): 30 bf16 shards, 141,107,412,992 bytes of tensors
  (``model.safetensors.index.json``); hidden 8192, 80 layers, 64 heads (8 KV), FFN 28672.

The checks compare the function's numbers with figures published independently of it: parameter
counts on the model cards (671B main model and 37B activated for R1; 405B; 70B), the index's byte
total, and the 16-bit GGUF sizes people report (1.34 TB for R1's BF16 GGUF). The sums that make up
the claim are checked as sums.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kquant.quantizer import settings, sizing, units

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sizing"
GB = 10**9


def load(model: str) -> tuple[list[sizing.HubFile], dict[str, Any]]:
    folder = EXAMPLES / model
    files = sizing.listing_from_json(json.loads((folder / "files.json").read_text()))
    return files, json.loads((folder / "config.json").read_text())


def variant(**fields: Any) -> settings.VariantSpec:
    return settings.VariantSpec.model_validate(fields)


R1_VARIANTS = (variant(name="ud-iq1s", type="IQ1_S", recipe="dynamic", targetSizeGiB=131),)
LLAMA_VARIANTS = (variant(name="q4km", type="Q4_K_M"),)


API_EVALUATION = settings.Evaluation(chunks=16, context_size=512)
"""spec.evaluation's defaults in the API (16 chunks of 512 tokens), as the operator passes them on."""


def size(model: str, variants: tuple[settings.VariantSpec, ...], **kw: Any) -> sizing.Sizing:
    files, config = load(model)
    return sizing.size_build(files, config, variants, **({"evaluation": API_EVALUATION} | kw))


def test_deepseek_r1() -> None:
    s = size("deepseek-r1", R1_VARIANTS)
    assert s.source_files == 163 + 7 and s.source_bytes == pytest.approx(688.6 * GB, rel=1e-3)
    # model card: 671B parameters in the main model (685B with the 14B MTP module), 37B activated
    assert s.parameters == pytest.approx(671e9, rel=5e-3)
    assert s.active_parameters == pytest.approx(37e9, rel=0.03)
    # the BF16 GGUF of R1 is 1.34 TB (issue 12; Unsloth's DeepSeek-R1-GGUF BF16 folder)
    assert s.base_bytes == pytest.approx(1.342e12, rel=0.01)
    assert s.base_shards == 27  # 1.34 TB in 50 GB shards
    assert s.variant_bytes == {"ud-iq1s": 131 * units.GiB}
    # reference: 16 chunks x 512 tokens x 129280 entries of float16 (+ the tokens)
    assert s.reference_bytes == 16 * 512 * 129280 * 2 + 16 * 512 * 4
    parts = s.source_bytes + s.base_bytes + s.imatrix_bytes + s.reference_bytes + 131 * units.GiB
    assert s.margin_bytes == int(parts * sizing.MARGIN_FRACTION) + sizing.MARGIN_BYTES
    assert s.claim_bytes == parts + s.margin_bytes
    assert 2.2e12 < s.claim_bytes < 2.4e12
    # memory: one tensor (all 256 experts of a projection: 3.76G weights) and one block, not the model
    experts = 256 * 7168 * 2048
    assert s.memory_peaks["quantize"] == experts * 8
    assert max(s.memory_peaks.values()) < 0.05 * s.base_bytes
    assert s.memory_bytes == int((max(s.memory_peaks.values()) + sizing.RUNTIME_BYTES) * sizing.MEMORY_HEADROOM)
    assert s.cpus == 32 and s.threads == 32
    # IQ1_S quantizes ten times slower than a K-quant of the same size
    k_quant = size("deepseek-r1", (variant(name="ud-iq1s", type="Q2_K", recipe="dynamic", targetSizeGiB=131),))
    assert s.seconds["variant:ud-iq1s"] > 2 * k_quant.seconds["variant:ud-iq1s"]
    longest_job = sum(v for k, v in s.seconds.items() if not k.startswith("variant:")) + s.seconds["variant:ud-iq1s"]
    assert 2 * longest_job + 3600 <= s.deadline_seconds <= sizing.MAX_DEADLINE_SECONDS
    assert s.tmp_bytes == 4 * units.GiB


def test_llama_405b() -> None:
    s = size("llama-3.1-405b", LLAMA_VARIANTS)
    assert s.source_files == 191 + 5
    assert s.parameters == pytest.approx(405.85e9, rel=1e-3) and s.active_parameters < s.parameters
    assert s.base_bytes == pytest.approx(811.7 * GB, rel=2e-3) and s.base_shards == 17
    # Q4_K_M: 4.5 bits per weight plus llama.cpp's raised tensors: ~245 GB, as published Q4_K_M files are
    assert s.variant_bytes["q4km"] == pytest.approx(245e9, rel=0.05)
    # the largest tensor is the 128256 x 16384 embedding/output matrix
    assert s.memory_peaks["quantize"] == 128256 * 16384 * 8
    assert s.cpus == 16


def test_llama_70b() -> None:
    s = size("llama-3.1-70b", LLAMA_VARIANTS)
    # bf16: two bytes per parameter, so the index's byte total is twice the parameter count
    assert s.parameters == 141_107_412_992 // 2
    assert s.base_bytes == pytest.approx(141.1 * GB, rel=1e-3) and s.base_shards == 3
    assert s.variant_bytes["q4km"] == pytest.approx(42.5e9, rel=0.05)  # published Q4_K_M files: 42.5 GB
    assert s.cpus == 8 and s.memory_bytes < 32 * units.GiB
    assert s.claim_bytes == pytest.approx(
        (s.source_bytes + s.base_bytes + s.imatrix_bytes + s.reference_bytes + s.variant_bytes["q4km"]) * 1.05
        + sizing.MARGIN_BYTES,
        rel=1e-9,
    )


def test_sizes_scale_with_the_model_not_the_machine() -> None:
    small, large = size("llama-3.1-70b", LLAMA_VARIANTS), size("llama-3.1-405b", LLAMA_VARIANTS)
    assert large.claim_bytes > 5 * small.claim_bytes
    assert large.total_seconds > 2 * small.total_seconds
    # a user's CPU request replaces the rule, and the threads follow it
    pinned = size("llama-3.1-70b", LLAMA_VARIANTS, cpus=3)
    assert pinned.cpus == pinned.threads == 3 and pinned.seconds["variant:q4km"] > small.seconds["variant:q4km"]
    # GPUs shorten calibration and evaluation
    gpu = size("llama-3.1-70b", LLAMA_VARIANTS, gpus=2)
    assert gpu.seconds["calibrate"] < small.seconds["calibrate"]


def test_evaluation_chunks_grow_the_reference() -> None:
    many = size("deepseek-r1", R1_VARIANTS, evaluation=settings.Evaluation(chunks=10_000))
    # the API's maximum of 10,000 chunks of 512 tokens: 1.3 TB of reference log-probabilities
    assert many.reference_bytes == pytest.approx(1.32e12, rel=0.01)


def test_unknown_config_falls_back_to_bytes() -> None:
    files = [sizing.HubFile("model.safetensors", 16 * GB), sizing.HubFile("config.json", 700)]
    s = sizing.size_build(files, {"torch_dtype": "float32"}, LLAMA_VARIANTS)
    assert s.parameters == 4 * GB  # 16 GB of float32
    assert s.base_bytes > 8 * GB


def test_listing_formats() -> None:
    hub = {"siblings": [{"rfilename": "a.safetensors", "size": 3}, {"rfilename": "config.json", "size": 1}]}
    assert sizing.listing_from_json(hub) == [sizing.HubFile("a.safetensors", 3), sizing.HubFile("config.json", 1)]
    assert sizing.select(sizing.listing_from_json(hub), ["*.safetensors"]) == [sizing.HubFile("a.safetensors", 3)]
    with pytest.raises(ValueError, match="entry 0"):
        sizing.listing_from_json([{"name": "x"}])


def test_gguf_bytes_from_safetensors_shapes() -> None:
    shapes = [
        ("model.layers.0.mlp.down_proj.weight", (4096, 1024)),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", (32, 8)),  # FP8 block scales: folded in
        ("model.norm.weight", (1024,)),
    ]
    assert sizing.gguf_bytes_from_shapes(shapes, settings.ConvertType.BF16) == 4096 * 1024 * 2 + 1024 * 4
    assert sizing.gguf_bytes_from_shapes(shapes, settings.ConvertType.F32) == 4096 * 1024 * 4 + 1024 * 4


@pytest.mark.parametrize("model", ["deepseek-r1", "llama-3.1-405b", "llama-3.1-70b"])
def test_the_sizing_jobs_trimmed_config_sizes_the_same(model: str) -> None:
    """The sizing Job hands the operator only the numbers the rules read (``trim_config``); the
    sizing from them is the sizing from the whole config.json."""
    config = json.loads((EXAMPLES / model / "config.json").read_text())
    files = sizing.listing_from_json(json.loads((EXAMPLES / model / "files.json").read_text()))
    trimmed = sizing.trim_config(config)
    assert set(trimmed) - {"quantization_config", "text_config"} <= sizing.CONFIG_KEYS
    variants = [settings.VariantSpec(name="q4km", type="Q4_K_M")]
    assert sizing.size_build(files, trimmed, variants) == sizing.size_build(files, config, variants)


def test_trim_config_keeps_scalars_only() -> None:
    hostile = {"hidden_size": 64, "num_hidden_layers": {"nested": "x" * 10_000}, "vocab_size": "y" * 1000,
               "auto_map": {"AutoModel": "evil.Model"}, "quantization_config": {"quant_method": "fp8", "big": [1] * 99},
               "text_config": {"num_attention_heads": 4, "extra": 1}}
    assert sizing.trim_config(hostile) == {"hidden_size": 64, "quantization_config": {"quant_method": "fp8"},
                                           "text_config": {"num_attention_heads": 4}}
