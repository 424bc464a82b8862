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


class Reason(enum.StrEnum):
    """Every condition reason and Event reason the operator writes, in one place: users, alerts and
    GitOps tools match on these words, so they are an interface, not prose."""

    # Quantized
    BUILDING = "Building"
    BUILT = "Built"
    BUILD_FAILED = "BuildFailed"
    """The quantizer or its Job failed (its own words in the message)."""
    REPORT_MISSING = "ReportMissing"
    """The Job completed but the build's ConfigMap holds no final report: the result is unknown."""
    SECRET_NOT_FOUND = "SecretNotFound"
    CONFIG_NOT_FOUND = "ConfigNotFound"
    """A ConfigMap (calibration, evaluation) or a key in one that a build pod mounts does not exist."""
    BUILD_BLOCKED = "BuildBlocked"
    """The build pod cannot start for another reason a person must fix (an image that cannot be pulled)."""
    BUILD_UNDERSIZED = "BuildUnderSized"
    CLAIM_TOO_SMALL = "ClaimTooSmall"
    """The sizing of the source's listing needs more than ``spec.storage.pvc.size``: no build starts."""
    """A request the user set is below what the sizing of the hub's listing needs (an Event only)."""
    # Evaluated
    WAITING = "Waiting"
    GATE_PASSED = "GatePassed"
    GATE_FAILED = "GateFailed"
    # Serving
    VARIANT_NOT_BUILT = "VariantNotBuilt"
    NOT_SERVABLE = "NotServable"
    """The promoted variant is a bnb-nf4/bnb-fp4 folder: llama-server serves GGUF only."""
    NO_MODEL_FACTS = "NoModelFacts"
    DOES_NOT_FIT = "DoesNotFit"
    NO_GPU_NODES = "NoGPUNodes"
    GPUS_BUSY = "GPUsBusy"
    """The variant fits a GPU pool, but every such pool's GPUs are taken: it waits for one to be freed."""
    ROLLING_OUT = "RollingOut"
    SERVING = "Serving"
    # PlanVerified
    PLAN_HELD = "PlanHeld"
    """Every device within tolerance of the prediction and every planned layer offloaded."""
    MEMORY_ABOVE_PLAN = "MemoryAbovePlan"
    """A device allocated more than predicted, beyond the tolerance."""
    FEWER_LAYERS_OFFLOADED = "FewerLayersOffloaded"
    """llama.cpp put fewer layers on GPUs than planned: the silent CPU fallback."""
    # Any condition
    INVALID_SPEC = "InvalidSpec"
    """The spec does not validate against this operator's models (a CRD older than the operator)."""
    CONFLICT = "Conflict"
    """An object the model needs exists already and belongs to someone else: it is neither used nor changed."""
    REFUSED = "Refused"
    """The API server refused an object rendered from the spec (a value the CRD admits but the API does not)."""
    POLICY_VIOLATION = "PolicyViolation"
    """The model names a hub, image or Secret the platform's policy (chart values under ``policy``) does not allow."""
    NOT_STALLED = "NotStalled"
    RECONCILED = "Reconciled"

    @property
    def warning(self) -> bool:
        """A failure a user must act on: posted as a Warning Event."""
        return self in WARNING_REASONS

    @property
    def stalled(self) -> bool:
        """No amount of waiting fixes it: a person must change the spec or the cluster (kstatus Stalled)."""
        return self in STALLED_REASONS

    @property
    def waits_for_capacity(self) -> bool:
        """A new node, a relabelled node or a freed GPU may resolve it."""
        return self in (Reason.DOES_NOT_FIT, Reason.NO_GPU_NODES, Reason.GPUS_BUSY)


WARNING_REASONS = frozenset({
    Reason.BUILD_FAILED, Reason.REPORT_MISSING, Reason.SECRET_NOT_FOUND, Reason.CONFIG_NOT_FOUND,
    Reason.BUILD_BLOCKED, Reason.GATE_FAILED, Reason.DOES_NOT_FIT, Reason.NO_GPU_NODES, Reason.GPUS_BUSY,
    Reason.INVALID_SPEC, Reason.CONFLICT, Reason.REFUSED, Reason.NO_MODEL_FACTS, Reason.BUILD_UNDERSIZED,
    Reason.POLICY_VIOLATION, Reason.MEMORY_ABOVE_PLAN, Reason.FEWER_LAYERS_OFFLOADED, Reason.CLAIM_TOO_SMALL,
    Reason.NOT_SERVABLE})
STALLED_REASONS = frozenset({
    Reason.BUILD_FAILED, Reason.REPORT_MISSING, Reason.SECRET_NOT_FOUND, Reason.CONFIG_NOT_FOUND,
    Reason.BUILD_BLOCKED, Reason.GATE_FAILED, Reason.DOES_NOT_FIT, Reason.NO_GPU_NODES, Reason.NO_MODEL_FACTS,
    Reason.INVALID_SPEC, Reason.CONFLICT, Reason.REFUSED, Reason.POLICY_VIOLATION, Reason.CLAIM_TOO_SMALL,
    Reason.NOT_SERVABLE})


def reason_of(text: str | None) -> Reason | None:
    """The ``Reason`` a condition carries as text (from a status the API server stored), or None."""
    try:
        return Reason(text) if text else None
    except ValueError:
        return None


class NotOwnedError(Exception):
    """An object the model needs exists and belongs to someone else: it is neither used nor changed."""

    def __init__(self, kind: str, namespace: str, name: str, owner: str) -> None:
        super().__init__(f"{kind} {namespace}/{name} exists and belongs to {owner}, not to this QuantizedModel")
        self.kind, self.namespace, self.name, self.owner = kind, namespace, name, owner


class RefusedError(Exception):
    """The API server refused an object the operator rendered from the spec (422 Invalid, 400)."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(f"the API server refused {kind} {name}: {message}")
        self.kind, self.name, self.message = kind, name, message


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something a person must fix before the pass can go on, with its reason code."""

    why: Reason
    message: str


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
    """What went wrong, for a person (FAILED and BLOCKED)."""
    report: quantizer_report.VariantReport | None = None
    sizing: quantizer_report.SizingSummary | None = None
    """What the build measured from the hub's listing (in its report, once it has one)."""
    why: Reason | None = None
    """The reason code of a FAILED or BLOCKED build."""


@dataclasses.dataclass(frozen=True)
class ServingState:
    """What the serving side found: a reason/message pair and, when rolled out, the status."""

    ready: bool
    reason: Reason
    message: str
    serving: api.ServingStatus | None = None
    rolling_out: bool = False
