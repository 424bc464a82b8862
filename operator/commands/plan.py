"""``kquant plan MANIFEST --gpu 24GiB``: the offload plan for a manifest's served variant, no cluster.

The plan comes from the operator's own planner, with the serving settings the manifest gives
(context, parallel slots, cache types, flash attention, a fixed ``gpuLayers``), read by the same
``serving.context_settings`` the operator plans with, next to what the
seed formula ``floor(VRAM / file size * (layers - 4))`` would have picked, so the difference is
visible before anything is scheduled.

With ``--hub-files FILES.json --hub-config config.json`` (the repository's listing as the hub API
gives it, and its config.json: no network needed) it also prints what the builds need, from the
quantizer's own ``sizing`` rules: the claim, the build pod's memory and CPUs, threads, the deadline.

The model's facts come from, in order: ``--gguf`` (the header of a GGUF file, read by memory map),
``--facts`` (a ``ModelFacts`` JSON or a quantizer report holding one), or the builtin shapes of a few
well-known models (``shapes``), estimated from their published ``config.json``. The output says
which one was used.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import pydantic
from kquant.operator import build_gpus, builds, serving
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import common, shapes
from kquant.operator.planner import plan
from kquant.quantizer import gguf_facts, recipes, sizing, units


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The planner's answer and the seed formula's, for one variant on one GPU configuration."""

    variant: str
    facts: gguf_facts.ModelFacts
    facts_source: str
    auto: plan.OffloadPlan
    seed: plan.OffloadPlan
    fewest: plan.OffloadPlan | None
    """The fewest GPUs of this size (up to ``plan.MAX_GPUS``) that hold everything: what the
    operator requests from a node pool of such GPUs. None with a fixed ``gpuLayers``."""
    margin: str = ""
    """Which per-GPU margin the plan used and where it came from."""


def facts_from_json(data: Any, variant: str) -> gguf_facts.ModelFacts:
    """``ModelFacts`` from a facts JSON, a variant report (``facts``) or a build report (``variants[]``)."""
    if isinstance(data, dict) and isinstance(data.get("variants"), list):
        found = [v for v in data["variants"] if isinstance(v, dict) and v.get("name") == variant]
        if not found:
            names = ", ".join(str(v.get("name")) for v in data["variants"] if isinstance(v, dict))
            raise common.CommandError(f"the report has no variant {variant!r} (it has: {names or 'none'})")
        data = found[0]
    if isinstance(data, dict) and "facts" in data:
        data = data["facts"]
    if not data:
        raise common.CommandError(f"the report of variant {variant!r} holds no facts (the build did not finish?)")
    try:
        return gguf_facts.ModelFacts.model_validate(data)
    except pydantic.ValidationError as exc:
        raise common.CommandError(f"not a ModelFacts JSON or quantizer report: {exc.errors()[0]['msg']}") from None


