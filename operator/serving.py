"""How to serve the promoted variant: pick a GPU pool, plan offload, build llama-server's objects.

Pure code. The caller hands in the variant's GGUF facts (from its build report) and the cluster's
nodes and pods as plain dicts; out comes either a ``ServingPlan`` (Deployment, Service and the
status to record) or a ``NoFit`` that says why nothing can serve it, so that no pod is ever left
Pending on a node that cannot hold the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kquant.operator import builds, config, manifests
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
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    deployment: manifests.Manifest
    service: manifests.Manifest
    status: api.ServingStatus
    candidate: Candidate | None


HASH_ANNOTATION = "kquant.dev/serving-hash"
"""On the server Deployment: ``serving_hash`` of what it was built from; a change means a rollout."""


def deployment_name(qm: api.QuantizedModel) -> str:
    return f"{qm.metadata.name}-server"


def service_name(qm: api.QuantizedModel) -> str:
    return qm.metadata.name


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
    serving = qm.spec.serving
    assert serving is not None
    if not found:
        where = f" matching nodeSelector {dict(serving.node_selector)}" if serving.node_selector else ""
        return NoFit("NoGPUNodes", f"no node{where} has {serving.gpus} GPU(s) with known memory")
    best = max(found, key=lambda c: c.pool.memory_bytes or 0)
    hint = ""
    if best.offload.smallest_fit is not None:
        small = best.offload.smallest_fit
        hint = f"; it needs {small.gpus} GPU(s) of at least {units.gib(small.memory_per_gpu, 1)}"
    return NoFit("DoesNotFit", f"variant {serving.variant} at context {serving.context_size} fits no "
                 f"GPU pool (largest: {best.node}, {units.gib(best.pool.memory_bytes or 0, 0)} x "
                 f"{best.gpus}){hint}: {best.offload.explanation}")


def server_args(qm: api.QuantizedModel, model_path: str, offload: plan.OffloadPlan | None) -> list[str]:
    """llama-server's arguments: where and how to listen, then the plan's own arguments (which pin
    llama.cpp to exactly what was planned: ``--fit off``, unified KV, ubatch, split, experts)."""
    serving = qm.spec.serving
    assert serving is not None
    args = ["--model", model_path, "--alias", f"{qm.metadata.name}-{serving.variant}",
            "--host", "0.0.0.0", "--port", str(manifests.SERVER_PORT), "--metrics", "--no-webui"]
    if offload is not None:
        args += list(offload.server_args())
    else:  # served on CPU: nothing to plan on a GPU
        ngl = serving.gpu_layers if isinstance(serving.gpu_layers, int) else 0
        args += ["--ctx-size", str(serving.context_size), "--parallel", str(serving.parallel),
                 "--n-gpu-layers", str(ngl), "--cache-type-k", serving.cache_type_k.value,
                 "--cache-type-v", serving.cache_type_v.value, "--flash-attn", serving.flash_attention.value]
    sampling = serving.sampling or api.Sampling()
    for flag, value in (("--temp", sampling.temperature), ("--top-p", sampling.top_p),
                        ("--top-k", sampling.top_k), ("--min-p", sampling.min_p), ("--seed", sampling.seed)):
        if value is not None:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return args + list(serving.extra_args or [])


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 3}


def surge_fits(candidate: Candidate | None, found: list[Candidate]) -> bool:
    """A rolling update needs room for one more pod of the same shape next to the old one."""
    if candidate is None:
        return True
    same = [c for c in found if c.pool.product == candidate.pool.product and c.offload.fits]
    return sum(c.pool.free // max(c.gpus, 1) for c in same) >= 1 if candidate.gpus else True


def build(qm: api.QuantizedModel, variant: api.VariantStatus, candidate: Candidate | None,
          surge: bool, settings: config.OperatorConfig = config.DEFAULTS) -> ServingPlan:
    serving = qm.spec.serving
    assert serving is not None and variant.path and variant.digest
    offload = candidate.offload if candidate else None
    labels = {manifests.MODEL_LABEL: qm.metadata.name, manifests.ROLE_LABEL: "server"}
    pod_labels = {**labels, manifests.VARIANT_LABEL: variant.name,
                  manifests.DIGEST_LABEL: variant.digest[:16]}
    resources: dict[str, Any] = {k: dict(v) for k, v in (serving.resources.model_dump(exclude_none=True)
                                                         if serving.resources else {}).items()}
    node_selector = dict(serving.node_selector or {})
    if serving.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(serving.gpus)
        if candidate and candidate.pool.product:
            node_selector.setdefault("nvidia.com/gpu.product", candidate.pool.product)
    container = {
        "name": "llama-server", "image": serving.image or settings.server_image,
        "args": server_args(qm, variant.path, offload),
        "ports": [{"name": "http", "containerPort": manifests.SERVER_PORT}],
        "volumeMounts": [{"name": "storage", "mountPath": builds.STORAGE_MOUNT, "readOnly": True}],
        "resources": resources,
        "startupProbe": _probe("/health", 2, 600),  # loading a large GGUF takes minutes
        "readinessProbe": _probe("/health", 5, 3),
        "livenessProbe": _probe("/health", 10, 6),
        "securityContext": manifests._restricted_security(),
    }
    pod_spec = {
        "containers": [container], "nodeSelector": node_selector,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in serving.tolerations or []],
        "volumes": [{"name": "storage", "persistentVolumeClaim": {
            "claimName": manifests.storage_claim_name(qm), "readOnly": True}}],
        "securityContext": manifests._pod_security(),
        "enableServiceLinks": False,
    }
    strategy = ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
                if surge else {"type": "Recreate"})
    meta = manifests._meta(qm, deployment_name(qm), "server")
    deployment: manifests.Manifest = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
        "replicas": serving.replicas, "selector": {"matchLabels": labels}, "strategy": strategy,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec}}}
    deployment["metadata"]["annotations"] = {HASH_ANNOTATION: serving_hash(qm, variant)}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": manifests._meta(qm, service_name(qm), "server"),
               "spec": {"selector": labels, "ports": [{"name": "http", "port": manifests.SERVER_PORT,
                                                       "targetPort": "http"}]}}
    return ServingPlan(deployment, service, _status(qm, variant, candidate), candidate)


def _size(size_bytes: int | None) -> str | None:
    """The Size column of ``kubectl get qm``: ``131.4GiB``; none while the size is unknown."""
    return None if size_bytes is None else units.human_size(size_bytes)


def _status(qm: api.QuantizedModel, variant: api.VariantStatus, candidate: Candidate | None) -> api.ServingStatus:
    endpoint = (f"http://{service_name(qm)}.{qm.metadata.namespace}.svc.cluster.local:"
                f"{manifests.SERVER_PORT}/v1")
    if candidate is None:
        return api.ServingStatus(variant=variant.name, endpoint=endpoint, gpu_layers=0,
                                 size=_size(variant.size_bytes),
                                 explanation="served on CPU: spec.serving.gpus is 0")
    offload = candidate.offload
    return api.ServingStatus(
        variant=variant.name, endpoint=endpoint, gpu_layers=offload.gpu_layers, size=_size(variant.size_bytes),
        total_layers=offload.total_layers,
        predicted_gpu_bytes=sum(d.total for d in offload.devices),
        node_gpu_bytes=(candidate.pool.memory_bytes or 0) * candidate.gpus,
        explanation=f"{candidate.node} ({candidate.pool.product}): {offload.explanation}"[:4096],
    )


def serving_hash(qm: api.QuantizedModel, variant: api.VariantStatus) -> str:
    """What decides the Deployment: the serving spec and the exact artifact."""
    assert qm.spec.serving is not None
    payload = {"serving": qm.spec.serving.model_dump(mode="json", by_alias=True), "digest": variant.digest,
               "path": variant.path}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
