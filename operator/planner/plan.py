"""Choose llama.cpp's offload arguments for one model on one node's GPUs, before anything is scheduled.

llama.cpp's ``--fit`` sizes ``-ngl`` at load time from the memory it finds; the operator needs the
answer earlier: which node pool and how many GPUs to request, and what to put in status. This module
answers it from ``memory``'s model: the largest ``-ngl`` whose predicted bytes fit every GPU's budget
(memory minus CUDA context minus a margin), a ``-ts`` that hands each GPU a contiguous run of
layers sized to its budget, and, for MoE models, ``--n-cpu-moe`` when keeping attention and KV on the
GPU and only some experts in host memory reads fewer bytes from host memory per token than dropping
whole layers. When nothing fits, the plan says so and names the smallest GPU configuration that would.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

from kquant.operator.planner import memory, seed
from kquant.quantizer import gguf_facts, units

MiB = memory.MiB
MAX_GPUS = 8
"""The largest GPU count the does-not-fit advice considers (one node)."""
NO_PIPELINE_OVERRIDE = "^kquant-no-pipeline-parallelism$=CPU"
"""A tensor override that matches no tensor. llama.cpp has no switch for pipeline parallelism, but
turns it off whenever any override is given; the planner passes this one when the pipelined
compute buffers (4 copies of each GPU's inputs) would not fit and running without them does."""


class PlannerKind(enum.StrEnum):
    AUTO = "auto"
    """The memory model in ``memory``."""
    SEED = "seed"
    """``floor(VRAM / file size * (layers - 4))``, for comparison only."""


@dataclasses.dataclass(frozen=True)
class PlannerSettings:
    """How conservative the planner is, and what it may change."""

    planner: PlannerKind = PlannerKind.AUTO
    backend: memory.Backend = memory.Backend.CUDA
    cuda_context_bytes: int = 512 * MiB
    """Per GPU: CUDA context, cuBLAS workspace and kernels (100-560 MiB measured, more on big GPUs)."""
    margin_bytes: int = 512 * MiB
    """Per GPU: headroom for fragmentation and what the model misses."""
    learned_margin_bytes: int = 0
    """Per GPU: the largest excess over the prediction that served pods of this GPU product showed
    (``margins``); added to the margin."""
    margin_note: str = ""
    """Where the learned margin came from, for the explanation (empty: none learned)."""
    reduce_context: bool = False
    """May shrink the context (halving, down to ``min_context``) to reach full offload."""
    min_context: int = 2048
    moe_on_cpu: bool = True
    """May keep MoE experts in host memory (``--n-cpu-moe``)."""
    require_full_offload: bool = False
    """Report a plan that leaves any layer on the CPU as not fitting."""

    @property
    def overhead_bytes(self) -> int:
        return self.cuda_context_bytes + self.margin_bytes + self.learned_margin_bytes


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """Everything the planner needs: the model, the serving settings and one node's GPUs."""

    facts: gguf_facts.ModelFacts
    context: memory.ContextSettings
    gpu_memory: tuple[int, ...]
    """Total memory of each GPU the pod would get, in bytes (empty: CPU only)."""
    gpu_layers: int | None = None
    """A fixed ``-ngl`` (the manifest's ``gpuLayers``), or None for auto."""
    tensor_split: tuple[float, ...] | None = None
    """A fixed ``-ts``, or None to let the planner choose."""
    host_memory: int | None = None
    """Host memory the pod may use, in bytes, if known."""
    settings: PlannerSettings = PlannerSettings()


@dataclasses.dataclass(frozen=True)
class SmallestFit:
    """The fewest GPUs (and the memory each needs) that hold the whole model at this context."""

    gpus: int
    memory_per_gpu: int

    def __str__(self) -> str:
        return f"{self.gpus} GPU(s) with at least {units.gib(self.memory_per_gpu)} each"


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """The planner's answer: llama.cpp arguments, predicted bytes and why."""

    fits: bool
    planner: PlannerKind
    gpu_layers: int
    """``-ngl`` in llama.cpp's meaning (output layer first)."""
    total_layers: int
    """``block_count + 1``: the ``-ngl`` that offloads everything."""
    context: memory.ContextSettings
    tensor_split: tuple[float, ...]
    n_cpu_moe: int
    devices: tuple[memory.DeviceBytes, ...]
    host: memory.DeviceBytes
    gpu_memory: tuple[int, ...]
    overhead_bytes: int
    """Per GPU, on top of ``devices``: CUDA context plus margin."""
    explanation: str
    smallest_fit: SmallestFit | None = None
    pipeline_parallel: bool = False
    """Whether llama.cpp will run with pipeline parallelism (several GPUs, everything offloaded)."""

    @property
    def full_offload(self) -> bool:
        return self.gpu_layers >= self.total_layers and self.n_cpu_moe == 0

    @property
    def predicted_gpu_bytes(self) -> tuple[int, ...]:
        """What each GPU should hold, CUDA context included (the margin is not)."""
        extra = self.overhead_bytes
        return tuple(d.total + extra for d in self.devices)

    def server_args(self) -> tuple[str, ...]:
        """llama-server arguments that pin llama.cpp to this plan (``--fit off``: no second guess)."""
        c = self.context
        args = [
            "--n-gpu-layers", str(self.gpu_layers),
            "--ctx-size", str(c.context),
            "--parallel", str(c.parallel),
            "--cache-type-k", str(c.cache_type_k),
            "--cache-type-v", str(c.cache_type_v),
            "--flash-attn", "on" if c.flash_attention else "off",
            "--ubatch-size", str(c.ubatch),
            "--fit", "off",
        ]  # fmt: skip
        if c.kv_unified:
            args.append("--kv-unified")
        if c.swa_full:
            args.append("--swa-full")
        if len(self.tensor_split) > 1:
            args += ["--tensor-split", ",".join(_fmt_share(s) for s in self.tensor_split)]
        if self.n_cpu_moe:
            args += ["--n-cpu-moe", str(self.n_cpu_moe)]
        if self.pipeline_disabled:
            args += ["--override-tensor", NO_PIPELINE_OVERRIDE]
        return tuple(args)

    @property
    def pipeline_disabled(self) -> bool:
        """Several GPUs hold everything, yet the plan runs without pipeline parallelism."""
        return len(self.gpu_memory) > 1 and self.full_offload and not self.pipeline_parallel


def plan(request: PlanRequest) -> OffloadPlan:
    """The offload plan for ``request`` (pure: no I/O)."""
    facts = request.facts
    _check_request(request)
    if request.settings.planner is PlannerKind.SEED:
        return _seed_plan(request)
    contexts = [request.context]
    if request.settings.reduce_context and request.gpu_layers is None:
        contexts += list(_smaller_contexts(request.context, request.settings.min_context))
    first: OffloadPlan | None = None
    for ctx in contexts:
        candidate = _plan_at(dataclasses.replace(request, context=ctx))
        first = first or candidate
        if candidate.full_offload and candidate.fits:
            if ctx is not request.context:
                candidate = dataclasses.replace(
                    candidate,
                    explanation=(
                        f"context reduced from {request.context.context} to {ctx.context} for full "
                        f"offload; " + candidate.explanation
                    ),
                )
            return candidate
    assert first is not None
    if not first.full_offload:
        size = min(request.gpu_memory) if request.gpu_memory else None
        smallest = smallest_fit(facts, request.context, request.settings, size)
        first = dataclasses.replace(
            first, smallest_fit=smallest, explanation=f"{first.explanation}; full offload needs {smallest}"
        )
    return first


def fewest_gpus(
    facts: gguf_facts.ModelFacts,
    context: memory.ContextSettings,
    gpu_memory: int,
    available: int,
    settings: PlannerSettings = PlannerSettings(),
    gpu_layers: int | None = None,
) -> OffloadPlan:
    """The plan with the fewest GPUs of ``gpu_memory`` bytes (up to ``available``) that holds everything.

    This is the operator's question per node pool: how many ``nvidia.com/gpu`` to request. When
    even ``available`` GPUs cannot hold the whole model, the answer is the plan on all of them
    (partial offload, or does-not-fit with the smallest configuration named).
    """
    if available < 0:
        raise ValueError(f"available GPUs is {available}, but it must not be negative")
    last: OffloadPlan | None = None
    for n in range(1, available + 1):
        last = plan(PlanRequest(facts, context, (gpu_memory,) * n, gpu_layers, settings=settings))
        if last.fits and last.full_offload:
            return last
    if last is None:
        last = plan(PlanRequest(facts, context, (), gpu_layers, settings=settings))
    return last


def plan_to_dict(p: OffloadPlan) -> dict[str, object]:
    """The plan as plain JSON types (camelCase keys, as status and ``--dry-run --json`` show it)."""
    return {
        "fits": p.fits,
        "planner": str(p.planner),
        "gpuLayers": p.gpu_layers,
        "totalLayers": p.total_layers,
        "fullOffload": p.full_offload,
        "context": p.context.context,
        "gpus": len(p.gpu_memory),
        "tensorSplit": list(p.tensor_split),
        "nCpuMoe": p.n_cpu_moe,
        "pipelineParallel": p.pipeline_parallel,
        "devices": [{"model": d.model, "kv": d.kv, "compute": d.compute} for d in p.devices],
        "host": {"model": p.host.model, "kv": p.host.kv, "compute": p.host.compute},
        "predictedGPUBytes": list(p.predicted_gpu_bytes),
        "nodeGPUBytes": list(p.gpu_memory),
        "smallestFit": None if p.smallest_fit is None else str(p.smallest_fit),
        "args": list(p.server_args()),
        "explanation": p.explanation,
    }


def _check_request(request: PlanRequest) -> None:
    n_total = request.facts.block_count + 1
    if request.gpu_layers is not None and not 0 <= request.gpu_layers <= n_total:
        raise ValueError(
            f"gpuLayers is {request.gpu_layers}, but the model has {n_total} layers "
            f"({request.facts.block_count} blocks and the output layer)"
        )
    if any(m < 0 for m in request.gpu_memory):
        raise ValueError(f"GPU memory is {list(request.gpu_memory)}, but it must not be negative")
    if request.tensor_split is not None and len(request.tensor_split) != len(request.gpu_memory):
        raise ValueError(
            f"tensorSplit has {len(request.tensor_split)} entries, but the pod gets "
            f"{len(request.gpu_memory)} GPU(s)"
        )


def _smaller_contexts(ctx: memory.ContextSettings, minimum: int) -> list[memory.ContextSettings]:
    out = []
    n = ctx.context
    while n // 2 >= minimum:
        n = memory.pad(n // 2, 256)
        out.append(dataclasses.replace(ctx, context=n))
    return out


def _budgets(request: PlanRequest) -> tuple[int, ...]:
    over = request.settings.overhead_bytes
    return tuple(max(m - over, 0) for m in request.gpu_memory)


def _fits(bd: memory.MemoryBreakdown, budgets: Sequence[int], host_memory: int | None) -> bool:
    if any(d.total > b for d, b in zip(bd.devices, budgets, strict=True)):
        return False
    return host_memory is None or bd.host.total <= host_memory


def _host_read_per_token(facts: gguf_facts.ModelFacts, bd: memory.MemoryBreakdown, n_cpu_moe: int) -> float:
    """Bytes of weights read from host memory per generated token: what makes partial offload slow.

    A MoE layer reads only ``expert_used / expert_count`` of its experts per token, so moving experts
    to the CPU costs less than moving the same bytes of attention and dense weights.
    """
    n_layer = facts.block_count
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 1.0
    total = 0.0
    for il in range(n_layer):
        experts = facts.layer_expert_bytes[il]
        if bd.layer_device[il] == memory.CPU:
            total += facts.layer_bytes[il] - experts + experts * share
        elif il < n_cpu_moe:
            total += experts * share
    if bd.layer_device[n_layer] == memory.CPU:
        total += facts.output_bytes
    return total


def _plan_at(request: PlanRequest) -> OffloadPlan:
    facts = request.facts
    settings = request.settings
    budgets = _budgets(request)
    n_gpu = len(request.gpu_memory)
    n_total = facts.block_count + 1
    if n_gpu == 0:
        return _make_plan(request, memory.Placement(0, (1.0,)), fits=not settings.require_full_offload,
                          why="no GPU: everything runs on the CPU")  # fmt: skip
    if request.gpu_layers is not None:
        found = _try(request, request.gpu_layers, 0, budgets)
        placement = found[0] if found else _placement(request, request.gpu_layers, 0, budgets)
        ok = found is not None
        if settings.require_full_offload and request.gpu_layers < n_total:
            ok = False
        return _make_plan(request, placement, fits=ok, why=f"gpuLayers {request.gpu_layers} was asked for")

    options = _candidates(request, budgets)
    if not options:
        placement = memory.Placement(0, _even_split(n_gpu))
        return _make_plan(request, placement, fits=False,
                          why="not even the output layer fits the GPU budget")  # fmt: skip
    options.sort(key=lambda o: (o[0], o[1].n_cpu_moe))
    cost, placement = options[0]
    full = placement.gpu_layers == n_total and placement.n_cpu_moe == 0
    if full:
        why = "everything fits"
    elif placement.n_cpu_moe:
        why = (
            f"experts of the first {placement.n_cpu_moe} blocks stay in host memory: "
            f"{units.gib(int(cost))} of weights read from host per token"
        )
        others = [o for o in options if not o[1].n_cpu_moe]
        if others:
            why += f", vs {units.gib(int(others[0][0]))} when dropping whole layers"
    else:
        why = f"the output layer and the last {placement.gpu_layers - 1} blocks fit"
    ok = full or not settings.require_full_offload
    return _make_plan(request, placement, fits=ok, why=why)


def _candidates(request: PlanRequest, budgets: Sequence[int]) -> list[tuple[float, memory.Placement]]:
    """The best placement of each kind that fits, with its host bytes read per token.

    Dense: the largest ``-ngl``. MoE: everything on the GPU with the fewest ``--n-cpu-moe`` blocks.
    """
    facts = request.facts
    settings = request.settings
    n_total = facts.block_count + 1
    options: list[tuple[float, memory.Placement]] = []
    for ngl in range(n_total, 0, -1):
        found = _try(request, ngl, 0, budgets)
        if found:
            options.append((_host_read_per_token(facts, found[1], 0), found[0]))
            break
    if facts.is_moe and settings.moe_on_cpu and not (options and options[0][1].gpu_layers == n_total):
        for k in range(1, facts.block_count + 1):
            found = _try(request, n_total, k, budgets)
            if found:
                options.append((_host_read_per_token(facts, found[1], k), found[0]))
                break
    return options


def _try(
    request: PlanRequest, ngl: int, n_cpu_moe: int, budgets: Sequence[int]
) -> tuple[memory.Placement, memory.MemoryBreakdown] | None:
    """A placement for ``ngl`` / ``n_cpu_moe`` that fits, or None.

    On several GPUs with everything offloaded llama.cpp turns on pipeline parallelism (4 copies of
    every GPU's inputs). When those buffers do not fit but the plain ones do, the plan turns it off
    (``NO_PIPELINE_OVERRIDE``) rather than giving up a layer, and records that. Several GPUs get
    a split proportional to their room first (every GPU works and keeps headroom), and the
    back-filled split when that does not fit.
    """
    multi_full = len(budgets) > 1 and ngl > request.facts.block_count and n_cpu_moe == 0
    for pipelined in (None, False) if multi_full else (None,):
        for placement in _placements(request, ngl, n_cpu_moe, budgets, pipelined):
            bd = memory.breakdown(request.facts, request.context, placement, request.settings.backend)
            if _fits(bd, budgets, request.host_memory):
                return placement, bd
    return None


def _even_split(n: int) -> tuple[float, ...]:
    return tuple(1.0 for _ in range(n))


def _placements(
    request: PlanRequest, ngl: int, n_cpu_moe: int, budgets: Sequence[int], pipelined: bool | None = None
) -> list[memory.Placement]:
    """Candidate placements for ``ngl`` layers, best first."""
    if ngl == 0:  # nothing on any GPU: the split is moot, but it must still be a valid one
        return [memory.Placement(0, (1.0,) * len(budgets), n_cpu_moe, pipelined)]
    if request.tensor_split is not None:
        return [memory.Placement(ngl, request.tensor_split, n_cpu_moe, pipelined)]
    if len(budgets) == 1:
        return [memory.Placement(ngl, (1.0,), n_cpu_moe, pipelined)]
    out = []
    for counts in (
        _proportional_counts(request, ngl, n_cpu_moe, budgets, pipelined is not False),
        _greedy_counts(request, ngl, n_cpu_moe, budgets, pipelined is not False),
    ):
        placement = memory.Placement(ngl, tuple(float(c) for c in counts), n_cpu_moe, pipelined)
        if placement not in out:
            out.append(placement)
    return out


def _placement(
    request: PlanRequest, ngl: int, n_cpu_moe: int, budgets: Sequence[int], pipelined: bool | None = None
) -> memory.Placement:
    """The first candidate placement (for a plan that is reported even though it does not fit)."""
    return _placements(request, ngl, n_cpu_moe, budgets, pipelined)[0]


def _layer_costs(request: PlanRequest, ngl: int, n_cpu_moe: int) -> list[int]:
    """Weights and KV of each offloaded layer in llama.cpp's order (the output layer last)."""
    facts = request.facts
    n_layer = facts.block_count
    costs = []
    for il in range(max(n_layer + 1 - ngl, 0), n_layer + 1):
        if il == n_layer:
            costs.append(facts.output_device_bytes)
            continue
        experts = facts.layer_expert_bytes[il] if il < n_cpu_moe else 0
        costs.append(facts.layer_bytes[il] - experts + memory.kv_layer_bytes(facts, request.context, il))
    return costs


def _reserves(request: PlanRequest, ngl: int, n_cpu_moe: int, n_gpu: int, allow_pipeline: bool) -> list[int]:
    """Compute buffer to keep free on each GPU, with the largest block anywhere (a safe bound)."""
    facts = request.facts
    pipelined = allow_pipeline and ngl > facts.block_count and n_cpu_moe == 0  # llama.cpp's rule
    every = range(facts.block_count)

    def reserve_for(first: bool, has_output: bool) -> int:
        return memory.device_compute(
            facts, request.context, every, has_output=has_output, first=first, pipelined=pipelined
        )

    return [reserve_for(d == 0, False) for d in range(n_gpu - 1)] + [reserve_for(n_gpu == 1, True)]


def _proportional_counts(
    request: PlanRequest, ngl: int, n_cpu_moe: int, budgets: Sequence[int], allow_pipeline: bool
) -> list[int]:
    """Layers per GPU so that each GPU's weights and KV are proportional to the room it has."""
    costs = _layer_costs(request, ngl, n_cpu_moe)
    reserves = _reserves(request, ngl, n_cpu_moe, len(budgets), allow_pipeline)
    room = [max(b - r, 0) for b, r in zip(budgets, reserves, strict=True)]
    total_room = sum(room) or 1
    total_cost = sum(costs)
    counts = [0] * len(budgets)
    d = 0
    bound = total_cost * room[0] / total_room
    running = 0
    for i, cost in enumerate(costs):
        last_layers = i == len(costs) - 1
        # move on once this GPU's share is used up (by more than half a layer)
        while d < len(budgets) - 1 and running + cost / 2 > bound and not last_layers:
            d += 1
            bound += total_cost * room[d] / total_room
        if last_layers:
            d = len(budgets) - 1
        counts[d] += 1
        running += cost
    return counts


def _greedy_counts(
    request: PlanRequest, ngl: int, n_cpu_moe: int, budgets: Sequence[int], allow_pipeline: bool
) -> list[int]:
    """Layers per GPU: fill the last GPU first (it gets the output layer), then the one before it.

    llama.cpp assigns the offloaded range (last blocks, then the output layer) to GPUs in order
    by cumulative ``-ts`` proportions, so integer counts as ``-ts`` give exactly this assignment.
    Each GPU keeps room for its compute buffer. Layers that fit nowhere land on the first GPU,
    and the caller's check of the full breakdown rejects that ``ngl``.
    """
    n_gpu = len(budgets)
    costs = _layer_costs(request, ngl, n_cpu_moe)
    reserve = _reserves(request, ngl, n_cpu_moe, n_gpu, allow_pipeline)
    counts = [0] * n_gpu
    used = [0] * n_gpu
    d = n_gpu - 1
    for i, cost in enumerate(reversed(costs)):
        while d > 0 and used[d] + cost + reserve[d] > budgets[d] and i > 0:
            d -= 1
        counts[d] += 1
        used[d] += cost
    return counts


def _make_plan(request: PlanRequest, placement: memory.Placement, *, fits: bool, why: str) -> OffloadPlan:
    facts = request.facts
    settings = request.settings
    bd = memory.breakdown(facts, request.context, placement, settings.backend)
    plan_ = OffloadPlan(
        fits=fits,
        planner=settings.planner,
        gpu_layers=placement.gpu_layers,
        total_layers=facts.block_count + 1,
        context=request.context,
        tensor_split=placement.tensor_split,
        n_cpu_moe=placement.n_cpu_moe,
        devices=bd.devices if request.gpu_memory else (),
        host=bd.host,
        gpu_memory=request.gpu_memory,
        overhead_bytes=settings.overhead_bytes,
        explanation="",
        pipeline_parallel=bd.pipelined,
    )
    note = f"; {settings.margin_note}" if settings.margin_note else ""
    return dataclasses.replace(plan_, explanation=explain(plan_, why) + note)


def explain(p: OffloadPlan, why: str) -> str:
    """One line for status and logs: what goes where, and the bytes per device."""
    n_layer = p.total_layers - 1
    if p.gpu_layers >= p.total_layers:
        where = f"all {n_layer} blocks and the output layer on {len(p.gpu_memory)} GPU(s)"
    elif p.gpu_layers == 0:
        where = "nothing on the GPU"
    else:
        where = f"the output layer and the last {p.gpu_layers - 1} of {n_layer} blocks on {len(p.gpu_memory)} GPU(s)"
    parts = [f"{'fits' if p.fits else 'does not fit'}: -ngl {p.gpu_layers} puts {where} ({why})"]
    if len(p.gpu_memory) > 1 and p.full_offload:
        parts.append(
            "pipeline parallelism on (4 copies of each GPU's inputs)"
            if p.pipeline_parallel
            else "pipeline parallelism off (its 4 copies of each GPU's inputs do not fit): a no-op --override-tensor"
        )
    for i, (d, m) in enumerate(zip(p.devices, p.gpu_memory, strict=True)):
        parts.append(
            f"GPU{i}: weights {units.gib(d.model)} + KV {units.gib(d.kv)} + compute {units.gib(d.compute)} "
            f"+ CUDA context and margin {units.gib(p.overhead_bytes)} = {units.gib(d.total + p.overhead_bytes)} "
            f"of {units.gib(m)}"
        )
    host = p.host
    parts.append(f"host: weights {units.gib(host.model)} + KV {units.gib(host.kv)} + compute {units.gib(host.compute)}")
    return "; ".join(parts)


def smallest_fit(
    facts: gguf_facts.ModelFacts,
    ctx: memory.ContextSettings,
    settings: PlannerSettings,
    gpu_memory: int | None = None,
) -> SmallestFit:
    """The smallest GPU configuration that holds the whole model at ``ctx``.

    With ``gpu_memory`` (the size of the GPUs a node pool has): the fewest such GPUs, up to
    ``MAX_GPUS``. Without it, or when even ``MAX_GPUS`` of them are too small: one GPU and the
    memory it would need.
    """
    if gpu_memory is not None:
        for n in range(1, MAX_GPUS + 1):
            need = _need_per_gpu(facts, ctx, settings, n)
            if need <= gpu_memory:
                return SmallestFit(n, need)
    return SmallestFit(1, _need_per_gpu(facts, ctx, settings, 1))


def _need_per_gpu(
    facts: gguf_facts.ModelFacts, ctx: memory.ContextSettings, settings: PlannerSettings, n: int
) -> int:
    placement = memory.Placement(facts.block_count + 1, _balanced_split(facts, ctx, n))
    bd = memory.breakdown(facts, ctx, placement, settings.backend)
    return max(d.total for d in bd.devices) + settings.overhead_bytes


def _balanced_split(facts: gguf_facts.ModelFacts, ctx: memory.ContextSettings, n: int) -> tuple[float, ...]:
    """Layer counts per GPU that even out weights and KV, with the output layer on the last GPU."""
    if n == 1:
        return (1.0,)
    n_layer = facts.block_count
    sizes = [facts.layer_bytes[il] + memory.kv_layer_bytes(facts, ctx, il) for il in range(n_layer)]
    sizes.append(facts.output_device_bytes)
    target = sum(sizes) / n
    counts = [0] * n
    d = 0
    used = 0.0
    for i, s in enumerate(sizes):
        if d < n - 1 and used + s / 2 > target and counts[d] > 0 and i < len(sizes) - 1:
            d += 1
            used = 0.0
        counts[d] += 1
        used += s
    return tuple(float(c) for c in counts)


def _seed_plan(request: PlanRequest) -> OffloadPlan:
    facts = request.facts
    vram = sum(request.gpu_memory)
    ngl = seed.seed_gpu_layers(vram, facts.file_bytes, facts.block_count) if request.gpu_memory else 0
    n_gpu = max(len(request.gpu_memory), 1)
    split = request.tensor_split or tuple(float(m) for m in request.gpu_memory) or (1.0,)
    placement = memory.Placement(ngl, split)
    if len(placement.tensor_split) != n_gpu or sum(placement.tensor_split) <= 0:
        placement = memory.Placement(ngl, _even_split(n_gpu))
    bd = memory.breakdown(facts, request.context, placement, request.settings.backend)
    ok = bool(request.gpu_memory) and _fits(bd, _budgets(request), request.host_memory)
    why = f"seed formula floor({units.gib(vram)} / {units.gib(facts.file_bytes)} * ({facts.block_count} - 4))"
    return _make_plan(request, placement, fits=ok, why=why)


def _fmt_share(s: float) -> str:
    return str(int(s)) if math.isclose(s, round(s)) else f"{s:.3f}"
