"""From what the cluster shows to what ``status`` says. Pure code.

Each build is in one ``BuildState``; the serving side reports one ``ServingState``. This module
turns them into the phase, the progress line, ``status.variants[]`` and the four conditions
(Quantized, Evaluated, Serving, Ready) that kstatus, Flux and Argo CD read.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
from collections.abc import Sequence

from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report as quantizer_report

PROGRESS_PHASES: dict[str, api.Phase] = {
    "fetch": api.Phase.DOWNLOADING, "download": api.Phase.DOWNLOADING,
    "convert": api.Phase.CONVERTING, "calibrat": api.Phase.CALIBRATING,
    "imatrix": api.Phase.CALIBRATING, "quantiz": api.Phase.QUANTIZING, "plan": api.Phase.QUANTIZING,
    "evaluat": api.Phase.EVALUATING, "referenc": api.Phase.EVALUATING, "publish": api.Phase.EVALUATING,
}


class BuildPhase(enum.StrEnum):
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    BLOCKED = "Blocked"
    """Cannot start: something the user must fix (a missing Secret)."""


@dataclasses.dataclass(frozen=True)
class BuildState:
    build: builds.Build
    phase: BuildPhase
    progress: str = ""
    reason: str = ""
    report: quantizer_report.VariantReport | None = None


def parse_report(data: str | None, variant: str) -> tuple[quantizer_report.BuildReport | None,
                                                           quantizer_report.VariantReport | None]:
    if not data:
        return None, None
    try:
        parsed = quantizer_report.BuildReport.model_validate(json.loads(data))
    except ValueError:
        return None, None
    return parsed, next((v for v in parsed.variants if v.name == variant), None)


def variant_status(state: BuildState) -> api.VariantStatus:
    base = api.VariantStatus(name=state.build.variant, digest=state.build.digest)
    report = state.report
    if report is None:
        message = state.reason or state.progress or state.phase.value
        return base.model_copy(update={"message": message[:1024]})
    metrics = report.metrics
    return base.model_copy(update={
        "type": report.type, "size_bytes": report.size_bytes, "sha256": report.sha256 or None,
        "bits_per_weight": round(report.bits_per_weight, 4),
        "kl_divergence": report.kl_divergence if report.kl_divergence is not None
        else (metrics.kl_divergence if metrics else None),
        "perplexity": report.perplexity if report.perplexity is not None
        else (metrics.perplexity if metrics else None),
        "gate_passed": report.gate_passed, "path": volume_path(report.path, state.build.digest),
        "message": "; ".join(report.gate.reasons)[:1024] if report.gate and report.gate.reasons else None,
    })


def volume_path(path: str, digest: str) -> str:
    """The model file as every pod sees it: under the storage mount, in the digest's folder."""
    marker = f"/{digest}/"
    if marker not in path:
        return path
    return builds.STORAGE_MOUNT + marker + path.split(marker, 1)[1]


@dataclasses.dataclass(frozen=True)
class ServingState:
    """What the serving side found: a reason/message pair and, when rolled out, the status."""

    ready: bool
    reason: str
    message: str
    serving: api.ServingStatus | None = None
    rolling_out: bool = False


def _condition(kind: api.ConditionType, ok: bool, reason: str, message: str, generation: int | None,
               now: datetime.datetime) -> api.Condition:
    return api.Condition(type=kind.value, status=api.ConditionStatus.TRUE if ok else api.ConditionStatus.FALSE,
                         reason=reason, message=message[:32768], last_transition_time=now,
                         observed_generation=generation)


def _quantized(states: Sequence[BuildState]) -> tuple[bool, str, str]:
    failed = [s for s in states if s.phase in (BuildPhase.FAILED, BuildPhase.BLOCKED)]
    if failed:
        blocked = [s for s in failed if s.phase is BuildPhase.BLOCKED]
        reason = "BuildFailed"
        if blocked:
            secret = any("CreateContainerConfigError" in s.reason for s in blocked)
            reason = "SecretNotFound" if secret else "BuildBlocked"
        return False, reason, "; ".join(f"{s.build.variant}: {s.reason}" for s in failed)
    pending = [s for s in states if s.phase is not BuildPhase.SUCCEEDED]
    if pending:
        running = [s for s in pending if s.phase is BuildPhase.RUNNING]
        detail = running[0].progress if running and running[0].progress else f"{len(pending)} variant(s) to build"
        return False, "Building", detail
    return True, "Built", f"{len(states)} variant(s) built"


