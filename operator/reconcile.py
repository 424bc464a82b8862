"""One idempotent pass over a QuantizedModel: observe, decide, act, report.

Create, update, resume, the safety-net timer and every event of a child object (a build's
ConfigMap or Job, the server Deployment) end here. The pass works from the current spec and the
current cluster state, never from a diff, so a re-delivered event or an operator restart finds
the same answer and creates nothing twice: each build has one deterministic name, and creating an
object that exists is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

import pydantic
from kquant.operator import builds, kube, manifests, serving, status
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import gguf_facts
from kquant.quantizer import report as quantizer_report

log = logging.getLogger("kquant.operator")


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """Nodes and GPU-holding pods as plain dicts, from the operator's watch-fed indexes."""

    nodes: list[dict[str, Any]]
    pods: list[dict[str, Any]]
WARNING_REASONS = {"BuildFailed", "SecretNotFound", "BuildBlocked", "GateFailed", "DoesNotFit", "NoGPUNodes",
                   "InvalidSpec"}


def observe_build(client: kube.Kube, qm: api.QuantizedModel, build: builds.Build) -> status.BuildState:
    namespace = qm.metadata.namespace or ""
    data = client.configmap_data(namespace, build.name) or {}
    parsed, report = status.parse_report(data.get("report"), build.variant)
    if parsed is not None and parsed.status is quantizer_report.BuildStatus.SUCCEEDED and report is not None:
        return status.BuildState(build, status.BuildPhase.SUCCEEDED, report=report)
    if parsed is not None and parsed.status is quantizer_report.BuildStatus.FAILED:
        reason = parsed.reason or "the quantizer reported a failure"
        return status.BuildState(build, status.BuildPhase.FAILED, reason=reason)
    job = client.job(namespace, build.name)
    if job is None:
        return status.BuildState(build, status.BuildPhase.QUEUED)
    failed = next((c for c in job.status.conditions or [] if c.type == "Failed" and c.status == "True"), None)
    if failed is not None:
        last_words = client.failed_pod_message(namespace, build.name)
        reason = f"Job {build.name} failed ({failed.reason}: {failed.message})"
        return status.BuildState(build, status.BuildPhase.FAILED,
                                 reason=f"{reason}: {last_words}" if last_words else reason)
    waiting = client.build_pod_waiting(namespace, build.name)
    if waiting is not None and waiting[0] in WAITING_REASONS:
        # Not a failure: the Job keeps its pod, and the kubelet starts it once the cause is fixed.
        return status.BuildState(build, status.BuildPhase.BLOCKED,
                                 reason=_blocked_message(qm, build, waiting[0], waiting[1]))
    return status.BuildState(build, status.BuildPhase.RUNNING, progress=data.get("progress", ""))


