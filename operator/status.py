"""From what a pass found to what ``status`` says. Pure code.

Each build is in one ``findings.BuildState``; the serving side reports one
``findings.ServingState``. This module turns them into the phase, the progress line,
``status.variants[]`` and the conditions (Quantized, Evaluated, Serving, Ready, and kstatus'
Stalled and Reconciling) that kstatus, Flux and Argo CD read; and a rollout's outcome (the
artifact and where it went) into ``status.serving``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from kquant.operator import artifacts, findings, server_manifests, serving
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import check, memory, plan, server_log
from kquant.quantizer import gguf_facts, units

PROGRESS_PHASES: dict[str, api.Phase] = {
    "fetch": api.Phase.DOWNLOADING, "convert": api.Phase.CONVERTING, "calibrat": api.Phase.CALIBRATING,
    "quantiz": api.Phase.QUANTIZING, "plan": api.Phase.QUANTIZING,
    "evaluat": api.Phase.EVALUATING, "referenc": api.Phase.EVALUATING, "publish": api.Phase.EVALUATING,
    "sizing": api.Phase.PENDING,
}
"""The model's phase while a build runs, from the step word in the quantizer's progress line
(``steps.StepKind``: fetching, converting, calibrating, ...); ``sizing`` is the sizing Job, before
the first build Job exists."""


def variant_status(state: findings.BuildState) -> api.VariantStatus:
    base = api.VariantStatus(name=state.build.variant, digest=state.build.digest)
    report = state.report
    if report is None:
        message = state.reason or state.progress or state.phase.value
        return base.model_copy(update={"message": message[:1024]})
    metrics = report.metrics
    return base.model_copy(update={
        "type": report.type, "format": api.VariantFormat(report.format),
        "size_bytes": report.size_bytes, "sha256": report.sha256 or None,
        "bits_per_weight": round(report.bits_per_weight, 4),
        "kl_divergence": report.kl_divergence if report.kl_divergence is not None
        else (metrics.kl_divergence if metrics else None),
        "perplexity": report.perplexity if report.perplexity is not None
        else (metrics.perplexity if metrics else None),
        "gate_passed": report.gate_passed, "path": artifacts.volume_path(report.path, state.build.digest),
        "message": "; ".join(report.gate.reasons)[:1024] if report.gate and report.gate.reasons else None,
    })


def serving_status(qm: api.QuantizedModel, artifact: artifacts.Artifact, candidate: serving.Candidate | None,
                   facts: gguf_facts.ModelFacts | None = None) -> api.ServingStatus:
    """``status.serving`` for a rollout of ``artifact`` on ``candidate`` (None: on CPU), with the
    prediction per device that the server's log is checked against once a pod is Ready."""
    endpoint = server_manifests.endpoint(qm)
    size = units.human_size(artifact.size_bytes)
    if candidate is None:
        return api.ServingStatus(variant=artifact.variant, endpoint=endpoint, gpu_layers=0, size=size,
                                 explanation="served on CPU: spec.serving.gpus is 0",
                                 plan_check=cpu_prediction(qm, facts))
    offload = candidate.offload
    return api.ServingStatus(
        variant=artifact.variant, endpoint=endpoint, gpu_layers=offload.gpu_layers, size=size,
        total_layers=offload.total_layers,
        predicted_gpu_bytes=sum(d.total for d in offload.devices),
        node_gpu_bytes=(candidate.pool.memory_bytes or 0) * candidate.gpus,
        explanation=f"{candidate.node} ({candidate.pool.product}): {offload.explanation}"[:4096],
        plan_check=predicted_check(offload),
    )


def predicted_check(offload: plan.OffloadPlan) -> api.PlanCheck:
    """The plan's bytes per GPU and on the host, before any pod has run (measured fields empty)."""
    rows = [api.DevicePlanCheck(device=f"GPU{i}", predicted_bytes=d.total) for i, d in enumerate(offload.devices)]
    rows.append(api.DevicePlanCheck(device=server_log.HOST, predicted_bytes=offload.host.total))
    return api.PlanCheck(planned_layers=offload.gpu_layers if offload.devices else 0,
                         total_layers=offload.total_layers, devices=rows)