def _evaluated(states: Sequence[BuildState]) -> tuple[bool, str, str]:
    done = [s for s in states if s.report is not None]
    if len(done) < len(states):
        return False, "Waiting", "not every variant is built yet"
    failed = [s.build.variant for s in done if s.report is not None and not s.report.gate_passed]
    if failed:
        return True, "GateFailed", f"variant(s) {', '.join(failed)} failed the quality gate"
    return True, "GatePassed", "every variant passed its quality gate"


def progress_line(states: Sequence[BuildState]) -> str:
    total = len(states)
    built = sum(1 for s in states if s.phase is BuildPhase.SUCCEEDED)
    running = next((s for s in states if s.phase is BuildPhase.RUNNING), None)
    if running is not None:
        # The quantizer's own line may start with "<variant> 1/1"; the model-wide count replaces it.
        words = (running.progress or "starting").split()
        if words and words[0] == running.build.variant:
            words = words[2:] if len(words) > 2 and "/" in words[1] else words[1:]
        return f"{running.build.variant} {built + 1}/{total} {' '.join(words)}"[:256]
    return f"{built}/{total} variants built"


STALLED_SERVING = frozenset({"BuildBlocked", "GateFailed", "DoesNotFit", "NoGPUNodes", "NoModelFacts", "BuildFailed"})
"""Serving reasons that no amount of waiting fixes: a person must change the spec or the cluster."""


def _phase(states: Sequence[BuildState], serving: ServingState | None, quantized: bool) -> api.Phase:
    if any(s.phase in (BuildPhase.FAILED, BuildPhase.BLOCKED) for s in states) and not (serving and serving.ready):
        return api.Phase.FAILED
    if serving is not None and serving.reason in STALLED_SERVING and serving.serving is None:
        return api.Phase.FAILED
    running = next((s for s in states if s.phase is BuildPhase.RUNNING), None)
    if running is not None:
        step = running.progress.lower()
        return next((phase for word, phase in PROGRESS_PHASES.items() if word in step), api.Phase.DOWNLOADING)
    if not quantized:
        return api.Phase.PENDING
    if serving is None:
        return api.Phase.READY
    return api.Phase.READY if serving.ready else api.Phase.SERVING


def compute(qm: api.QuantizedModel, states: Sequence[BuildState], serving: ServingState | None,
            now: datetime.datetime) -> api.QuantizedModelStatus:
    generation = qm.metadata.generation
    old = qm.status or api.QuantizedModelStatus()
    quantized = _quantized(states)
    evaluated = _evaluated(states)
    conditions = list(old.conditions or [])
    new = [_condition(api.ConditionType.QUANTIZED, *quantized, generation, now),
           _condition(api.ConditionType.EVALUATED, *evaluated, generation, now)]
    if serving is not None:
        new.append(_condition(api.ConditionType.SERVING, serving.ready, serving.reason, serving.message,
                              generation, now))
        ready = serving.ready
        ready_reason, ready_message = serving.reason, serving.message
    else:
        ready = quantized[0]
        ready_reason, ready_message = quantized[1], quantized[2]
    new.append(_condition(api.ConditionType.READY, ready, ready_reason, ready_message, generation, now))
    # kstatus (Flux, kubectl wait, Argo CD's generic check): Stalled=True ends the wait with a
    # failure, Reconciling=True says work is under way.
    stalled = (not ready and (quantized[1] in ("BuildFailed", "SecretNotFound", "BuildBlocked")
                              or ready_reason in STALLED_SERVING))
    new.append(_condition(api.ConditionType.STALLED, stalled, ready_reason if stalled else "NotStalled",
                          ready_message if stalled else "", generation, now))
    new.append(_condition(api.ConditionType.RECONCILING, not ready and not stalled,
                          ready_reason if not ready and not stalled else "Reconciled",
                          ready_message if not ready and not stalled else "", generation, now))
    for condition in new:
        conditions = api.set_condition(conditions, condition)
    return api.QuantizedModelStatus(
        observed_generation=generation, phase=_phase(states, serving, quantized[0]),
        progress=progress_line(states), conditions=conditions,
        variants=[variant_status(s) for s in states],
        serving=serving.serving if serving is not None and serving.serving is not None else old.serving,
        kopf=old.kopf,
    )
