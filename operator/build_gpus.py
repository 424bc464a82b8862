"""How many GPUs, and of which product, a model's build pod asks for. Pure code.

Calibration (``llama-imatrix`` on the 16-bit GGUF) and evaluation (the reference, then each
variant, memory-mapped with ``gpuLayers`` fitted to the free GPU memory) are the build's inference
work; both run fastest with the whole reference model on GPUs (the 16-bit GGUF, or its Q8_0 copy
with ``spec.evaluation.reference: Q8_0``). The question is the one the operator asks for
llama-server, so the same planner answers it (``planner.plan.fewest_gpus``), on facts estimated from
config.json before anything is downloaded: the tensors ``convert_hf_to_gguf.py`` writes
(``commands.shapes``) at the reference's type, with the evaluation's context. A node pool is
the GPUs of one product on one node (a build pod lands on one node); the answer is the pool
that holds the whole model on the fewest GPUs (then the smallest GPUs); when none can, all GPUs
of the node with the most GPU memory, for a partial offload; with no GPU node, none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import shapes
from kquant.operator.planner import memory, nodes, plan
from kquant.quantizer import constants, gguf_facts, settings, sizing
from kquant.quantizer import report as quantizer_report

ARCHITECTURES = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2"}
"""Hugging Face ``model_type`` -> llama.cpp architecture where the names differ."""


@dataclasses.dataclass(frozen=True)
class Pool:
    """GPUs of one product on one node, as the build pod could request them."""

    product: str | None
    gpu_bytes: int
    count: int


@dataclasses.dataclass(frozen=True)
class BuildGPUs:
    """The build pod's GPUs: how many, which product, and why."""

    count: int
    product: str | None = None
    gpu_bytes: int | None = None
    full_offload: bool = False
    reference_bytes: int = 0
    """The reference model's weights: what has to fit."""
    from_spec: bool = False
    """``spec.quantizer.gpus`` set the count; nothing was planned."""

    def line(self) -> str:
        """For people (``kquant plan``)."""
        gib = 1 << 30
        if self.from_spec:
            return f"{self.count} GPU(s), as spec.quantizer.gpus says (remove it to have them planned)"
        if not self.count:
            return f"no GPU: calibration and evaluation on CPUs (reference model {self.reference_bytes / gib:.1f} GiB)"
        what = f"{self.count} x {self.product or 'GPU'} ({(self.gpu_bytes or 0) / gib:.0f} GiB each)"
        how = "the whole reference model offloaded" if self.full_offload else "a partial offload (does not fit whole)"
        return f"{what} for calibration and evaluation: {how}, reference model {self.reference_bytes / gib:.1f} GiB"


def shape_of(arch: sizing.Architecture, repo: str = "") -> shapes.Shape:
    """A ``shapes.Shape`` from the config.json numbers the sizing read."""
    return shapes.Shape(
        name=repo or arch.model_type or "model", repos=(repo.lower(),) if repo else (), config_url="config.json",
        architecture=ARCHITECTURES.get(arch.model_type, arch.model_type or "llama"),
        n_layer=arch.n_layer, n_embd=arch.hidden, n_head=arch.n_head, n_head_kv=arch.n_head_kv, n_ff=arch.ffn,
        n_vocab=arch.vocab, n_ctx_train=max(4096, arch.n_layer), tied=arch.tied,
        n_expert=arch.n_expert, n_expert_used=arch.n_expert_used, n_expert_shared=arch.n_expert_shared,
        n_ff_exp=arch.moe_ffn, n_dense_lead=arch.n_dense_lead, q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank, qk_rope=arch.qk_rope, qk_nope=arch.qk_nope, v_head=arch.v_head,
    )  # fmt: skip


def reference_facts(arch: sizing.Architecture, reference: settings.ReferenceType) -> gguf_facts.ModelFacts:
    """The reference model as the planner sees it: matrices at its type, vectors as float32."""
    shape = shape_of(arch)
    matrix = constants.TensorType.Q8_0 if reference is settings.ReferenceType.Q8_0 else constants.TensorType.F16
    types = {t.name: (constants.TensorType.F32 if len(t.shape) == 1 else matrix) for t in shapes.tensors(shape)}
    return shapes.facts(shape, types)


