"""Print what builds of three real models need, from their hub listings and config.json (no download).

    PYTHONSAFEPATH=1 .venv/bin/python -P bench/build_sizing.py [--markdown]

Inputs are ``examples/sizing/<model>/{files.json,config.json}`` (sources in that folder's README);
the numbers come from ``kquant.quantizer.sizing.size_build``, the function the quantizer runs in
its fetch step and ``kquant plan --hub-files`` prints. Each model is sized three times: on CPUs only,
with one GPU for calibration and evaluation, and with the GPUs the operator plans for the build pod
on nodes of 8 x H100 80GB (``operator/build_gpus.py``: the 16-bit reference whole on the fewest
GPUs, else all 8 for a partial offload). docs/sizing.md holds the latest output.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kquant.operator import build_gpus
from kquant.quantizer import settings, sizing, units

ROOT = Path(__file__).resolve().parents[1] / "examples" / "sizing"
API_CALIBRATION = settings.Calibration(chunks=128, context_size=512)
API_EVALUATION = settings.Evaluation(chunks=16, context_size=512)
UD_IQ1_S = settings.VariantSpec.model_validate(
    {"name": "ud-iq1s", "type": "IQ1_S", "recipe": "dynamic", "targetSizeGiB": 131}
)  # examples/02-deepseek-r1-dynamic
Q4_K_M = settings.VariantSpec.model_validate({"name": "q4km", "type": "Q4_K_M"})
MODELS = (
    ("DeepSeek-R1 (671B MoE, FP8)", "deepseek-r1", UD_IQ1_S),
    ("Llama-3.1-405B (bf16)", "llama-3.1-405b", Q4_K_M),
    ("Llama-3.1-70B (bf16)", "llama-3.1-70b", Q4_K_M),
)


def size(folder: str, variant: settings.VariantSpec, gpus: int) -> sizing.Sizing:
    files = sizing.listing_from_json(json.loads((ROOT / folder / "files.json").read_text()))
    config = json.loads((ROOT / folder / "config.json").read_text())
    return sizing.size_build(files, config, [variant], calibration=API_CALIBRATION, evaluation=API_EVALUATION,
                             gpus=gpus)  # fmt: skip


H100_NODE = build_gpus.Pool("NVIDIA-H100-80GB-HBM3", 80 * units.GiB, 8)


def planned(folder: str) -> build_gpus.BuildGPUs:
    config = json.loads((ROOT / folder / "config.json").read_text())
    return build_gpus.for_build(sizing.Architecture.from_config(config), API_EVALUATION, [H100_NODE])


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def markdown() -> str:
    head = ("| model | variant | claim | build memory | CPUs = threads | 16-bit shards | estimated time, CPU only "
            "| deadline | estimated time, 1 GPU | deadline | planned build GPUs (8 x H100 80GB nodes) "
            "| estimated time | deadline |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = [head]
    for title, folder, variant in MODELS:
        cpu, gpu, gpus = size(folder, variant, 0), size(folder, variant, 1), planned(folder)
        plan = size(folder, variant, gpus.count)
        fit = "whole" if gpus.full_offload else "partial offload"
        how = f"{fit}, reference {gpus.reference_bytes / units.GiB:.0f} GiB"
        rows.append(
            f"| {title} | {variant.name} ({variant.type}) | {sizing.claim_quantity(cpu)} | "
            f"{sizing.memory_quantity(cpu)} ({cpu.largest_step}) | {cpu.cpus} | {cpu.base_shards} | "
            f"{hours(cpu.total_seconds)} | {hours(cpu.deadline_seconds)} | {hours(gpu.total_seconds)} | "
            f"{hours(gpu.deadline_seconds)} | {gpus.count} ({how}) | "
            f"{hours(plan.total_seconds)} | {hours(plan.deadline_seconds)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="one table row per model, for docs/sizing.md")
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
        return
    for title, folder, variant in MODELS:
        for gpus in (0, 1):
            s = size(folder, variant, gpus)
            print(f"{title}, variant {variant.name} ({variant.type}), {'1 GPU' if gpus else 'CPU only'}:")
            print("  " + "\n  ".join(s.lines()))
            peaks = ", ".join(f"{k} {math.ceil(v / units.GiB)} GiB" for k, v in s.memory_peaks.items())
            print(f"  memory peaks        {peaks}\n")
        gpus = planned(folder)
        s = size(folder, variant, gpus.count)
        print(f"{title}, variant {variant.name} ({variant.type}), planned build GPUs: {gpus.line()}:")
        print("  " + "\n  ".join(s.lines()) + "\n")


if __name__ == "__main__":
    main()
