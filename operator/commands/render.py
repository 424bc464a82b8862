"""Rich renderings of plans and statuses. Pure: renderables in, nothing printed here."""

from __future__ import annotations

from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import common
from kquant.operator.commands import plan as plan_cmd
from kquant.operator.planner import plan
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gate(passed: bool | None) -> Text:
    if passed is None:
        return Text("-", style="dim")
    return Text("passed", style="green") if passed else Text("failed", style="red")


def variants_table(qm: api.QuantizedModel) -> Table:
    """One row per declared variant: what was built and how it measured; ``*`` marks the served one."""
    status = qm.status or api.QuantizedModelStatus()
    built = {v.name: v for v in status.variants or ()}
    served = (status.serving.variant if status.serving else None)
    wanted = qm.spec.serving.variant if qm.spec.serving else None
    table = Table(title=f"QuantizedModel {qm.ref}", box=box.SIMPLE_HEAVY)
    for column in ("variant", "type", "size", "bits/weight", "KL", "perplexity", "gate", "served"):
        table.add_column(column, justify="right" if column in ("size", "bits/weight", "KL", "perplexity") else "left")
    for spec_variant in qm.spec.variants:
        v = built.get(spec_variant.name, api.VariantStatus(name=spec_variant.name))
        mark = "* serving" if v.name == served else ("promoted" if v.name == wanted else "")
        table.add_row(
            v.name, v.type or (spec_variant.type.value if spec_variant.type else "-"),
            common.size(v.size_bytes), _num(v.bits_per_weight, 2), _num(v.kl_divergence),
            _num(v.perplexity, 2), _gate(v.gate_passed), mark,
        )  # fmt: skip
    return table


def conditions_table(status: api.QuantizedModelStatus) -> Table:
    table = Table(box=box.SIMPLE, title="conditions")
    for column in ("type", "status", "reason", "message"):
        table.add_column(column)
    for c in status.conditions or ():
        style = "green" if c.status is api.ConditionStatus.TRUE else "yellow"
        table.add_row(c.type, Text(c.status.value, style=style), c.reason, c.message[:200])
    return table


def serving_lines(status: api.QuantizedModelStatus) -> Text:
    s = status.serving
    if s is None:
        return Text("serving: nothing yet", style="dim")
    layers = "-" if s.gpu_layers is None else f"{s.gpu_layers}/{s.total_layers or '?'}"
    ready = "-" if s.ready_replicas is None else str(s.ready_replicas)
    lines = [f"serving: {s.variant or '-'}  gpuLayers {layers}  predicted GPU {common.gib(s.predicted_gpu_bytes)}"
             f" of {common.gib(s.node_gpu_bytes)}  ready replicas {ready}",
             f"endpoint: {s.endpoint or '-'}"]  # fmt: skip
    if s.explanation:
        lines.append("plan: " + s.explanation.replace("; ", "\n  "))
    return Text("\n".join(lines))


def status_view(qm: api.QuantizedModel) -> RenderableType:
    """Everything ``kquant status`` prints."""
    status = qm.status or api.QuantizedModelStatus()
    observed = status.observed_generation
    stale = observed is not None and qm.metadata.generation is not None and observed < qm.metadata.generation
    head = Text(f"phase: {status.phase.value if status.phase else 'Pending (no status yet)'}")
    head.append(f"   progress: {status.progress or '-'}")
    if stale:
        head.append(f"   (status is of generation {observed}, spec is at {qm.metadata.generation})", style="yellow")
    return Group(variants_table(qm), head, serving_lines(status), conditions_table(status))


def _plan_row(table: Table, name: str, p: plan.OffloadPlan) -> None:
    per_gpu = ", ".join(common.gib(b) for b in p.predicted_gpu_bytes) or "-"
    table.add_row(
        name, Text("yes" if p.fits else "no", style="green" if p.fits else "red"),
        f"{p.gpu_layers}/{p.total_layers}", str(p.n_cpu_moe or "-"), per_gpu,
        ", ".join(common.gib(m) for m in p.gpu_memory) or "-",
    )  # fmt: skip


def plan_view(c: plan_cmd.Comparison) -> RenderableType:
    """The planner's plan beside the seed formula's, with the planner's explanation and arguments."""
    f = c.facts
    head = Text(
        f"variant {c.variant}: {f.name or f.architecture} ({f.architecture}, {f.block_count} blocks, "
        f"{'MLA, ' if f.is_mla else ''}{f'{f.expert_count} experts, ' if f.expert_count else ''}"
        f"{common.gib(f.file_bytes)} file)\nfacts: {c.facts_source}\ncontext {c.auto.context.context}, "
        f"K cache {c.auto.context.cache_type_k}, V cache {c.auto.context.cache_type_v}, "
        f"parallel {c.auto.context.parallel}"
    )
    table = Table(box=box.SIMPLE_HEAVY)
    for column in ("planner", "fits", "-ngl", "--n-cpu-moe", "predicted per GPU", "GPU memory"):
        table.add_column(column)
    _plan_row(table, "kquant", c.auto)
    _plan_row(table, "seed formula", c.seed)
    why = Text("kquant: " + c.auto.explanation.replace("; ", "\n  "))
    seed = Text("seed:   " + c.seed.explanation.replace("; ", "\n  "), style="dim")
    args = Text("llama-server " + " ".join(c.auto.server_args()), style="bold")
    margin = Text(f"margin {c.margin}" if c.margin else "")
    return Group(head, table, why, seed, args, fewest_line(c.fewest), margin)


def fewest_line(p: plan.OffloadPlan | None) -> Text:
    """What the operator would request from a pool of GPUs of this size."""
    if p is None:
        return Text("spec.serving.gpuLayers is fixed: the GPU count is spec.serving.gpus", style="dim")
    size = common.gib(p.gpu_memory[0]) if p.gpu_memory else "-"
    if p.fits and p.full_offload:
        return Text(f"a pool of {size} GPUs: request {len(p.gpu_memory)} GPU(s) for full offload")
    return Text(f"a pool of {size} GPUs: even {len(p.gpu_memory)} do not hold everything", style="yellow")