def pools(node_list: Iterable[Mapping[str, Any]], selector: Mapping[str, str] | None = None) -> list[Pool]:
    """Whole-GPU pools of the nodes (MIG slices are too small for a build), by allocatable GPUs:
    a build can wait for busy GPUs, not for GPUs a node does not have."""
    found = []
    for node in node_list:
        labels = (node.get("metadata") or {}).get("labels") or {}
        if selector and any(labels.get(k) != v for k, v in selector.items()):
            continue
        for pool in nodes.node_gpus(node, ()).pools:
            if pool.resource == nodes.GPU_RESOURCE and pool.memory_bytes and pool.allocatable:
                found.append(Pool(pool.product, pool.memory_bytes, pool.allocatable))
    return found


def choose(facts: gguf_facts.ModelFacts, context_size: int, candidates: Sequence[Pool]) -> BuildGPUs:
    """The pool that holds ``facts`` whole on the fewest GPUs (then the smallest), else the node
    with the most GPU memory for a partial offload; none without GPU pools."""
    reference = facts.total_bytes
    if not candidates:
        return BuildGPUs(0, reference_bytes=reference)
    ctx = memory.ContextSettings(context=context_size, parallel=1, ubatch=min(512, context_size))
    whole: list[BuildGPUs] = []
    for pool in candidates:
        found = plan.fewest_gpus(facts, ctx, pool.gpu_bytes, pool.count)
        if found.fits and found.full_offload:
            whole.append(BuildGPUs(len(found.gpu_memory), pool.product, pool.gpu_bytes, True, reference))
    if whole:
        return min(whole, key=lambda g: (g.count, g.gpu_bytes or 0))
    largest = max(candidates, key=lambda p: (p.count * p.gpu_bytes, -p.count))
    return BuildGPUs(largest.count, largest.product, largest.gpu_bytes, False, reference)


def for_build(arch: sizing.Architecture | None, evaluation: settings.Evaluation,
              candidates: Sequence[Pool]) -> BuildGPUs:
    """The build pod's GPUs for a model of ``arch`` (None: a GGUF source or an unread config: none)."""
    if arch is None:
        return BuildGPUs(0)
    return choose(reference_facts(arch, evaluation.reference), evaluation.context_size, candidates)


def user_set(qm: api.QuantizedModel) -> bool:
    """Whether the spec names the build's GPU count (``spec.quantizer.gpus``): then it is kept."""
    return qm.spec.quantizer is not None and "gpus" in qm.spec.quantizer.model_fields_set


def architecture(config: Mapping[str, Any] | None) -> sizing.Architecture | None:
    if config is None:
        return None
    try:
        return sizing.Architecture.from_config(config)
    except (KeyError, TypeError, ValueError):
        return None


def size_from_listing(qm: api.QuantizedModel, listing: quantizer_report.SourceListing,
                      node_list: Iterable[Mapping[str, Any]] = ()) -> tuple[sizing.Sizing, BuildGPUs]:
    """The builds' sizing from the sizing Job's listing, with the build pod's GPUs planned on the
    cluster's nodes (those ``spec.quantizer.nodeSelector`` admits) unless the spec sets them."""
    files = [sizing.HubFile(f.name, f.size_bytes) for f in listing.files]
    quantizer = qm.spec.quantizer or api.Quantizer()
    gpus = planned(qm, listing.config, pools(node_list, quantizer.node_selector))
    return builds.size_builds(qm, files, listing.config, gpus=gpus.count), gpus


def planned(qm: api.QuantizedModel, config: Mapping[str, Any] | None, candidates: Sequence[Pool]) -> BuildGPUs:
    """The build pod's GPUs for ``qm`` on ``candidates``: the spec's count when it sets one."""
    if user_set(qm):
        return BuildGPUs((qm.spec.quantizer or api.Quantizer()).gpus, from_spec=True)
    evaluation = builds.base_spec(qm, qm.spec.variants[0]).evaluation
    return for_build(architecture(config), evaluation, candidates)
