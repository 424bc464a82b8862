"""How close the offload planner's memory model is to llama.cpp's own accounting, and to ``--fit``.

Run (after ``hack/build-llama.sh``):  ``PYTHONSAFEPATH=1 .venv/bin/python -P bench/offload_accuracy.py``

It writes four random-weight GGUFs once (cached in ``~/.cache/kquant/bench-gguf``): a dense GQA
llama, a Mixtral-style MoE, a llama with tied embeddings in Q8_0, and an olmo2 with a sliding
window. Against a ``ggml-rpc-server`` on loopback (llama.cpp sees it as a GPU):

1. For each fixed case (context 2k-32k, cache f16/q8_0/q4_0, flash attention on/off, ``-ngl``
   from 0 to all, ``--n-cpu-moe``, parallel slots) it compares the planner's predicted model,
   KV and compute bytes on the device and on the host with ``llama-fit-params --fit-print on``.
   Model and KV are printed by llama.cpp in whole MiB (truncated), so predictions are truncated
   the same way before comparing; compute comes from the two-decimal ``sched_reserve`` log lines.
   The seed formula's implied device bytes (``ngl / (layers - 4) * file size``) stand beside them.
2. For emulated GPU budgets (``-fitt`` = free - budget) it compares the planner's ``-ngl`` (and
   ``--n-cpu-moe`` for MoE) with ``--fit``'s choice, and the seed formula's ``-ngl``.

It prints tables and a summary (median and worst relative error per component); it never fails.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

import gguf
from kquant.operator.planner import memory, plan, seed
from kquant.quantizer import constants, gguf_facts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fit_params
import gguf_models

MiB = memory.MiB
CACHE = Path.home() / ".cache" / "kquant" / "bench-gguf"
C = constants.CacheType

MODELS: dict[str, gguf_models.Shape] = {
    "dense": gguf_models.Shape(n_layer=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, n_vocab=32000,
                               name="bench-dense"),
    "moe": gguf_models.Shape(n_layer=8, n_embd=1024, n_head=16, n_head_kv=4, n_ff=1024, n_vocab=32000,
                             n_expert=8, n_expert_used=2, name="bench-moe"),
    "tied": gguf_models.Shape(n_layer=12, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, n_vocab=49152,
                              tied=True, weight_type=gguf.GGMLQuantizationType.Q8_0, name="bench-tied"),
    "swa": gguf_models.Shape(arch="olmo2", n_layer=12, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816,
                             n_vocab=32000, sliding_window=1024, name="bench-swa"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    context: int
    cache: C = C.F16
    flash: bool = True
    ngl: int = 0
    n_cpu_moe: int = 0
    parallel: int = 1

    def settings(self) -> memory.ContextSettings:
        return memory.ContextSettings(self.context, self.cache, self.cache, parallel=self.parallel,
                                      kv_unified=False, flash_attention=self.flash)  # fmt: skip

    def args(self) -> list[str]:
        out = ["-c", str(self.context), "-ctk", str(self.cache), "-ctv", str(self.cache),
               "-fa", "on" if self.flash else "off", "-np", str(self.parallel)]  # fmt: skip
        if self.n_cpu_moe:
            out += ["--n-cpu-moe", str(self.n_cpu_moe)]
        return out

    def label(self) -> str:
        extra = f" cmoe{self.n_cpu_moe}" if self.n_cpu_moe else ""
        extra += f" np{self.parallel}" if self.parallel > 1 else ""
        return (f"{self.model:5s} c{self.context:<5d} {self.cache!s:5s} fa={'on ' if self.flash else 'off'} "
                f"ngl{self.ngl:<2d}{extra}")  # fmt: skip


CASES = [
    Case("dense", 2048, ngl=0),
    Case("dense", 4096, flash=False, ngl=1),
    Case("dense", 8192, C.Q8_0, ngl=9),
    Case("dense", 16384, C.Q4_0, ngl=17),
    Case("dense", 32768, ngl=12),
    Case("dense", 8192, flash=False, ngl=17),
    Case("dense", 8192, ngl=17, parallel=4),
    Case("moe", 4096, ngl=9),
    Case("moe", 8192, C.Q8_0, ngl=9, n_cpu_moe=4),
    Case("moe", 16384, flash=False, ngl=5),
    Case("tied", 2048, ngl=1),
    Case("tied", 8192, C.Q4_0, ngl=13),
    Case("tied", 32768, C.Q8_0, ngl=7),
    Case("swa", 8192, ngl=13),
    Case("swa", 32768, ngl=6),
    Case("swa", 4096, flash=False, ngl=13),
]

FIT_CASES = [  # (model, context, cache, budget MiB)
    ("dense", 8192, C.F16, 200),
    ("dense", 8192, C.F16, 350),
    ("dense", 32768, C.Q8_0, 400),
    ("dense", 4096, C.F16, 600),
    ("tied", 16384, C.F16, 300),
    ("swa", 32768, C.F16, 300),
    ("moe", 8192, C.F16, 300),
    ("moe", 8192, C.F16, 450),
]


def model_path(name: str) -> Path:
    path = CACHE / f"{name}.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        gguf_models.write_model(tmp, MODELS[name])
        tmp.rename(path)
    return path


def rel(pred: float, measured: float) -> float | None:
    """Relative error, or None when both are below 1 MiB (nothing to compare)."""
    if measured < 1 and pred < 1:
        return None
    if measured == 0:
        return 1.0
    return abs(pred - measured) / measured


def seed_bytes(facts: gguf_facts.ModelFacts, ngl: int) -> float:
    """The seed formula read backwards: each of its layers costs file size / (layers - 4)."""
    return min(ngl, facts.block_count) * facts.file_bytes / (facts.block_count - 4)


def run_cases(binaries: Path, endpoint: list[str]) -> dict[str, list[float]]:
    errors: dict[str, list[float]] = {k: [] for k in ("model", "kv", "compute", "host compute", "seed")}
    print("Per-device bytes, predicted vs llama-fit-params (MiB; model and KV truncated like llama.cpp)")
    print(f"{'case':42s} | {'RPC0 model':>15s} {'KV':>13s} {'compute':>17s} | {'Host model':>15s} {'KV':>13s} "
          f"{'compute':>15s} | seed total vs measured")  # fmt: skip
    for case in CASES:
        path = model_path(case.model)
        facts = gguf_facts.read_facts(path)
        m = fit_params.measure(binaries, path, endpoint, ["-ngl", str(case.ngl), *case.args()])
        placement = memory.Placement(case.ngl, (1.0,), case.n_cpu_moe)
        bd = memory.breakdown(facts, case.settings(), placement, memory.Backend.RPC)
        dev, host = bd.devices[0], bd.host
        pairs: dict[str, list[tuple[float, float]]] = {
            "model": [(dev.model // MiB, m.devices[0].model), (host.model // MiB, m.host.model)],
            "kv": [(dev.kv // MiB, m.devices[0].context), (host.kv // MiB, m.host.context)],
            "compute": [(dev.compute / MiB, m.compute_bytes[0] / MiB)],
            "host compute": [(host.compute / MiB, m.host_compute_bytes / MiB)],
        }
        for key, values in pairs.items():
            for p, q in values:
                e = rel(p, q)
                if e is not None:
                    errors[key].append(e)
        measured_total = m.devices[0].model + m.devices[0].context + m.compute_bytes[0] / MiB
        seed_total = seed_bytes(facts, case.ngl) / MiB
        seed_err = rel(seed_total, measured_total)
        if seed_err is not None:
            errors["seed"].append(seed_err)
        print(
            f"{case.label():42s} | {dev.model // MiB:6d} vs {m.devices[0].model:<6d} {dev.kv // MiB:5d} vs "
            f"{m.devices[0].context:<5d} {dev.compute / MiB:7.2f} vs {m.compute_bytes[0] / MiB:<7.2f} | "
            f"{host.model // MiB:6d} vs {m.host.model:<6d} {host.kv // MiB:5d} vs {m.host.context:<5d} "
            f"{host.compute / MiB:6.2f} vs {m.host_compute_bytes / MiB:<6.2f} | "
            f"{seed_total:7.1f} vs {measured_total:7.1f}"
        )
    return errors


def run_fit(binaries: Path, endpoint: list[str]) -> list[str]:
    print("\n--fit against emulated budgets (-fitt = free - budget): planner and seed -ngl vs llama.cpp")
    differences = []
    for name, ctx, cache, budget in FIT_CASES:
        path = model_path(name)
        facts = gguf_facts.read_facts(path)
        args = ["-c", str(ctx), "-ctk", str(cache), "-ctv", str(cache), "-fa", "on"]
        probe = fit_params.fit(binaries, path, endpoint, args, [0])
        target = max(probe.free_mib[0] - budget, 0)
        result = fit_params.fit(binaries, path, endpoint, args, [target])
        seen_budget = result.free_mib[0] - target
        settings = plan.PlannerSettings(backend=memory.Backend.RPC, cuda_context_bytes=0, margin_bytes=0)
        ctx_settings = memory.ContextSettings(ctx, cache, cache, kv_unified=False)
        p = plan.plan(plan.PlanRequest(facts, ctx_settings, (seen_budget * MiB,), settings=settings))
        fit_ngl = result.gpu_layers if result.gpu_layers >= 0 else facts.block_count + 1
        seed_ngl = seed.seed_gpu_layers(seen_budget * MiB, facts.file_bytes, facts.block_count)
        same = p.gpu_layers == fit_ngl
        line = (f"{name:5s} c{ctx:<5d} {cache!s:5s} budget {seen_budget:4d} MiB: fit -ngl {fit_ngl:2d}"
                f"{' -ot ' + result.overrides if result.overrides else ''} | planner -ngl {p.gpu_layers:2d}"
                f"{f' --n-cpu-moe {p.n_cpu_moe}' if p.n_cpu_moe else ''} | seed -ngl {seed_ngl:2d}")  # fmt: skip
        print(line)
        if not same or (result.overrides and not p.n_cpu_moe):
            differences.append(line)
    return differences


def summary(errors: dict[str, list[float]], differences: list[str]) -> None:
    print("\nSummary (relative error of predicted bytes vs llama-fit-params)")
    for key, values in errors.items():
        if not values:
            continue
        label = "seed formula (device total)" if key == "seed" else key
        print(f"  {label:28s} median {statistics.median(values) * 100:6.2f}%  worst {max(values) * 100:6.2f}%  "
              f"({len(values)} values)")  # fmt: skip
    print(f"  gpuLayers differs from --fit in {len(differences)} of {len(FIT_CASES)} budgets")
    for line in differences:
        print(f"    {line}")


def main() -> int:
    binaries = fit_params.bin_dir()
    if binaries is None:
        print("llama.cpp binaries missing: run hack/build-llama.sh first")
        return 1
    with fit_params.rpc_servers(binaries, 1) as endpoint:
        errors = run_cases(binaries, endpoint)
        differences = run_fit(binaries, endpoint)
    summary(errors, differences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
