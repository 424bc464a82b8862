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
from fixtures import gguf_models

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
    "mla": gguf_models.Shape(arch="deepseek2", n_layer=8, n_embd=1024, n_head=16, n_ff=2816, n_vocab=32000,
                             n_expert=8, n_expert_used=2, n_ff_exp=512, name="bench-mla"),
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
    split: tuple[int, ...] = ()
    """``-ts`` over two RPC devices; empty for one device."""

    @property
    def devices(self) -> int:
        return max(len(self.split), 1)

    def settings(self) -> memory.ContextSettings:
        return memory.ContextSettings(self.context, self.cache, self.cache, parallel=self.parallel,
                                      kv_unified=False, flash_attention=self.flash)  # fmt: skip

    def args(self) -> list[str]:
        out = ["-c", str(self.context), "-ctk", str(self.cache), "-ctv", str(self.cache),
               "-fa", "on" if self.flash else "off", "-np", str(self.parallel)]  # fmt: skip
        if self.n_cpu_moe:
            out += ["--n-cpu-moe", str(self.n_cpu_moe)]
        if self.split:
            out += ["-ts", ",".join(str(x) for x in self.split)]
        return out

    def label(self) -> str:
        extra = f" cmoe{self.n_cpu_moe}" if self.n_cpu_moe else ""
        extra += f" np{self.parallel}" if self.parallel > 1 else ""
        extra += f" ts{','.join(str(x) for x in self.split)}" if self.split else ""
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
    Case("mla", 8192, ngl=9),
    Case("mla", 16384, C.Q8_0, ngl=4),
    Case("mla", 4096, flash=False, ngl=0),
    Case("dense", 8192, ngl=17, split=(1, 1)),
    Case("tied", 16384, C.Q8_0, ngl=10, split=(3, 1)),
]

