"""GPU discovery from node labels, allocatable resources and pod requests (plain dicts, no API)."""

from __future__ import annotations

from typing import Any

import pytest
from kquant.operator.planner import nodes
from kquant.quantizer import units

MiB = units.MiB


def pool_of(info: nodes.NodeGPUs, resource: str = "nvidia.com/gpu") -> nodes.GPUPool | None:
    return next((p for p in info.pools if p.resource == resource), None)


def node(name: str = "gpu-1", labels: dict[str, str] | None = None, allocatable: dict[str, str] | None = None
         ) -> dict[str, Any]:  # fmt: skip
    return {"metadata": {"name": name, "labels": labels or {}}, "status": {"allocatable": allocatable or {}}}


def pod(node_name: str, gpus: int | None, phase: str = "Running", *, limits_only: bool = False,
        init: int | None = None, resource: str = "nvidia.com/gpu") -> dict[str, Any]:  # fmt: skip
    res: dict[str, Any] = {}
    if gpus is not None:
        res = {"limits": {resource: str(gpus)}} if limits_only else {"requests": {resource: str(gpus)}}
    spec: dict[str, Any] = {"nodeName": node_name, "containers": [{"name": "c", "resources": res}]}
    if init is not None:
        spec["initContainers"] = [{"name": "i", "resources": {"requests": {resource: str(init)}}}]
    return {"spec": spec, "status": {"phase": phase}}


GFD = {
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/gpu.memory": "81920",
    "nvidia.com/gpu.count": "8",
}


def test_gfd_labels_and_allocatable_minus_running_pods() -> None:
    pods = [
        pod("gpu-1", 2),
        pod("gpu-1", 1, limits_only=True),  # extended resources: the request defaults to the limit
        pod("gpu-1", 4, phase="Succeeded"),  # finished pods hold nothing
        pod("gpu-2", 3),  # another node
        pod("gpu-1", None),  # CPU-only pod
    ]
    info = nodes.node_gpus(node(labels=GFD, allocatable={"nvidia.com/gpu": "8"}), pods)
    pool = pool_of(info)
    assert pool is not None
    assert pool.product == "NVIDIA-A100-SXM4-80GB"
    assert pool.memory_bytes == 81920 * MiB
    assert (pool.allocatable, pool.requested, pool.free) == (8, 3, 5)


def test_init_containers_count_when_larger() -> None:
    assert nodes.pod_request(pod("n", 1, init=2), "nvidia.com/gpu") == 2
    assert nodes.pod_request(pod("n", 3, init=2), "nvidia.com/gpu") == 3


def test_known_products_fill_in_missing_memory() -> None:
    labels = {"nvidia.com/gpu.product": "Tesla-T4"}
    pool = pool_of(nodes.node_gpus(node(labels=labels, allocatable={"nvidia.com/gpu": "1"}), []))
    assert pool is not None and pool.memory_bytes == 15360 * MiB
    assert nodes.product_memory_mib("NVIDIA-H100-80GB-HBM3") == 81559
    assert nodes.product_memory_mib("NVIDIA-Some-Future-48GB") == int(48 * 1024 * 0.95)
    assert nodes.product_memory_mib("Mystery") is None
    unknown = pool_of(nodes.node_gpus(node(labels={"nvidia.com/gpu.product": "Mystery"},
                                           allocatable={"nvidia.com/gpu": "2"}), []))  # fmt: skip
    assert unknown is not None and unknown.memory_bytes is None and unknown.free == 2


def test_label_keys_are_configurable() -> None:
    keys = nodes.LabelKeys(product="example.com/gpu-model", memory_mib="example.com/gpu-mib",
                           count="example.com/gpus")  # fmt: skip
    labels = {"example.com/gpu-model": "L4", "example.com/gpu-mib": "23034", "example.com/gpus": "2"}
    pool = pool_of(nodes.node_gpus(node(labels=labels), [], keys))
    assert pool is not None
    assert pool.memory_bytes == 23034 * MiB and pool.allocatable == 2


def test_mig_slices_are_pools_of_their_own() -> None:
    labels = {**GFD, "nvidia.com/mig-1g.10gb.memory": "9856", "nvidia.com/mig-1g.10gb.count": "4"}
    allocatable = {"nvidia.com/gpu": "0", "nvidia.com/mig-1g.10gb": "4", "nvidia.com/mig-3g.40gb": "1"}
    pods = [pod("gpu-1", 1, resource="nvidia.com/mig-1g.10gb")]
    info = nodes.node_gpus(node(labels=labels, allocatable=allocatable), pods)
    small = pool_of(info, "nvidia.com/mig-1g.10gb")
    big = pool_of(info, "nvidia.com/mig-3g.40gb")
    assert small is not None and big is not None
    assert small.memory_bytes == 9856 * MiB and small.free == 3
    assert big.memory_bytes == int(40 * 1024 * 0.95) * MiB and big.free == 1
    whole = pool_of(info)
    assert whole is not None and whole.free == 0


def test_node_without_gpus_has_no_pools() -> None:
    assert nodes.node_gpus(node(allocatable={"cpu": "8"}), []).pools == ()


def test_bad_quantities_and_profiles_are_named() -> None:
    with pytest.raises(ValueError, match=r"GPU quantity '1\.5' is not a whole number"):
        nodes.pod_request(pod("n", None) | {"spec": {"containers": [{"resources": {"requests": {
            "nvidia.com/gpu": "1.5"}}}]}}, "nvidia.com/gpu")  # fmt: skip
    with pytest.raises(ValueError, match="MIG profile 'big' does not look like"):
        nodes.mig_memory_mib("big")
