"""A bnb-nf4 variant of SmolLM2-135M-Instruct, built for real on this machine's CPU.

transformers loads the 16-bit fixture folder with bitsandbytes' 4-bit settings (bitsandbytes has
CPU kernels since 0.48), the pipeline saves the quantized safetensors with their
``quantization_config``, scores them against the 16-bit model on the held-out text (the GGUF
variants' gate) and publishes the folder under its digest. Then the published folder is loaded
the way a fine-tuning job would load it, and its logits are compared with the 16-bit model's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from fixtures import smollm2
from kquant.quantizer import evaluate, pipeline, progress, report, settings

MAX_KL = 0.5
"""The gate for this build (nats per token). NF4 of a 135M model whose weights already went
through Q4_1 (the fixture) loses far more than Q4_K_M with an imatrix (0.034): the test checks the
numbers are measured and plausible, the report records them."""


@dataclasses.dataclass(frozen=True)
class Built:
    spec: settings.BuildSpec
    report: report.BuildReport
    seconds: float


def build_spec(root: Path) -> settings.BuildSpec:
    return settings.parse_spec(
        {
            "source": {"local": {"path": str(smollm2.hf_dir())}},
            "variants": [{"name": "nf4", "format": "bnb-nf4"}],
            "evaluation": {"chunks": 2, "contextSize": 256, "maxKLDivergence": MAX_KL, "smokeTokens": 12},
            "storageRoot": str(root),
            "threads": 2,
        }
    )


def run(spec: settings.BuildSpec) -> report.BuildReport:
    return pipeline.BuildRunner(spec, progress.LogSink()).run()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    import time

    spec = build_spec(tmp_path_factory.mktemp("bnb-store"))
    start = time.monotonic()
    result = run(spec)
    assert result.status is report.BuildStatus.SUCCEEDED, result.reason
    return Built(spec, result, time.monotonic() - start)


def test_the_variant_is_published_under_its_digest_with_its_quantization_config(built: Built) -> None:
    variant = built.report.variants[0]
    digest = settings.variant_digest(built.spec, built.spec.variants[0])
    folder = Path(variant.path)
    assert folder == built.spec.storage_root / digest / "nf4" and folder.is_dir()
    assert (variant.format, variant.type) == ("bnb-nf4", "bnb-nf4")
    on_disk = report.VariantReport.model_validate_json((folder.parent / "report.json").read_text())
    assert on_disk == variant
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes" and quant["load_in_4bit"]
    assert (quant["bnb_4bit_quant_type"], quant["bnb_4bit_use_double_quant"]) == ("nf4", True)
    assert quant["bnb_4bit_compute_dtype"] == "bfloat16"
    for entry in variant.files:
        data = (folder / entry.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size_bytes, entry.sha256)
    names = {e.name for e in variant.files}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    # 4-bit codes are stored as uint8 pairs; the tied embedding stays 16-bit, hence ~6.7 bits on 135M
    assert variant.tensor_types.get("U8", 0) > 0
    source = sum(f.stat().st_size for f in smollm2.hf_dir().glob("*.safetensors"))
    assert variant.size_bytes < source / 2
    print(f"\npublished {folder}: {variant.size_bytes} bytes, {variant.bits_per_weight} bits per weight, "
          f"build {built.seconds:.0f} s")


def test_the_gate_measured_it_against_the_16_bit_model(built: Built) -> None:
    variant = built.report.variants[0]
    metrics = variant.metrics
    assert metrics is not None and metrics.kl_divergence is not None and metrics.reference_perplexity is not None
    assert metrics.tokens == 2 * 255
    assert 0 < metrics.kl_divergence < MAX_KL and variant.gate_passed
    assert metrics.top1_agreement is not None and metrics.top1_agreement > 0.5
    assert metrics.perplexity > metrics.reference_perplexity * 0.9
    assert metrics.smoke is not None and metrics.smoke.passed, metrics.smoke
    print(f"\ngate: KL {metrics.kl_divergence:.4f}, ppl {metrics.perplexity:.2f} vs "
          f"{metrics.reference_perplexity:.2f}, top-1 {metrics.top1_agreement:.3f}, smoke {metrics.smoke.text!r}")


def _mean_kl(reference: torch.Tensor, variant: torch.Tensor) -> tuple[float, float]:
    logp, logq = reference.float().log_softmax(-1), variant.float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    top1 = (logp.argmax(-1) == logq.argmax(-1)).float().mean().item()
    return kl, top1


def test_the_published_folder_loads_with_transformers_and_its_logits_follow_the_16_bit_model(built: Built) -> None:
    folder = Path(built.report.variants[0].path)
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(folder)
    quantized: Any = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    import bitsandbytes

    linear4 = [m for m in quantized.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(linear4) == 30 * 7, "every attention and MLP projection of the 30 blocks is 4-bit"
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    full: Any = transformers.AutoModelForCausalLM.from_pretrained(smollm2.hf_dir(), dtype=torch.float32)
    # text the evaluation did not score: the calibration text
    ids = tokenizer(evaluate.builtin_text("calibration.txt"), return_tensors="pt").input_ids[:, :256]
    with torch.inference_mode():
        kl, top1 = _mean_kl(full(ids).logits, quantized(ids).logits)
    print(f"\nreloaded nf4 vs 16-bit on {ids.shape[1]} tokens: KL {kl:.4f} nats/token, top-1 agreement {top1:.3f}")
    assert 0 < kl < MAX_KL and top1 > 0.5


def test_a_second_run_finds_it_published_and_rebuilds_nothing(built: Built) -> None:
    again = run(built.spec)
    assert again.status is report.BuildStatus.SUCCEEDED
    assert again.variants[0].path == built.report.variants[0].path
    assert again.variants[0].sha256 == built.report.variants[0].sha256
    ran = [s.step for s in again.steps if not s.skipped]
    assert ran == [], ran


def test_a_qlora_step_trains_adapters_on_the_published_folder(built: Built) -> None:
    """docs/fine-tuning.md's recipe, one optimizer step: the adapters learn, the 4-bit base stays."""
    import peft

    folder = Path(built.report.variants[0].path)
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(folder)
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    model = peft.get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in model.parameters())
    base = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    packed = base.weight.data.clone()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(float(p.detach().abs().sum()) == 0.0 for p in lora_b), "peft starts lora_B at zero"
    batch = tokenizer(evaluate.builtin_text("calibration.txt"), return_tensors="pt").input_ids[:, :64]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b), "the adapters moved"
    assert torch.equal(base.weight.data, packed), "the 4-bit base is frozen"
    print(f"\nQLoRA step on the published nf4 folder: loss {loss.detach().item():.3f}, "
          f"{sum(p.numel() for p in trainable)} trainable parameters")