FIT_CASES = [  # (model, context, cache, budget MiB per device)
    ("dense", 8192, C.F16, (200,)),
    ("dense", 8192, C.F16, (350,)),
    ("dense", 32768, C.Q8_0, (400,)),
    ("dense", 4096, C.F16, (600,)),
    ("tied", 16384, C.F16, (300,)),
    ("swa", 32768, C.F16, (300,)),
    ("moe", 8192, C.F16, (300,)),
    ("moe", 8192, C.F16, (450,)),
    ("mla", 8192, C.F16, (250,)),
    ("dense", 8192, C.F16, (200, 200)),
    ("dense", 16384, C.F16, (150, 300)),
    ("dense", 8192, C.F16, (250, 330)),
    ("dense", 8192, C.F16, (300, 340)),
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


def _collect(errors: dict[str, list[float]], key: str, pred: float, measured: float) -> None:
    e = rel(pred, measured)
    if e is not None:
        errors[key].append(e)


def run_cases(binaries: Path, endpoints: list[str]) -> dict[str, list[float]]:
    errors: dict[str, list[float]] = {k: [] for k in ("model", "kv", "compute", "host compute", "seed")}
    print("Per-device bytes, predicted vs llama-fit-params (MiB; model and KV truncated like llama.cpp)")
    print(f"{'case':46s} {'dev':4s} | {'model':>15s} {'KV':>13s} {'compute':>17s} | {'Host model':>15s} "
          f"{'KV':>13s} {'compute':>15s} | seed total vs measured")  # fmt: skip
    for case in CASES:
        path = model_path(case.model)
        facts = gguf_facts.read_facts(path)
        m = fit_params.measure(binaries, path, endpoints[: case.devices], ["-ngl", str(case.ngl), *case.args()])
        split = tuple(float(x) for x in case.split) or (1.0,)
        placement = memory.Placement(case.ngl, split, case.n_cpu_moe)
        bd = memory.breakdown(facts, case.settings(), placement, memory.Backend.RPC)
        host = bd.host
        _collect(errors, "model", host.model // MiB, m.host.model)
        _collect(errors, "kv", host.kv // MiB, m.host.context)
        _collect(errors, "host compute", host.compute / MiB, m.host_compute_bytes / MiB)
        measured_total = sum(d.model + d.context for d in m.devices) + sum(m.compute_bytes) / MiB
        seed_total = seed_bytes(facts, case.ngl) / MiB
        _collect(errors, "seed", seed_total, measured_total)
        for i, dev in enumerate(bd.devices):
            got = m.devices[i]
            _collect(errors, "model", dev.model // MiB, got.model)
            _collect(errors, "kv", dev.kv // MiB, got.context)
            _collect(errors, "compute", dev.compute / MiB, m.compute_bytes[i] / MiB)
            line = (f"{case.label() if i == 0 else '':46s} RPC{i} | {dev.model // MiB:6d} vs {got.model:<6d} "
                    f"{dev.kv // MiB:5d} vs {got.context:<5d} {dev.compute / MiB:7.2f} vs "
                    f"{m.compute_bytes[i] / MiB:<7.2f} |")  # fmt: skip
            if i == 0:
                line += (f" {host.model // MiB:6d} vs {m.host.model:<6d} {host.kv // MiB:5d} vs "
                         f"{m.host.context:<5d} {host.compute / MiB:6.2f} vs {m.host_compute_bytes / MiB:<6.2f} | "
                         f"{seed_total:7.1f} vs {measured_total:7.1f}")  # fmt: skip
            print(line)
    return errors


def run_fit(binaries: Path, endpoints: list[str]) -> list[str]:
    print("\n--fit against emulated budgets (-fitt = free - budget): planner and seed -ngl vs llama.cpp")
    differences = []
    settings = plan.PlannerSettings(backend=memory.Backend.RPC, cuda_context_bytes=0, margin_bytes=0)
    for name, ctx, cache, budgets in FIT_CASES:
        path = model_path(name)
        facts = gguf_facts.read_facts(path)
        devices = endpoints[: len(budgets)]
        args = ["-c", str(ctx), "-ctk", str(cache), "-ctv", str(cache), "-fa", "on"]
        probe = fit_params.fit(binaries, path, devices, args, [0] * len(devices))
        targets = [max(free - b, 0) for free, b in zip(probe.free_mib, budgets, strict=True)]
        result = fit_params.fit(binaries, path, devices, args, targets)
        seen = tuple(free - t for free, t in zip(result.free_mib, targets, strict=True))
        ctx_settings = memory.ContextSettings(ctx, cache, cache, kv_unified=False)
        p = plan.plan(plan.PlanRequest(facts, ctx_settings, tuple(b * MiB for b in seen), settings=settings))
        fit_ngl = result.gpu_layers if result.gpu_layers >= 0 else facts.block_count + 1
        seed_ngl = seed.seed_gpu_layers(sum(seen) * MiB, facts.file_bytes, facts.block_count)
        fit_extra = f" -ts {','.join(map(str, result.tensor_split))}" if result.tensor_split else ""
        fit_extra += f" -ot {result.overrides}" if result.overrides else ""
        ours = f" -ts {','.join(f'{x:g}' for x in p.tensor_split)}" if len(p.tensor_split) > 1 else ""
        ours += f" --n-cpu-moe {p.n_cpu_moe}" if p.n_cpu_moe else ""
        if p.pipeline_disabled:
            ours += " (-ot no-op: pipeline parallelism off)"
        budget_text = "+".join(str(b) for b in seen)
        used = _measure_plan(binaries, path, devices, args, p)
        within = all(u <= b for u, b in zip(used, seen, strict=True))
        line = (f"{name:5s} c{ctx:<5d} {cache!s:5s} budget {budget_text:>9s} MiB: fit -ngl {fit_ngl:2d}{fit_extra}"
                f" | planner -ngl {p.gpu_layers:2d}{ours}, measured {'+'.join(str(u) for u in used)} MiB "
                f"{'within' if within else 'OVER'} budget | seed -ngl {seed_ngl:2d}")  # fmt: skip
        print(line)
        if p.gpu_layers != fit_ngl or (result.overrides and not p.n_cpu_moe) or not within:
            differences.append(line)
    return differences


def _measure_plan(
    binaries: Path, path: Path, devices: list[str], args: list[str], p: plan.OffloadPlan
) -> tuple[int, ...]:
    """What llama.cpp allocates per device for the planner's own arguments (whole MiB)."""
    server = list(p.server_args())
    run = [*args, "-ngl", str(p.gpu_layers)]
    for ours, theirs in (("--tensor-split", "-ts"), ("--override-tensor", "-ot"), ("--n-cpu-moe", "--n-cpu-moe")):
        if ours in server:
            run += [theirs, server[server.index(ours) + 1]]
    m = fit_params.measure(binaries, path, devices, run)
    return tuple(d.model + d.context + -(-c // MiB) for d, c in zip(m.devices, m.compute_bytes, strict=True))


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
        if "pipeline parallelism off" in line:
            print("      why: --fit measures full offload on several GPUs with pipeline parallelism on (4 input copies)"
                  " and cannot turn it off; the planner turns it off with a no-op -ot and keeps every layer on the"
                  " GPUs; llama.cpp's own numbers for the planner's arguments stay within the budgets.")  # fmt: skip
        elif " OVER " in line:
            print("      why: the planner's prediction was below llama.cpp's allocation (see the tables above).")


def main() -> int:
    binaries = fit_params.bin_dir()
    if binaries is None:
        print("llama.cpp binaries missing: run hack/build-llama.sh first")
        return 1
    with fit_params.rpc_servers(binaries, 2) as endpoints:
        errors = run_cases(binaries, endpoints)
        differences = run_fit(binaries, endpoints)
    summary(errors, differences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
