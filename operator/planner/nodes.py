"""GPUs a node can still give a pod: count, memory each, and MIG slices, from plain API dicts.

The operator needs per-node GPU memory to plan offload, and Kubernetes only knows GPU *counts*
(``nvidia.com/gpu`` allocatable). NVIDIA's GPU Feature Discovery adds labels with the product, the
memory (MiB) and the count; where they are missing, a table of known products fills in the memory.
With MIG in the "mixed" strategy each slice profile is its own resource (``nvidia.com/mig-1g.10gb``)
with its own labels. What is free is allocatable minus the requests of the pods that run there.

Pure: the caller passes the node and pod objects as dicts (``kubernetes``' ``to_dict()`` or raw
JSON both work, since only plain keys are read); nothing here talks to the API.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from kquant.quantizer import units

GPU_PREFIX = "nvidia.com/"
"""Every NVIDIA extended resource (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``) starts so."""
GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_RE = re.compile(r"^nvidia\.com/mig-(?P<profile>\d+g\.\d+gb)$")


@dataclasses.dataclass(frozen=True)
class LabelKeys:
    """Which node labels hold the GPU facts (GPU Feature Discovery's names by default)."""

    product: str = "nvidia.com/gpu.product"
    memory_mib: str = "nvidia.com/gpu.memory"
    count: str = "nvidia.com/gpu.count"
    resource: str = GPU_RESOURCE


KNOWN_GPU_MIB: dict[str, int] = {
    # normalised product name (lower case, alphanumerics only) -> memory in MiB as nvidia-smi shows it
    "teslat4": 15360,
    "teslav10016gb": 16384,
    "teslav100sxm216gb": 16384,
    "teslav100sxm232gb": 32768,
    "nvidiaa10": 23028,
    "nvidiaa10g": 23028,
    "nvidial4": 23034,
    "nvidiaa40": 46068,
    "nvidial40": 46068,
    "nvidial40s": 46068,
    "nvidiaa100pcie40gb": 40960,
    "nvidiaa100sxm440gb": 40960,
    "nvidiaa100pcie80gb": 81920,
    "nvidiaa10080gbpcie": 81920,
    "nvidiaa100sxm480gb": 81920,
    "nvidiah100pcie": 81559,
    "nvidiah10080gbhbm3": 81559,
    "nvidiah100sxm580gb": 81559,
    "nvidiah100nvl": 95830,
    "nvidiah200": 143771,
    "nvidiah200nvl": 143771,
    "nvidiageforcertx3090": 24576,
    "nvidiageforcertx4090": 24564,
    "nvidiageforcertx5090": 32607,
    "nvidiartxa6000": 49140,
    "nvidiartx6000adageneration": 49140,
}


@dataclasses.dataclass(frozen=True)
class GPUPool:
    """One kind of GPU resource on a node: whole GPUs or one MIG profile."""

    resource: str
    """The extended resource a pod requests (``nvidia.com/gpu`` or ``nvidia.com/mig-1g.10gb``)."""
    product: str | None
    memory_bytes: int | None
    """Memory of one GPU (or slice); None when neither a label nor the table knows it."""
    allocatable: int
    requested: int
    """What running pods on this node already request."""

    @property
    def free(self) -> int:
        return max(self.allocatable - self.requested, 0)


@dataclasses.dataclass(frozen=True)
class NodeGPUs:
    """The GPU pools of one node."""

    node: str
    pools: tuple[GPUPool, ...]


def normalise_product(product: str) -> str:
    return re.sub(r"[^a-z0-9]", "", product.lower())


def product_memory_mib(product: str) -> int | None:
    """Memory of a known product; GFD names look like ``NVIDIA-A100-SXM4-80GB`` or ``Tesla-T4``."""
    key = normalise_product(product)
    if key in KNOWN_GPU_MIB:
        return KNOWN_GPU_MIB[key]
    # A product that ends with a size ("...-48GB") that the table lacks: trust the name, less 5%.
    match = re.search(r"(\d+)gb$", key)
    if match:
        return int(int(match.group(1)) * 1024 * 0.95)
    return None


def mig_memory_mib(profile: str) -> int:
    """A MIG slice's memory from its profile name (``1g.10gb``): 95% of the nominal GB, a safe floor."""
    match = re.fullmatch(r"\d+g\.(\d+)gb", profile)
    if not match:
        raise ValueError(f"MIG profile {profile!r} does not look like <n>g.<size>gb")
    return int(int(match.group(1)) * 1024 * 0.95)


def _gpu_quantity(value: Any) -> int:
    """A GPU count or a GPU memory label: whole numbers, 0 when unset."""
    return units.whole_quantity(value, "GPU quantity")


def _containers(pod: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """A pod's regular and init containers (camelCase from the API, snake_case from the client)."""
    spec = pod.get("spec") or {}
    return spec.get("containers") or [], spec.get("initContainers") or spec.get("init_containers") or []


def pod_request(pod: Mapping[str, Any], resource: str) -> int:
    """What a pod holds of ``resource``: max(sum of containers, largest init container).

    Extended resources default their request to the limit, so limits count when requests are absent.
    """

    def amount(container: Mapping[str, Any]) -> int:
        res = container.get("resources") or {}
        requests = res.get("requests") or {}
        limits = res.get("limits") or {}
        return _gpu_quantity(requests.get(resource, limits.get(resource)))

    regular, init_containers = _containers(pod)
    init = max((amount(c) for c in init_containers), default=0)
    return max(sum(amount(c) for c in regular), init)


def gpu_resources(pod: Mapping[str, Any]) -> set[str]:
    """The NVIDIA resources (whole GPUs, MIG slices) any of the pod's containers requests or limits."""
    regular, init = _containers(pod)
    return {name for container in (*regular, *init) for kind in ("requests", "limits")
            for name in ((container.get("resources") or {}).get(kind) or {}) if name.startswith(GPU_PREFIX)}


def holds_gpus(pod: Mapping[str, Any]) -> bool:
    """The pod holds at least one GPU or MIG slice."""
    return any(pod_request(pod, resource) for resource in gpu_resources(pod))


def _pod_active_on(pod: Mapping[str, Any], node: str) -> bool:
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    node_name = spec.get("nodeName") or spec.get("node_name")
    return node_name == node and status.get("phase") not in ("Succeeded", "Failed")


def node_gpus(
    node: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], keys: LabelKeys = LabelKeys()
) -> NodeGPUs:
    """GPU pools of ``node`` with what the ``pods`` (any pods; others' nodes are skipped) request."""
    meta = node.get("metadata") or {}
    name = str(meta.get("name", ""))
    labels: Mapping[str, str] = meta.get("labels") or {}
    allocatable: Mapping[str, Any] = (node.get("status") or {}).get("allocatable") or {}
    active = [p for p in pods if _pod_active_on(p, name)]
    pools: list[GPUPool] = []

    if keys.resource in allocatable or keys.count in labels:
        product = labels.get(keys.product)
        memory_mib: int | None = None
        if labels.get(keys.memory_mib):
            memory_mib = _gpu_quantity(labels[keys.memory_mib])
        elif product:
            memory_mib = product_memory_mib(product)
        count = _gpu_quantity(allocatable.get(keys.resource, labels.get(keys.count)))
        pools.append(GPUPool(
            resource=keys.resource,
            product=product,
            memory_bytes=memory_mib * units.MiB if memory_mib else None,
            allocatable=count,
            requested=sum(pod_request(p, keys.resource) for p in active),
        ))  # fmt: skip

    for resource, value in sorted(allocatable.items()):
        match = MIG_RESOURCE_RE.match(resource)
        if not match:
            continue
        profile = match["profile"]
        label_mib = labels.get(f"nvidia.com/mig-{profile}.memory")
        mib = _gpu_quantity(label_mib) if label_mib else mig_memory_mib(profile)
        pools.append(GPUPool(
            resource=resource,
            product=labels.get(f"nvidia.com/mig-{profile}.product", labels.get(keys.product)),
            memory_bytes=mib * units.MiB,
            allocatable=_gpu_quantity(value),
            requested=sum(pod_request(p, resource) for p in active),
        ))  # fmt: skip
    return NodeGPUs(node=name, pools=tuple(pools))
