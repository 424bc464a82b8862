"""Did the plan hold? The planner's prediction against what llama-server allocated. Pure code.

A plan can fail two ways that a user only notices later: llama.cpp allocates more than predicted
(the GPU runs out of memory on the next, longer request or after an upgrade), or it offloads fewer
layers than planned, so that part of the model runs on the CPU at a tenth of the speed without an
error anywhere (the silent CPU fallback; a CPU build or a missing device gives exactly that). This
module compares one ``server_log.ServerLog`` with one ``Prediction`` and says which, with the
numbers, per device.

What is compared: model + KV + compute buffers per device, the columns llama.cpp itself reports.
The CUDA context and driver reservations are not in llama-server's log: they are what the per-GPU
overhead (``plan.PlannerSettings``) and the learned excess (``margins``) cover. On the host, only a
CPU-served model is judged: with a GPU plan the host keeps the memory-mapped file range of its
weights, which is page cache the kernel can drop, not an allocation the plan has to hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kquant.operator.planner import memory, server_log
from kquant.quantizer import units

TOLERANCE = 0.05
"""How far a device's measured bytes may exceed the prediction, as a share of the prediction."""
SLACK_BYTES = 4 * memory.MiB
"""And in absolute terms: ggml-alloc's placement moves tiny compute buffers by a few rows."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the planner said for one server: bytes per GPU and on the host, and the layers it placed."""

    devices: tuple[memory.DeviceBytes, ...]
    host: memory.DeviceBytes
    gpu_layers: int
    total_layers: int


@dataclasses.dataclass(frozen=True)
class DeviceCheck:
    device: str
    """``GPU0``, ``GPU1`` ... in the plan's order, or ``Host``."""
    name: str
    """What llama.cpp called it: ``CUDA0 (NVIDIA H100 80GB HBM3)``; empty when it found no such device."""
    predicted: int
    measured: int
    judged: bool
    """Whether it counts for the verdict (the host only when nothing is planned on a GPU)."""

    @property
    def error_ratio(self) -> float | None:
        """``(measured - predicted) / predicted``: positive when llama.cpp allocated more."""
        return None if self.predicted == 0 else (self.measured - self.predicted) / self.predicted

    @property
    def excess(self) -> int:
        return self.measured - self.predicted

    def exceeds(self, tolerance: float = TOLERANCE, slack: int = SLACK_BYTES) -> bool:
        return self.judged and self.measured > self.predicted * (1 + tolerance) + slack


@dataclasses.dataclass(frozen=True)
class PlanCheck:
    devices: tuple[DeviceCheck, ...]
    planned_layers: int
    offloaded_layers: int
    total_layers: int
    tolerance: float = TOLERANCE

    @property
    def fallback(self) -> bool:
        """llama.cpp put fewer layers on GPUs than planned: the silent CPU fallback."""
        return self.offloaded_layers < self.planned_layers

    @property
    def exceeded(self) -> tuple[DeviceCheck, ...]:
        return tuple(d for d in self.devices if d.exceeds(self.tolerance))

    @property
    def verified(self) -> bool:
        return not self.fallback and not self.exceeded

    @property
    def largest_gpu_excess(self) -> int:
        """The largest excess of measured over predicted bytes on a planned GPU (0 when none exceeded)."""
        return max([0, *(d.excess for d in self.devices if d.judged and d.device != server_log.HOST)])

    def message(self) -> str:
        """One line for the condition and the Event: the verdict first, then every device's numbers."""
        parts = []
        if self.fallback:
            parts.append(f"llama.cpp offloaded {self.offloaded_layers} of the {self.planned_layers} planned layers "
                         f"(of {self.total_layers}): the rest run on the CPU; check that the pod sees its GPUs "
                         f"(a CPU build of llama-server, or a missing device, offloads nothing)")
        for d in self.exceeded:
            parts.append(f"{d.device} allocated {units.gib(d.measured)}, {units.gib(d.excess)} more than the "
                         f"{units.gib(d.predicted)} predicted (tolerance {self.tolerance:.0%}); the next "
                         f"rollout plans with the larger margin")
        if not parts:
            parts.append(f"every device within {self.tolerance:.0%} of the plan; {self.offloaded_layers}/"
                         f"{self.total_layers} layers offloaded as planned")
        rows = []
        for d in self.devices:
            ratio = d.error_ratio
            err = f"{ratio:+.1%}" if ratio is not None else "n/a"
            rows.append(f"{d.device}{f' {d.name}' if d.name else ''}: predicted {units.gib(d.predicted)}, "
                        f"measured {units.gib(d.measured)} ({err})")
        return "; ".join(parts + rows)


def compare(prediction: Prediction, measured: server_log.ServerLog, tolerance: float = TOLERANCE) -> PlanCheck:
    """The plan against one server's log. Devices pair up in order (``--tensor-split``'s); a planned
    GPU that llama.cpp did not find is measured at 0 bytes, and its layers count as not offloaded."""
    gpu_planned = prediction.gpu_layers > 0 and bool(prediction.devices)
    rows = []
    for i, predicted in enumerate(prediction.devices):
        found = measured.devices[i] if i < len(measured.devices) else None
        name = f"{found.name} ({found.description})" if found and found.description else (found.name if found else "")
        rows.append(DeviceCheck(f"GPU{i}", name, predicted.total, found.total if found else 0, judged=gpu_planned))
    for j, extra in enumerate(measured.devices[len(prediction.devices):], start=len(prediction.devices)):
        rows.append(DeviceCheck(f"GPU{j}", f"{extra.name} ({extra.description})", 0, extra.total, judged=False))
    host = measured.host
    rows.append(DeviceCheck(server_log.HOST, host.description, prediction.host.total, host.total,
                            judged=not gpu_planned))
    offloaded = min(measured.offloaded_layers, prediction.total_layers)
    return PlanCheck(tuple(rows), planned_layers=prediction.gpu_layers if gpu_planned else 0,
                     offloaded_layers=offloaded, total_layers=measured.total_layers or prediction.total_layers,
                     tolerance=tolerance)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return 0.0
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
