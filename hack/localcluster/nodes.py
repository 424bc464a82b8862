"""The nodes of the local cluster: what GPUs they claim and how they are labelled.

Labels follow NVIDIA GPU Feature Discovery (``nvidia.com/gpu.product``, ``nvidia.com/gpu.memory``
in MiB, ``nvidia.com/gpu.count``) and capacity carries ``nvidia.com/gpu`` as the device plugin
would report it, so the operator's node discovery and the real scheduler see what they would see
on a GPU cluster.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    name: str
    gpu_product: str | None
    gpu_memory_mib: int
    gpu_count: int
    cpu: str = "16"
    memory: str = "128Gi"
    pods: int = 110

    def labels(self) -> dict[str, str]:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kquant.dev/local-node": "true",
        }
        if self.gpu_count and self.gpu_product:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.gpu_product,
                "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
                "nvidia.com/gpu.count": str(self.gpu_count),
            }
        return labels

    def resources(self) -> dict[str, str]:
        res = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods),
               "ephemeral-storage": "500Gi"}
        if self.gpu_count:
            res["nvidia.com/gpu"] = str(self.gpu_count)
        return res

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels()},
            "spec": {},
        }


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("gpu-24g", "NVIDIA-GeForce-RTX-4090", 24564, 1),
    NodeSpec("gpu-80g", "NVIDIA-A100-SXM4-80GB", 81920, 1),
    NodeSpec("gpu-8x80g", "NVIDIA-H100-80GB-HBM3", 81559, 8, cpu="128", memory="1024Gi"),
    NodeSpec("cpu-only", None, 0, 0, cpu="8", memory="32Gi"),
)
