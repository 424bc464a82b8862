"""Where to serve the promoted variant: pick a GPU pool and plan offload for it.

Pure code. The caller hands in the variant's GGUF facts (from its build report) and the cluster's
nodes and pods as plain dicts; out comes either the chosen ``Candidate`` (a node's GPU pool and
the offload plan for it, from which ``server_manifests`` renders llama-server's Deployment) or a
``NoFit`` that says why nothing can serve it, so that no pod is ever left Pending on a node that
cannot hold the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kquant.operator import findings
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import memory, nodes, plan
from kquant.quantizer import gguf_facts, units


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One GPU pool the variant could be served from, and the plan for it."""

    node: str
    pool: nodes.GPUPool
    gpus: int
    offload: plan.OffloadPlan

    @property
    def full_offload(self) -> bool:
        return self.offload.gpu_layers >= self.offload.total_layers and not self.offload.n_cpu_moe


@dataclasses.dataclass(frozen=True)
class NoFit:
    """Why no GPU pool can serve the variant: a condition reason and a message for a person."""

    reason: findings.Reason
    message: str


def context_settings(spec: api.Serving) -> memory.ContextSettings:
    """The memory-relevant llama-server settings of ``spec.serving``, as ``server_args`` passes
    them; ``kquant plan`` plans with the same ones."""
    flash = spec.flash_attention is not api.FlashAttention.OFF
    return memory.ContextSettings(context=spec.context_size, cache_type_k=spec.cache_type_k,
                                  cache_type_v=spec.cache_type_v, parallel=spec.parallel, flash_attention=flash)


def _selected(node: Mapping[str, Any], selector: Mapping[str, str] | None) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def _host_memory(node: Mapping[str, Any], serving: api.Serving) -> int | None:
    """What the server may use of the node's memory: its limit if set, else the node's allocatable."""
    allocatable = units.quantity_bytes(((node.get("status") or {}).get("allocatable") or {}).get("memory"))
    limits = serving.resources.limits if serving.resources and serving.resources.limits else {}
    limit = units.quantity_bytes(limits.get("memory"))
    known = [m for m in (allocatable, limit) if m is not None]
    return min(known) if known else None


def candidates(qm: api.QuantizedModel, facts: gguf_facts.ModelFacts, node_list: Iterable[Mapping[str, Any]],
               pods: Sequence[Mapping[str, Any]]) -> list[Candidate]:
    """Every GPU pool on a selected node with enough GPUs, with its offload plan (host memory included)."""
    serving = qm.spec.serving
    assert serving is not None
    forced = serving.gpu_layers if isinstance(serving.gpu_layers, int) else None
    found = []
    for node in node_list:
        if not _selected(node, serving.node_selector):
            continue
        for pool in nodes.node_gpus(node, pods).pools:
            if pool.memory_bytes is None or pool.allocatable < serving.gpus:
                continue
            request = plan.PlanRequest(facts=facts, context=context_settings(serving),
                                       gpu_memory=(pool.memory_bytes,) * serving.gpus, gpu_layers=forced,
                                       host_memory=_host_memory(node, serving))
            found.append(Candidate(node=node["metadata"]["name"], pool=pool, gpus=serving.gpus,
                                   offload=plan.plan(request)))
    return found


def choose(found: list[Candidate]) -> Candidate | None:
    """Prefer full offload, then the smallest GPUs that give it (leave big GPUs for big models),
    then the pool with the most free GPUs."""
    fitting = [c for c in found if c.offload.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (not c.full_offload, c.pool.memory_bytes or 0, -c.pool.free))


def no_fit(qm: api.QuantizedModel, found: list[Candidate], facts: gguf_facts.ModelFacts) -> NoFit:
    """Why ``choose`` found nothing: no selected node with GPUs of known memory, or the largest
    pool, its shortfall and what would fit."""
    serving = qm.spec.serving
    assert serving is not None
    if not found:
        where = f" matching nodeSelector {dict(serving.node_selector)}" if serving.node_selector else ""
        return NoFit(findings.Reason.NO_GPU_NODES, f"no node{where} has {serving.gpus} GPU(s) with known memory")
    best = max(found, key=lambda c: c.pool.memory_bytes or 0)
    hint = ""
    if best.offload.smallest_fit is not None:
        small = best.offload.smallest_fit
        hint = f"; it needs {small.gpus} GPU(s) of at least {units.gib(small.memory_per_gpu, 1)}"
    return NoFit(findings.Reason.DOES_NOT_FIT, f"variant {serving.variant} at context {serving.context_size} fits no "
                 f"GPU pool (largest: {best.node}, {units.gib(best.pool.memory_bytes or 0, 0)} x "
                 f"{best.gpus}){hint}: {best.offload.explanation}")


def surge_fits(candidate: Candidate | None, found: list[Candidate]) -> bool:
    """A rolling update needs room for one more pod of the same shape next to the old one."""
    if candidate is None:
        return True
    same = [c for c in found if c.pool.product == candidate.pool.product and c.offload.fits]
    return sum(c.pool.free // max(c.gpus, 1) for c in same) >= 1 if candidate.gpus else True
