"""What the node and GPU-pod indexes keep: plain dicts in, the planning inputs out, no cluster."""

from __future__ import annotations

from typing import Any

from kquant.operator import capacity
from kquant.operator.planner import nodes


def _spec(limits: dict[str, str], node: str | None = "gpu-1", init: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x", "resources": {"limits": limits}}]}
    if node:
        spec["nodeName"] = node
    if init is not None:
        spec["initContainers"] = [{"name": "i", "resources": {"requests": init}}]
    return spec


def test_a_running_pod_with_gpus_is_kept_reduced_to_its_resources() -> None:
    pod = capacity.gpu_pod("p", _spec({"nvidia.com/gpu": "2", "cpu": "4"}), {"phase": "Running"}, "ml")
    assert pod == {"metadata": {"name": "p", "namespace": "ml"},
                   "spec": {"nodeName": "gpu-1", "initContainers": [],
                            "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2", "cpu": "4"}}}]},
                   "status": {"phase": "Running"}}
    assert nodes.pod_request(pod, "nvidia.com/gpu") == 2


def test_pods_without_gpus_unscheduled_or_ended_are_not_kept() -> None:
    assert capacity.gpu_pod("p", _spec({"cpu": "4"}), {"phase": "Running"}) is None
    assert capacity.gpu_pod("p", _spec({"nvidia.com/gpu": "0"}), {"phase": "Running"}) is None
    assert capacity.gpu_pod("p", _spec({"nvidia.com/gpu": "1"}, node=None), {"phase": "Pending"}) is None
    assert capacity.gpu_pod("p", _spec({"nvidia.com/gpu": "1"}), {"phase": "Succeeded"}) is None


def test_mig_slices_and_init_containers_count_as_gpus() -> None:
    mig = _spec({}, init={"nvidia.com/mig-1g.10gb": "1"})
    assert nodes.gpu_resources({"spec": mig}) == {"nvidia.com/mig-1g.10gb"}
    assert capacity.gpu_pod("p", mig, {"phase": "Running"}) is not None
    # A resource named with a zero count still names GPUs: its pod ending is worth a capacity pass.
    assert nodes.gpu_resources({"spec": _spec({"nvidia.com/gpu": "0"})}) == {"nvidia.com/gpu"}
    assert not nodes.holds_gpus({"spec": _spec({"nvidia.com/gpu": "0"})})


def test_a_node_keeps_its_labels_and_allocatable_only() -> None:
    kept = capacity.node("n", {"a": "b"}, {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready"}]})
    assert kept == {"metadata": {"name": "n", "labels": {"a": "b"}}, "status": {"allocatable": {"nvidia.com/gpu": "8"}}}
