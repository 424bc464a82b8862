"""Where to serve the promoted variant: pick a GPU pool and plan offload for it.

Pure code. The caller hands in the variant's GGUF facts (from its build report) and the cluster's
nodes and pods as plain dicts; out comes either the chosen ``Candidate`` (a node's GPU pool and
the offload plan for it, from which ``server_manifests`` renders llama-server's Deployment) or a
``NoFit`` that says why nothing can serve it, so that no pod is ever left Pending on a node that
cannot hold the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from kquant.operator import findings
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import margins, memory, nodes, plan
from kquant.quantizer import gguf_facts, units


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One GPU pool the variant could be served from, and the plan for it."""

    node: str
    pool: nodes.GPUPool
    gpus: int
    offload: plan.OffloadPlan
    available: int | None = None
    """GPUs of the pool this model may take: the free ones plus those its own server pods hold (a
    rollout replaces them). None: not counted (the pool's free GPUs are used)."""

    @property
    def free(self) -> int:
        """GPUs this model may take in the pool now."""
        return self.pool.free if self.available is None else self.available

    @property
    def has_room(self) -> bool:
        """The pool has the GPUs a server needs now: a pod sent to a full pool stays Pending."""
        return self.free >= self.gpus

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
    them; ``kquant plan`` plans with the same ones. llama-server reserves logits for one row per
    slot (``n_outputs_max = --parallel``), not a whole ubatch as llama-fit-params does: the output
    GPU's compute buffer is the vocabulary times the slots (measured: ``docs/memory-model.md``)."""
    flash = spec.flash_attention is not api.FlashAttention.OFF
    return memory.ContextSettings(context=spec.context_size, cache_type_k=spec.cache_type_k,
                                  cache_type_v=spec.cache_type_v, parallel=spec.parallel, flash_attention=flash,
                                  outputs=spec.parallel)


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


def planner_settings(learned: margins.Learned, product: str | None) -> plan.PlannerSettings:
    """The planner's defaults plus what served pods of ``product`` taught (``margins``)."""
    if not learned.bytes:
        return plan.PlannerSettings()
    return plan.PlannerSettings(learned_margin_bytes=learned.bytes, margin_note=learned.describe(product))


def _pod_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def candidates(qm: api.QuantizedModel, facts: gguf_facts.ModelFacts, node_list: Iterable[Mapping[str, Any]],
               pods: Sequence[Mapping[str, Any]], learned: Mapping[str, str] | None = None,
               learned_source: str = "", own: Collection[str] = ()) -> list[Candidate]:
    """Every GPU pool on a selected node with enough GPUs, with its offload plan (host memory included);
    ``learned``: the margins ConfigMap's data, each pool planned with its product's margin; ``own``:
    names of this model's server pods (in its namespace), whose GPUs it may take back."""
    serving = qm.spec.serving
    assert serving is not None
    forced = serving.gpu_layers if isinstance(serving.gpu_layers, int) else None
    mine = {(qm.metadata.namespace, name) for name in own}
    others = [p for p in pods if _pod_key(p) not in mine]
    found = []
    for node in node_list:
        if not _selected(node, serving.node_selector):
            continue
        available = {p.resource: p.free for p in nodes.node_gpus(node, others).pools}
        for pool in nodes.node_gpus(node, pods).pools:
            if pool.memory_bytes is None or pool.allocatable < serving.gpus:
                continue
            settings = planner_settings(margins.learned(learned, pool.product, learned_source), pool.product)
            request = plan.PlanRequest(facts=facts, context=context_settings(serving),
                                       gpu_memory=(pool.memory_bytes,) * serving.gpus, gpu_layers=forced,
                                       host_memory=_host_memory(node, serving), settings=settings)
            found.append(Candidate(node=node["metadata"]["name"], pool=pool, gpus=serving.gpus,
                                   offload=plan.plan(request), available=available.get(pool.resource)))
    return found


def choose(found: list[Candidate]) -> Candidate | None:
    """Among the pools with room now (``Candidate.has_room``: a server sent to a pool whose GPUs are
    all taken would stay Pending), prefer full offload, then the smallest GPUs that give it (leave
    big GPUs for big models), then the pool with the most free GPUs."""
    fitting = [c for c in found if c.offload.fits and c.has_room]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (not c.full_offload, c.pool.memory_bytes or 0, -c.free))


def no_fit(qm: api.QuantizedModel, found: list[Candidate], facts: gguf_facts.ModelFacts) -> NoFit:
    """Why ``choose`` found nothing: no selected node with GPUs of known memory; pools it fits whose
    GPUs are all taken (a wait, not a spec problem); or the largest pool, its shortfall and what would fit."""
    serving = qm.spec.serving
    assert serving is not None
    if not found:
        where = f" matching nodeSelector {dict(serving.node_selector)}" if serving.node_selector else ""
        return NoFit(findings.Reason.NO_GPU_NODES, f"no node{where} has {serving.gpus} GPU(s) with known memory")
    busy = [c for c in found if c.offload.fits]
    if busy:  # it fits, but every pool it fits is taken: waiting for a GPU to be freed, not a spec problem
        pools = ", ".join(f"{c.node} ({c.pool.product or c.pool.resource}: {c.free} of {c.pool.allocatable} free)"
                          for c in busy[:5])
        return NoFit(findings.Reason.GPUS_BUSY, f"variant {serving.variant} fits {len(busy)} GPU pool(s), but none "
                     f"has {serving.gpus} free GPU(s) now: {pools}; it is served when a GPU is freed or a node "
                     "is added")
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