def load_facts(
    qm: api.QuantizedModel, variant: api.Variant, gguf: pathlib.Path | None, facts: pathlib.Path | None
) -> tuple[gguf_facts.ModelFacts, str]:
    """The variant's facts and a line that says where they came from."""
    if gguf is not None and facts is not None:
        raise common.CommandError("pass either --gguf or --facts, not both")
    if gguf is not None:
        try:
            return gguf_facts.read_facts(gguf), f"GGUF header of {gguf}"
        except (OSError, ValueError) as exc:
            raise common.CommandError(f"cannot read GGUF {gguf}: {exc}") from None
    if facts is not None:
        try:
            data = json.loads(facts.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise common.CommandError(f"cannot read JSON {facts}: {exc}") from None
        return facts_from_json(data, variant.name), f"facts in {facts}"
    try:
        found, how = shapes.estimate(qm, variant)
    except shapes.UnknownModelError as exc:
        raise common.CommandError(str(exc)) from None
    except recipes.RecipeError as exc:
        raise common.CommandError(f"{qm.ref}: the build of this variant would fail: {exc}") from None
    return found, f"estimate: {how}"


def margin_line(settings: plan.PlannerSettings) -> str:
    """The per-GPU overhead the plan reserves, term by term, and where the learned part came from."""
    parts = f"CUDA context {units.gib(settings.cuda_context_bytes)} + margin {units.gib(settings.margin_bytes)}"
    if settings.learned_margin_bytes:
        return f"per GPU: {parts} (planner defaults) + {settings.margin_note}"
    return (f"per GPU: {parts} (planner defaults); no learned margin (--margins FILE --gpu-product NAME adds "
            f"what served pods of that GPU showed)")


def load_margins(path: pathlib.Path) -> dict[str, str]:
    """The margins ConfigMap's data from a file (``kubectl get configmap ... -o yaml``)."""
    docs = common.read_documents(path)
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ConfigMap"]
    if len(found) != 1 or not isinstance(found[0].get("data") or {}, dict):
        raise common.CommandError(f"{path} holds {len(found)} ConfigMaps, but --margins needs exactly one")
    return {str(k): str(v) for k, v in (found[0].get("data") or {}).items()}


def compare(
    qm: api.QuantizedModel, variant: api.Variant, facts: gguf_facts.ModelFacts, facts_source: str,
    gpu_bytes: int, gpus: int | None = None, settings: plan.PlannerSettings | None = None,
) -> Comparison:  # fmt: skip
    """Plan ``variant`` with the planner and with the seed formula on ``gpus`` GPUs of ``gpu_bytes``."""
    spec = qm.spec.serving or api.Serving(variant=variant.name)
    settings = settings or plan.PlannerSettings()
    count = spec.gpus if gpus is None else gpus
    if count < 0:
        raise common.CommandError(f"--gpus is {count}, but it must not be negative")
    forced = spec.gpu_layers if isinstance(spec.gpu_layers, int) else None
    ctx = serving.context_settings(spec)
    memory_per_gpu = (gpu_bytes,) * count
    try:
        auto = plan.plan(plan.PlanRequest(facts, ctx, memory_per_gpu, forced, settings=settings))
        seed = plan.plan(plan.PlanRequest(facts, ctx, memory_per_gpu,
                                          settings=plan.PlannerSettings(planner=plan.PlannerKind.SEED)))
        fewest = None if forced is not None else plan.fewest_gpus(facts, ctx, gpu_bytes, plan.MAX_GPUS,
                                                                  settings)
    except ValueError as exc:
        raise common.CommandError(f"{qm.ref}: {exc}") from None
    return Comparison(variant.name, facts, facts_source, auto, seed, fewest, margin_line(settings))


def pick_variant(qm: api.QuantizedModel, name: str | None) -> api.Variant:
    """``name``, else the served variant, else the only one."""
    wanted = name or (qm.spec.serving.variant if qm.spec.serving else None)
    if wanted is None:
        if len(qm.spec.variants) == 1:
            return qm.spec.variants[0]
        names = ", ".join(v.name for v in qm.spec.variants)
        raise common.CommandError(f"{qm.ref} serves no variant; pick one with --variant ({names})")
    try:
        variant = qm.spec.variant(wanted)
    except KeyError:
        names = ", ".join(v.name for v in qm.spec.variants)
        raise common.CommandError(f"--variant is {wanted!r}, but spec.variants has only {names}") from None
    if variant.format.is_bnb:
        raise common.CommandError(
            f"variant {wanted} is format {variant.format}: llama-server serves GGUF only, so it has no offload "
            "plan (docs/fine-tuning.md says how it is loaded)"
        )
    return variant


def build_sizing(qm: api.QuantizedModel, files: pathlib.Path, config: pathlib.Path | None,
                 gpu_bytes: int | None = None) -> tuple[sizing.Sizing, build_gpus.BuildGPUs]:
    """What the builds of every variant of ``qm`` need, from a saved hub listing and config.json, and
    the build pod's GPUs: planned on nodes of up to ``plan.MAX_GPUS`` GPUs of ``gpu_bytes`` (the
    ``--gpu`` size) unless the spec sets ``spec.quantizer.gpus``."""
    try:
        listing = sizing.listing_from_json(json.loads(files.read_text(encoding="utf-8")))
        parsed = json.loads(config.read_text(encoding="utf-8")) if config is not None else None
    except (OSError, ValueError) as exc:
        raise common.CommandError(f"cannot read the hub listing: {exc}") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise common.CommandError(f"{config} is not a config.json object")
    pools = [build_gpus.Pool(None, gpu_bytes, plan.MAX_GPUS)] if gpu_bytes else []
    gpus = build_gpus.planned(qm, parsed, pools)
    chosen = sizing.select(listing, qm.spec.source.hub.allow_patterns)
    return builds.size_builds(qm, chosen, parsed, gpus=gpus.count), gpus
