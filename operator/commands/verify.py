"""``kquant plan MANIFEST --gpu SIZE --verify MODEL.gguf``: the planner beside llama.cpp's own count.

The planner predicts what llama.cpp will allocate; ``llama-fit-params`` (a tool of the llama.cpp
kquant pins) builds the model and context on this machine's devices without reading the weights
and prints what they would take per device (``--fit-print on``: device, model, context and compute
MiB). This command runs it with the plan's own arguments and prints both, per device, so a person
with a GPU can see before any rollout whether the planner is right on their card.

Both columns count as llama-fit-params does: logits for a whole ubatch. llama-server reserves one
row per slot instead, so the output device's compute buffer of a served model is smaller than
either column (``memory.ContextSettings.outputs``); the note under the table says so.

The binary comes from ``--llama-bin``, else ``KQUANT_LLAMA_BIN``, else the build cache of
``hack/build-llama.sh``, else ``PATH``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Sequence

from kquant.operator.commands import common
from kquant.operator.planner import memory, plan
from kquant.quantizer import gguf_facts

MiB = memory.MiB
TOOL = "llama-fit-params"
CACHED_BIN = pathlib.Path.home() / ".cache" / "kquant" / "llama.cpp" / "0.3.36" / "bin"
_ROW = re.compile(r"^(?P<dev>\S+) (?P<model>\d+) (?P<ctx>\d+) (?P<compute>\d+)\s*$", re.M)
_REFUSED_FLAGS = {"--kv-unified": 0}
"""Server flags llama-fit-params does not take (with the number of values each carries)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One device as both sides count it, in MiB (llama-fit-params truncates to whole MiB)."""

    device: str
    ours: memory.DeviceBytes
    theirs: tuple[int, int, int] | None
    """llama-fit-params' model, context and compute MiB; None when it printed no such device."""

    @property
    def error_ratio(self) -> float | None:
        if self.theirs is None or sum(self.theirs) == 0:
            return None
        measured = sum(self.theirs) * MiB
        return (self.ours.total - measured) / measured


@dataclasses.dataclass(frozen=True)
class Verification:
    rows: tuple[Row, ...]
    args: tuple[str, ...]
    """The llama-fit-params arguments (the plan's)."""


def find_tool(explicit: pathlib.Path | None) -> pathlib.Path:
    for folder in (explicit, os.environ.get("KQUANT_LLAMA_BIN"), CACHED_BIN):
        if folder is not None and (pathlib.Path(folder) / TOOL).is_file():
            return pathlib.Path(folder) / TOOL
    found = shutil.which(TOOL)
    if found is None:
        raise common.CommandError(
            f"--verify needs {TOOL} (llama.cpp's fit tool): pass --llama-bin DIR, set KQUANT_LLAMA_BIN, or put it "
            f"on PATH (hack/build-llama.sh builds it into {CACHED_BIN})")
    return pathlib.Path(found)


def parse_rows(stdout: str) -> dict[str, tuple[int, int, int]]:
    """``--fit-print on``'s rows (``CUDA0 1234 512 300``, ``Host ...``) by device name, in MiB."""
    return {m["dev"]: (int(m["model"]), int(m["ctx"]), int(m["compute"])) for m in _ROW.finditer(stdout)}


def fit_args(offload: plan.OffloadPlan) -> list[str]:
    """The plan's server arguments that llama-fit-params understands."""
    out: list[str] = []
    args = list(offload.server_args())
    i = 0
    while i < len(args):
        if args[i] in _REFUSED_FLAGS:
            i += 1 + _REFUSED_FLAGS[args[i]]
            continue
        out.append(args[i])
        i += 1
    return out


def prediction(facts: gguf_facts.ModelFacts, offload: plan.OffloadPlan,
               backend: memory.Backend) -> memory.MemoryBreakdown:
    """The planner's bytes for the plan's placement, counted as llama-fit-params counts: logits for a
    whole ubatch, and one KV stream per slot (it has no --kv-unified; the server does)."""
    ctx = dataclasses.replace(offload.context, outputs=None, kv_unified=offload.context.parallel == 1)
    placement = memory.Placement(offload.gpu_layers, offload.tensor_split, offload.n_cpu_moe,
                                 False if offload.pipeline_disabled else None)
    return memory.breakdown(facts, ctx, placement, backend)


def verify(tool: pathlib.Path, model: pathlib.Path, facts: gguf_facts.ModelFacts, offload: plan.OffloadPlan,
           backend: memory.Backend, rpc: Sequence[str] = ()) -> Verification:
    """Run llama-fit-params with the plan's arguments and pair its rows with the prediction."""
    args = fit_args(offload)
    cmd = [str(tool), "-m", str(model), *(["--rpc", ",".join(rpc)] if rpc else []), *args, "--fit-print", "on"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise common.CommandError(f"{' '.join(cmd)} failed: {exc}") from None
    if done.returncode != 0:
        raise common.CommandError(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()[-1500:]}")
    theirs = parse_rows(done.stdout)
    if "Host" not in theirs:
        raise common.CommandError(f"{TOOL} printed no Host row; its output was:\n{done.stdout[-1500:]}")
    ours = prediction(facts, offload, backend)
    names = [d for d in theirs if d != "Host"]
    rows = [Row(f"GPU{i} ({names[i]})" if i < len(names) else f"GPU{i} (not found)", d,
                theirs[names[i]] if i < len(names) else None) for i, d in enumerate(ours.devices)]
    rows += [Row(f"{name} (not planned)", memory.DeviceBytes(), theirs[name]) for name in names[len(ours.devices):]]
    rows.append(Row("Host", ours.host, theirs["Host"]))
    return Verification(tuple(rows), tuple(args))


def lines(result: Verification) -> list[str]:
    """The side-by-side table as text lines (MiB: llama-fit-params' unit)."""
    out = [f"{'device':<24} {'kquant model/KV/compute MiB':>30} {'llama.cpp model/KV/compute MiB':>32} {'error':>8}"]
    for row in result.rows:
        ours = f"{row.ours.model / MiB:.0f} / {row.ours.kv / MiB:.0f} / {row.ours.compute / MiB:.0f}"
        theirs = " / ".join(str(v) for v in row.theirs) if row.theirs else "-"
        err = f"{row.error_ratio:+.1%}" if row.error_ratio is not None else "-"
        out.append(f"{row.device:<24} {ours:>30} {theirs:>32} {err:>8}")
    missing = [row.device.split(" ")[0] for row in result.rows if row.theirs is None]
    if missing:
        out.append(f"llama.cpp found no device for {', '.join(missing)}: on this machine the layers planned there "
                   f"would run on the CPU")
    out.append(f"{TOOL} {' '.join(result.args)}")
    out.append("both count logits for a whole ubatch as llama-fit-params does; llama-server reserves one row "
               "per slot, so its output device needs less compute buffer than either column")
    return out