def cpu_prediction(qm: api.QuantizedModel, facts: gguf_facts.ModelFacts | None) -> api.PlanCheck | None:
    """A CPU-served model's host bytes as the memory model predicts them (None without facts)."""
    spec = qm.spec.serving
    if facts is None or spec is None:
        return None
    try:
        host = memory.breakdown(facts, serving.context_settings(spec), memory.Placement(0)).host
    except ValueError:
        return None
    return api.PlanCheck(planned_layers=0, total_layers=facts.block_count + 1,
                         devices=[api.DevicePlanCheck(device=server_log.HOST, predicted_bytes=host.total)])


def prediction(found: api.PlanCheck) -> check.Prediction | None:
    """``check.Prediction`` back from what status recorded at rollout (totals per device)."""
    rows = found.devices or []
    host = next((d for d in rows if d.device == server_log.HOST), None)
    if host is None or found.total_layers is None:
        return None
    gpus = tuple(memory.DeviceBytes(model=d.predicted_bytes) for d in rows if d.device != server_log.HOST)
    return check.Prediction(devices=gpus, host=memory.DeviceBytes(model=host.predicted_bytes),
                            gpu_layers=found.planned_layers or 0, total_layers=found.total_layers)


def measured_check(found: api.PlanCheck, result: check.PlanCheck, pod: str, pod_uid: str, node: str,
                   product: str | None) -> api.PlanCheck:
    """The recorded prediction with what one pod's log showed."""
    rows = [api.DevicePlanCheck(device=d.device, name=d.name or None, predicted_bytes=d.predicted,
                                measured_bytes=d.measured, judged=d.judged,
                                error_ratio=None if d.error_ratio is None else round(d.error_ratio, 4))
            for d in result.devices]
    return found.model_copy(update={
        "pod": pod, "pod_uid": pod_uid, "node": node or None, "gpu_product": product,
        "planned_layers": result.planned_layers, "offloaded_layers": result.offloaded_layers,
        "total_layers": result.total_layers, "devices": rows, "verified": result.verified,
        "message": result.message()[:4096]})


Reason = findings.Reason


def _condition(kind: api.ConditionType, ok: bool, reason: Reason, message: str, generation: int | None,
               now: datetime.datetime) -> api.Condition:
    return api.Condition(type=kind.value, status=api.ConditionStatus.TRUE if ok else api.ConditionStatus.FALSE,
                         reason=reason.value, message=message[:32768], last_transition_time=now,
                         observed_generation=generation)


def _quantized(states: Sequence[findings.BuildState]) -> tuple[bool, Reason, str]:
    failed = [s for s in states if s.phase in (findings.BuildPhase.FAILED, findings.BuildPhase.BLOCKED)]
    if failed:
        # A blocked build's reason first: it is the one that unblocks by itself once fixed.
        first = sorted(failed, key=lambda s: s.phase is not findings.BuildPhase.BLOCKED)[0]
        reason = first.why or (Reason.BUILD_BLOCKED if first.phase is findings.BuildPhase.BLOCKED
                               else Reason.BUILD_FAILED)
        return False, reason, "; ".join(f"{s.build.variant}: {s.reason}" for s in failed)
    pending = [s for s in states if s.phase is not findings.BuildPhase.SUCCEEDED]
    if pending:
        running = [s for s in pending if s.phase is findings.BuildPhase.RUNNING]
        detail = running[0].progress if running and running[0].progress else f"{len(pending)} variant(s) to build"
        return False, Reason.BUILDING, detail
    return True, Reason.BUILT, f"{len(states)} variant(s) built"


def _evaluated(states: Sequence[findings.BuildState]) -> tuple[bool, Reason, str]:
    done = [s for s in states if s.report is not None]
    if len(done) < len(states):
        return False, Reason.WAITING, "not every variant is built yet"
    failed = [s.build.variant for s in done if s.report is not None and not s.report.gate_passed]
    if failed:
        return True, Reason.GATE_FAILED, f"variant(s) {', '.join(failed)} failed the quality gate"
    return True, Reason.GATE_PASSED, "every variant passed its quality gate"


def progress_line(states: Sequence[findings.BuildState]) -> str:
    total = len(states)
    built = sum(1 for s in states if s.phase is findings.BuildPhase.SUCCEEDED)
    running = next((s for s in states if s.phase is findings.BuildPhase.RUNNING), None)
    if running is not None:
        # The quantizer's own line may start with "<variant> 1/1"; the model-wide count replaces it.
        words = (running.progress or "starting").split()
        if words and words[0] == running.build.variant:
            words = words[2:] if len(words) > 2 and "/" in words[1] else words[1:]
        return f"{running.build.variant} {built + 1}/{total} {' '.join(words)}"[:256]
    return f"{built}/{total} variants built"


