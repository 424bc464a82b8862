"""What a pass found out: where each build stands and what the serving side decided. Pure code.

``reconcile`` fills these in from what the watches show; ``status`` turns them into the
QuantizedModel's status. Keeping them apart from both lets either side change without the other.
"""

from __future__ import annotations

import dataclasses
import enum

from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report as quantizer_report


class BuildPhase(enum.StrEnum):
    """Where one build stands; ``status`` derives the model's phase from all of them."""

    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    BLOCKED = "Blocked"
    """Cannot start: something the user must fix (a missing Secret)."""


@dataclasses.dataclass(frozen=True)
class BuildState:
    """One build as the pass sees it; ``report`` once it succeeded."""

    build: builds.Build
    phase: BuildPhase
    progress: str = ""
    reason: str = ""
    report: quantizer_report.VariantReport | None = None
    sizing: quantizer_report.SizingSummary | None = None
    """What the build measured from the hub's listing (in its report, once it has one)."""


@dataclasses.dataclass(frozen=True)
class ServingState:
    """What the serving side found: a reason/message pair and, when rolled out, the status."""

    ready: bool
    reason: str
    message: str
    serving: api.ServingStatus | None = None
    rolling_out: bool = False
