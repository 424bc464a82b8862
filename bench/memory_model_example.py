"""The worked example of docs/memory-model.md: DeepSeek-R1 1.58-bit on 1x24 GiB, 1x80 GiB and 8x80 GiB.

    .venv/bin/python -P bench/memory_model_example.py [--markdown]

The model's facts are the builtin estimate ``kquant plan`` uses for examples/03-prequantized-gguf
(Unsloth's UD-IQ1_S: DeepSeek-R1's published config, 131 GiB, experts at IQ1_S); the serving
settings are that manifest's (context 8192, K cache q4_0, one slot, flash attention). Every number
comes from the operator's planner (``plan.plan``) and the seed formula (``seed.seed_gpu_layers``);
nothing is measured on a GPU here.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import yaml
from kquant.operator import serving
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import shapes
from kquant.operator.planner import memory, plan

REPO = pathlib.Path(__file__).resolve().parents[1]
MANIFEST = REPO / "examples/03-prequantized-gguf/quantizedmodel.yaml"
GiB = 1 << 30
CONFIGS = (("1 x 24 GiB", 24, 1), ("1 x 80 GiB", 80, 1), ("8 x 80 GiB", 80, 8))


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args(argv)
    qm = api.QuantizedModel.model_validate(yaml.safe_load(MANIFEST.read_text()))
    assert qm.spec.serving is not None
    variant = qm.spec.variant(qm.spec.serving.variant)
    facts, how = shapes.estimate(qm, variant)
    ctx = serving.context_settings(qm.spec.serving)
    n = facts.block_count
    moe = [il for il in range(n) if facts.layer_expert_bytes[il]]
    print(f"facts: {how}")
    print(f"file {_gib(facts.file_bytes)} GiB, tensors {_gib(facts.total_bytes)} GiB; {n} blocks "
          f"({n - len(moe)} dense, {len(moe)} MoE); output layer {_gib(facts.output_device_bytes)} GiB; "
          f"token_embd {_gib(facts.token_embd_bytes)} GiB (stays on the CPU)")  # fmt: skip
    print(f"dense block {_gib(facts.layer_bytes[0])} GiB; MoE block {_gib(facts.layer_bytes[moe[0]])} GiB of which "
          f"experts {_gib(facts.layer_expert_bytes[moe[0]])} GiB; experts are "
          f"{sum(facts.layer_expert_bytes) / facts.total_bytes:.1%} of all weights")  # fmt: skip
    kv = memory.kv_layer_bytes(facts, ctx, moe[0])
    print(f"KV per block at context {ctx.context}, K {ctx.cache_type_k} (MLA latent, 576 wide, no V): "
          f"{kv / 2**20:.2f} MiB; all blocks {_gib(kv * n)} GiB")  # fmt: skip
    unabsorbed = ctx.context * 128 * (192 + 128) * 2 * n
    print(f"the same context cached as plain attention (128 heads x (K 192 + V 128), f16): {_gib(unabsorbed)} GiB")
    rows = []
    for label, size, count in CONFIGS:
        auto = plan.plan(plan.PlanRequest(facts, ctx, (size * GiB,) * count))
        seed_plan = plan.plan(plan.PlanRequest(facts, ctx, (size * GiB,) * count,
                                               settings=plan.PlannerSettings(planner=plan.PlannerKind.SEED)))
        rows.append((label, auto, seed_plan))
    header = ("GPUs", "kquant -ngl", "--n-cpu-moe", "kquant fullest GPU GiB (w+KV+compute+1.00)",
              "host weights GiB", "host reads/token GiB", "seed -ngl", "seed fullest GPU GiB", "seed fits",
              "seed host reads/token GiB")
    lines = []
    for label, auto, seed_plan in rows:
        bd = memory.breakdown(facts, ctx, memory.Placement(auto.gpu_layers, auto.tensor_split, auto.n_cpu_moe))
        read = plan._host_read_per_token(facts, bd, auto.n_cpu_moe)
        seed_bd = memory.breakdown(facts, ctx, memory.Placement(seed_plan.gpu_layers, seed_plan.tensor_split))
        seed_read = plan._host_read_per_token(facts, seed_bd, 0)
        fullest = max(range(len(auto.devices)), key=lambda i: auto.predicted_gpu_bytes[i])
        d0 = auto.devices[fullest]
        used = auto.predicted_gpu_bytes[fullest]
        lines.append((label, f"{auto.gpu_layers}/{auto.total_layers}", str(auto.n_cpu_moe),
                      f"{_gib(d0.model)} + {_gib(d0.kv)} + {_gib(d0.compute)} = {_gib(used)}",
                      _gib(auto.host.model), _gib(read), f"{seed_plan.gpu_layers}/{seed_plan.total_layers}",
                      _gib(max(seed_plan.predicted_gpu_bytes)), "yes" if seed_plan.fits else "no",
                      _gib(seed_read)))  # fmt: skip
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in lines:
            print("; ".join(f"{h}: {v}" for h, v in zip(header, line, strict=True)))
    for label, auto, seed_plan in rows:
        print(f"\n{label} kquant: {auto.explanation}\n{label} seed:   {seed_plan.explanation}")
        if len(auto.tensor_split) > 1:
            print(f"{label} tensor split: {auto.tensor_split}")
    for size in (24, 80):
        fewest = plan.fewest_gpus(facts, ctx, size * GiB, 8)
        print(f"\nfewest {size} GiB GPUs (of 8) for full offload: {len(fewest.gpu_memory)}, -ts "
              f"{','.join(f'{s:g}' for s in fewest.tensor_split)}, predicted "
              f"{', '.join(_gib(b) for b in fewest.predicted_gpu_bytes)} GiB")
    _seed_breaks()
    return 0


def _seed_breaks() -> None:
    """Where the seed formula runs out of memory: a dense model whose KV cache is large."""
    qm = api.QuantizedModel.model_validate({
        "metadata": {"name": "llama"}, "spec": {
            "source": {"huggingface": {"repo": "meta-llama/Llama-3.1-8B-Instruct"}},
            "variants": [{"name": "q4km", "type": "Q4_K_M"}], "storage": {"pvc": {"size": "50Gi"}},
            "serving": {"variant": "q4km", "contextSize": 32768}}})  # fmt: skip
    assert qm.spec.serving is not None
    facts, _ = shapes.estimate(qm, qm.spec.variants[0])
    ctx = serving.context_settings(qm.spec.serving)
    for size in (8, 12, 16):
        auto = plan.plan(plan.PlanRequest(facts, ctx, (size * GiB,)))
        seed_plan = plan.plan(plan.PlanRequest(facts, ctx, (size * GiB,),
                                               settings=plan.PlannerSettings(planner=plan.PlannerKind.SEED)))
        print(f"Llama-3.1-8B Q4_K_M ({_gib(facts.file_bytes)} GiB), context 32768, f16 KV, 1 x {size} GiB: "
              f"kquant -ngl {auto.gpu_layers}/{auto.total_layers} predicts {_gib(auto.predicted_gpu_bytes[0])} GiB; "
              f"seed -ngl {seed_plan.gpu_layers} predicts {_gib(seed_plan.predicted_gpu_bytes[0])} GiB "
              f"({'fits' if seed_plan.fits else 'does not fit'})")


if __name__ == "__main__":
    sys.exit(main())