WAITING_REASONS = {"CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                   "ErrImageNeverPull", "CreateContainerError"}
"""Container waiting reasons that need a person; a build pod showing one is blocked, not running."""


def _blocked_message(qm: api.QuantizedModel, build: builds.Build, reason: str, message: str) -> str:
    """The kubelet's words, plus the fix when it is the token Secret that is missing."""
    ref = qm.spec.source.hub.token_secret_ref
    text = f"the build pod of {build.variant} cannot start ({reason}): {message}"
    if reason == "CreateContainerConfigError" and ref is not None and f'"{ref.name}"' in message:
        field = "huggingface" if qm.spec.source.huggingface else "gguf"
        text += (f"; spec.source.{field}.tokenSecretRef names Secret {ref.name!r} (key {ref.key!r}) in namespace "
                 f"{qm.metadata.namespace}: create it with kubectl create secret generic {ref.name} "
                 f"--from-literal={ref.key}=<token>; the build starts by itself once it exists")
    return text


def start_next_build(client: kube.Kube, qm: api.QuantizedModel,
                     states: list[status.BuildState]) -> list[status.BuildState]:
    """Builds of one model run one at a time: they share the download, the 16-bit GGUF and the
    importance matrix on the storage volume, and usually the same GPU."""
    if any(s.phase in (status.BuildPhase.RUNNING, status.BuildPhase.BLOCKED) for s in states):
        return states
    queued = next((i for i, s in enumerate(states) if s.phase is status.BuildPhase.QUEUED), None)
    if queued is None:
        return states
    result = list(states)
    build = states[queued].build
    for manifest in manifests.build_objects(qm, build, client.settings):
        client.create(manifest)
    log.info("QuantizedModel %s/%s: started build %s", qm.metadata.namespace, qm.metadata.name, build.name)
    result[queued] = status.BuildState(build, status.BuildPhase.RUNNING, progress="starting")
    return result


def _deployment_ready(deployment: object, replicas: int) -> tuple[bool, int]:
    spec_status = getattr(deployment, "status", None)
    meta = getattr(deployment, "metadata", None)
    if spec_status is None or meta is None:
        return False, 0
    observed = (spec_status.observed_generation or 0) >= (meta.generation or 0)
    updated = spec_status.updated_replicas or 0
    available = spec_status.available_replicas or 0
    total = spec_status.replicas or 0
    ready = observed and updated >= replicas and available >= replicas and total == replicas
    return ready, spec_status.ready_replicas or 0


def serve(client: kube.Kube, qm: api.QuantizedModel, states: list[status.BuildState],
          view: ClusterView | None) -> status.ServingState | None:
    spec = qm.spec.serving
    if spec is None:
        return None
    namespace = qm.metadata.namespace or ""
    current = client.deployment(namespace, serving.deployment_name(qm))
    served = current.spec.template.metadata.labels.get(manifests.VARIANT_LABEL) if current else None
    keeps = f"; {served} keeps serving" if served and served != spec.variant else ""
    state = next(s for s in states if s.build.variant == spec.variant)
    if state.phase is not status.BuildPhase.SUCCEEDED or state.report is None:
        reason = "BuildFailed" if state.phase is status.BuildPhase.FAILED else "VariantNotBuilt"
        return status.ServingState(False, reason, f"variant {spec.variant} is not built yet{keeps}")
    if not state.report.gate_passed:
        why = "; ".join(state.report.gate.reasons) if state.report.gate else "quality gate failed"
        return status.ServingState(False, "GateFailed",
                                   f"variant {spec.variant} failed its quality gate ({why}){keeps}")
    variant = status.variant_status(state)
    wanted = serving.serving_hash(qm, variant)
    old = qm.status.serving if qm.status else None
    if current is None or (current.metadata.annotations or {}).get("kquant.dev/serving-hash") != wanted \
            or old is None or old.variant != spec.variant:
        outcome = _roll_out(client, qm, variant, state.report, view)
        if isinstance(outcome, serving.NoFit):
            return status.ServingState(False, outcome.reason, outcome.message + keeps)
        current, old = client.deployment(namespace, serving.deployment_name(qm)), outcome
    ready, ready_replicas = _deployment_ready(current, spec.replicas)
    serving_status = old.model_copy(update={"ready_replicas": ready_replicas}) if old else None
    if ready:
        return status.ServingState(True, "Serving", f"variant {spec.variant} is served at "
                                   f"{serving_status.endpoint if serving_status else ''}", serving_status)
    return status.ServingState(False, "RollingOut", f"rolling out variant {spec.variant}{keeps}",
                               serving_status, rolling_out=True)


def _roll_out(client: kube.Kube, qm: api.QuantizedModel, variant: api.VariantStatus,
              report: quantizer_report.VariantReport, view: ClusterView | None) -> api.ServingStatus | serving.NoFit:
    spec = qm.spec.serving
    assert spec is not None
    candidate: serving.Candidate | None = None
    found: list[serving.Candidate] = []
    if spec.gpus:
        if report.facts is None:
            return serving.NoFit("NoModelFacts", f"the build report of {variant.name} has no GGUF facts")
        facts = gguf_facts.ModelFacts.model_validate(report.facts)
        if view is None:  # no watch-fed indexes (a one-off call): ask the API server
            node_list, pods = client.nodes_and_pods()
        else:
            node_list, pods = view.nodes, view.pods
        found = serving.candidates(qm, facts, node_list, pods)
        candidate = serving.choose(found)
        if candidate is None:
            return serving.no_fit(qm, found, facts)
    plan = serving.build(qm, variant, candidate, serving.surge_fits(candidate, found), client.settings)
    client.apply(plan.deployment)
    client.apply(plan.service)
    log.info("QuantizedModel %s/%s: rolling out %s", qm.metadata.namespace, qm.metadata.name, variant.name)
    return plan.status


def _invalid(client: kube.Kube, body: dict[str, object], exc: pydantic.ValidationError) -> None:
    meta = body.get("metadata") or {}
    assert isinstance(meta, dict)
    message = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                        if e["loc"] and e["loc"][0] == "spec" else f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                        for e in exc.errors())[:2000]
    now = datetime.datetime.now(datetime.UTC)
    condition = api.Condition(type="Ready", status=api.ConditionStatus.FALSE, reason="InvalidSpec",
                              message=message, last_transition_time=now,
                              observed_generation=meta.get("generation"))
    client.patch_status(str(meta.get("namespace")), str(meta.get("name")), {
        "phase": "Failed", "observedGeneration": meta.get("generation"),
        "conditions": [condition.model_dump(mode="json", by_alias=True, exclude_none=True)]})


def _announce(client: kube.Kube, qm: api.QuantizedModel, new: api.QuantizedModelStatus) -> None:
    """An Event when Ready changes, and a Warning for each failure a user must act on (events cost
    API calls, so the other conditions' routine moves stay in status only)."""
    old = {c.type: (c.status, c.reason) for c in (qm.status.conditions or [])} if qm.status else {}
    for condition in new.conditions or []:
        if old.get(condition.type) == (condition.status, condition.reason):
            continue
        failing = condition.status is api.ConditionStatus.FALSE and condition.reason in WARNING_REASONS
        if not failing and condition.type != api.ConditionType.READY.value:
            continue
        client.event(qm, "Warning" if failing else "Normal", condition.reason,
                     f"{condition.type}={condition.status.value}: {condition.message}")


def reconcile(client: kube.Kube, body: dict[str, object],
              view: ClusterView | None = None) -> api.QuantizedModelStatus | None:
    try:
        qm = api.QuantizedModel.model_validate(body)
    except pydantic.ValidationError as exc:
        _invalid(client, body, exc)
        return None
    namespace = qm.metadata.namespace or ""
    claim = manifests.storage_claim(qm)
    if claim is not None:
        client.create(claim)
    states = [observe_build(client, qm, b) for b in builds.plan_builds(qm, namespace)]
    states = start_next_build(client, qm, states)
    serving_state = serve(client, qm, states, view)
    new = status.compute(qm, states, serving_state, datetime.datetime.now(datetime.UTC))
    if qm.status is None or new.to_patch() != qm.status.to_patch():
        _announce(client, qm, new)
        client.patch_status(namespace, qm.metadata.name, new.to_patch())
    return new