def _phase(states: Sequence[findings.BuildState], serving_state: findings.ServingState | None,
           quantized: bool) -> api.Phase:
    failed = any(s.phase in (findings.BuildPhase.FAILED, findings.BuildPhase.BLOCKED) for s in states)
    if failed and not (serving_state and serving_state.ready):
        return api.Phase.FAILED
    if serving_state is not None and serving_state.reason.stalled and serving_state.serving is None:
        return api.Phase.FAILED
    running = next((s for s in states if s.phase is findings.BuildPhase.RUNNING), None)
    if running is not None:
        step = running.progress.lower()
        return next((phase for word, phase in PROGRESS_PHASES.items() if word in step), api.Phase.DOWNLOADING)
    if not quantized:
        return api.Phase.PENDING
    if serving_state is None:
        return api.Phase.READY
    return api.Phase.READY if serving_state.ready else api.Phase.SERVING


def _plan_verified(serving_state: findings.ServingState | None) -> tuple[bool, Reason, str] | None:
    """PlanVerified from the served pod's check; None until a pod's log has been read. It does not
    touch Ready: a server that allocated more than predicted still serves."""
    found = serving_state.serving.plan_check if serving_state and serving_state.serving else None
    if found is None or found.verified is None:
        return None
    message = found.message or ""
    if found.verified:
        return True, Reason.PLAN_HELD, message
    fallback = (found.offloaded_layers or 0) < (found.planned_layers or 0)
    return False, Reason.FEWER_LAYERS_OFFLOADED if fallback else Reason.MEMORY_ABOVE_PLAN, message


def compute(qm: api.QuantizedModel, states: Sequence[findings.BuildState],
            serving_state: findings.ServingState | None, now: datetime.datetime) -> api.QuantizedModelStatus:
    generation = qm.metadata.generation
    old = qm.status or api.QuantizedModelStatus()
    quantized = _quantized(states)
    evaluated = _evaluated(states)
    conditions = list(old.conditions or [])
    new = [_condition(api.ConditionType.QUANTIZED, *quantized, generation, now),
           _condition(api.ConditionType.EVALUATED, *evaluated, generation, now)]
    if serving_state is not None:
        new.append(_condition(api.ConditionType.SERVING, serving_state.ready, serving_state.reason,
                              serving_state.message, generation, now))
        ready = serving_state.ready
        ready_reason, ready_message = serving_state.reason, serving_state.message
    else:
        ready = quantized[0]
        ready_reason, ready_message = quantized[1], quantized[2]
    new.append(_condition(api.ConditionType.READY, ready, ready_reason, ready_message, generation, now))
    verified = _plan_verified(serving_state)
    if verified is not None:
        new.append(_condition(api.ConditionType.PLAN_VERIFIED, *verified, generation, now))
    elif serving_state is not None and serving_state.serving is not None:
        # a new rollout: the last pod's verdict no longer speaks for what is served
        conditions = [c for c in conditions if c.type != api.ConditionType.PLAN_VERIFIED.value]
    # kstatus (Flux, kubectl wait, Argo CD's generic check): Stalled=True ends the wait with a
    # failure, Reconciling=True says work is under way.
    stalled = not ready and (quantized[1].stalled or ready_reason.stalled)
    new.append(_condition(api.ConditionType.STALLED, stalled, ready_reason if stalled else Reason.NOT_STALLED,
                          ready_message if stalled else "", generation, now))
    new.append(_condition(api.ConditionType.RECONCILING, not ready and not stalled,
                          ready_reason if not ready and not stalled else Reason.RECONCILED,
                          ready_message if not ready and not stalled else "", generation, now))
    for condition in new:
        conditions = api.set_condition(conditions, condition)
    return api.QuantizedModelStatus(
        observed_generation=generation, phase=_phase(states, serving_state, quantized[0]),
        progress=progress_line(states), conditions=conditions,
        variants=[variant_status(s) for s in states],
        serving=None if qm.spec.serving is None  # nothing is served once spec.serving is gone
        else serving_state.serving if serving_state is not None and serving_state.serving is not None
        else old.serving,
        kopf=old.kopf,
    )
