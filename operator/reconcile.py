"""One idempotent pass over a QuantizedModel: observe, decide, act, report.

Every event of the model or of an object it owns, and the periodic resync, ends here (through the
work queue in ``handlers``). The pass works from the current spec and what the watches show of the
cluster (``observed``), never from a diff, so a re-delivered event or an operator restart finds
the same answer and creates nothing twice: each build has one deterministic name, and creating an
object that exists is a no-op. It reads nothing from the API server; it writes only what changed.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import pydantic
from kquant.operator import (
    artifacts,
    build_manifests,
    builds,
    findings,
    kube,
    ledger,
    manifests,
    observed,
    policy,
    server_manifests,
    serving,
    status,
)
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
                   "InvalidSpec", policy.REASON}


def observe_build(qm: api.QuantizedModel, build: builds.Build, children: observed.Children) -> findings.BuildState:
    """Where one build stands, from its ConfigMap, its Job and its pods as the watches show them."""
    data = children.build_data(build.name) or {}
    parsed, report = artifacts.parse_report(data.get("report"), build.variant)
    if parsed is not None and parsed.status is quantizer_report.BuildStatus.SUCCEEDED and report is not None:
        return findings.BuildState(build, findings.BuildPhase.SUCCEEDED, report=report)
    if parsed is not None and parsed.status is quantizer_report.BuildStatus.FAILED:
        reason = parsed.reason or "the quantizer reported a failure"
        return findings.BuildState(build, findings.BuildPhase.FAILED, reason=reason)
    job = children.jobs.get(build.name)
    if job is None:
        return findings.BuildState(build, findings.BuildPhase.QUEUED)
    if job.failed is not None:
        last_words = children.last_words(build.name)
        reason = f"Job {build.name} failed ({job.failed[0]}: {job.failed[1]})"
        return findings.BuildState(build, findings.BuildPhase.FAILED,
                                   reason=f"{reason}: {last_words}" if last_words else reason)
    waiting = children.waiting(build.name)
    if waiting is not None and waiting[0] in WAITING_REASONS:
        # Not a failure: the Job keeps its pod, and the kubelet starts it once the cause is fixed.
        return findings.BuildState(build, findings.BuildPhase.BLOCKED,
                                   reason=_blocked_message(qm, build, waiting[0], waiting[1]))
    return findings.BuildState(build, findings.BuildPhase.RUNNING, progress=data.get("progress", ""))


CAPACITY_REASONS = frozenset({"DoesNotFit", "NoGPUNodes"})
"""Serving reasons that a new node, a relabelled node or a freed GPU may resolve."""


def waits_for_capacity(body: Mapping[str, Any]) -> bool:
    """The model cannot be served until the cluster changes: worth a pass when it does."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == api.ConditionType.SERVING.value and c.get("reason") in CAPACITY_REASONS
               for c in conditions)


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
                     states: list[findings.BuildState]) -> list[findings.BuildState]:
    """Builds of one model run one at a time: they share the download, the 16-bit GGUF and the
    importance matrix on the storage volume, and usually the same GPU."""
    if any(s.phase in (findings.BuildPhase.RUNNING, findings.BuildPhase.BLOCKED) for s in states):
        return states
    queued = next((i for i, s in enumerate(states) if s.phase is findings.BuildPhase.QUEUED), None)
    if queued is None:
        return states
    result = list(states)
    build = states[queued].build
    others = [s for i, s in enumerate(states) if i != queued]
    refusals = _build_refusals(client, qm)
    if refusals:
        result[queued] = findings.BuildState(build, findings.BuildPhase.BLOCKED,
                                             reason="refused by the platform policy: " + "; ".join(refusals))
        return result
    if all(s.phase is findings.BuildPhase.SUCCEEDED for s in others):
        build = builds.discarding_intermediates(build, qm)
    created = [client.create(manifest) for manifest in build_manifests.objects(qm, build, client.settings)]
    if created[-1] is not None:  # the Job; None when a pass before this one made it
        log.info("QuantizedModel %s/%s: started build %s", qm.metadata.namespace, qm.metadata.name, build.name)
    result[queued] = findings.BuildState(build, findings.BuildPhase.RUNNING, progress="starting")
    return result


def _build_refusals(client: kube.Kube, qm: api.QuantizedModel) -> list[str]:
    """The platform's rules, checked again before each build starts: the admission policy only
    sees objects created or changed after it was installed or narrowed."""
    rules = client.settings.policy
    refusals = policy.build_refusals(qm, rules)
    ref = qm.spec.source.hub.token_secret_ref
    if ref is not None and rules.hub_token_label:
        refusal = policy.token_refusal(qm, rules, client.secret_labels(qm.metadata.namespace or "", ref.name))
        refusals += [refusal] if refusal else []
    return refusals


def serve(client: kube.Kube, qm: api.QuantizedModel, states: list[findings.BuildState],
          children: observed.Children, view: ClusterView) -> findings.ServingState | None:
    """How serving stands (None without ``spec.serving``): the promoted variant is rolled out once
    it is built and passed its gate, whenever the Deployment's hash or the recorded serving status
    says it serves something else; until then, whatever serves keeps serving."""
    spec = qm.spec.serving
    if spec is None:
        return None
    current = children.deployments.get(server_manifests.deployment_name(qm))
    served = current.variant if current else None
    keeps = f"; {served} keeps serving" if served and served != spec.variant else ""
    state = next(s for s in states if s.build.variant == spec.variant)
    if state.phase is not findings.BuildPhase.SUCCEEDED or state.report is None:
        reason = "BuildFailed" if state.phase is findings.BuildPhase.FAILED else "VariantNotBuilt"
        return findings.ServingState(False, reason, f"variant {spec.variant} is not built yet{keeps}")
    if not state.report.gate_passed:
        why = "; ".join(state.report.gate.reasons) if state.report.gate else "quality gate failed"
        return findings.ServingState(False, "GateFailed",
                                     f"variant {spec.variant} failed its quality gate ({why}){keeps}")
    artifact = artifacts.from_report(state.build, state.report)
    wanted = server_manifests.serving_hash(qm, artifact)
    old = qm.status.serving if qm.status else None
    if current is None or current.serving_hash != wanted or old is None or old.variant != spec.variant:
        outcome = _roll_out(client, qm, artifact, state.report, view)
        if isinstance(outcome, serving.NoFit):
            return findings.ServingState(False, outcome.reason, outcome.message + keeps)
        current, candidate = outcome
        old = status.serving_status(qm, artifact, candidate)
    ready = current.ready(spec.replicas)
    serving_status = old.model_copy(update={"ready_replicas": current.ready_replicas}) if old else None
    if ready:
        return findings.ServingState(True, "Serving", f"variant {spec.variant} is served at "
                                     f"{serving_status.endpoint if serving_status else ''}", serving_status)
    return findings.ServingState(False, "RollingOut", f"rolling out variant {spec.variant}{keeps}",
                                 serving_status, rolling_out=True)


def _roll_out(client: kube.Kube, qm: api.QuantizedModel, artifact: artifacts.Artifact,
              report: quantizer_report.VariantReport,
              view: ClusterView) -> tuple[observed.ServerDeployment, serving.Candidate | None] | serving.NoFit:
    """Place ``artifact`` (on a GPU pool, or on CPU when the spec asks for no GPUs) and apply its
    Deployment and Service; returns the Deployment as stored and where it went."""
    spec = qm.spec.serving
    assert spec is not None
    refusals = policy.serving_refusals(qm, client.settings.policy)
    if refusals:  # admitted before the platform narrowed the allowed images
        return serving.NoFit(policy.REASON, "; ".join(refusals))
    candidate: serving.Candidate | None = None
    found: list[serving.Candidate] = []
    if spec.gpus:
        if report.facts is None:
            return serving.NoFit("NoModelFacts", f"the build report of {artifact.variant} has no GGUF facts")
        facts = gguf_facts.ModelFacts.model_validate(report.facts)
        found = serving.candidates(qm, facts, view.nodes, view.pods)
        candidate = serving.choose(found)
        if candidate is None:
            return serving.no_fit(qm, found, facts)
    deployment = server_manifests.deployment(qm, artifact, candidate, serving.surge_fits(candidate, found),
                                             client.settings)
    stored = client.apply(deployment)
    client.apply(server_manifests.service(qm))
    log.info("QuantizedModel %s/%s: rolling out %s", qm.metadata.namespace, qm.metadata.name, artifact.variant)
    return observed.server_deployment(stored, manifests.VARIANT_LABEL, server_manifests.HASH_ANNOTATION), candidate


def _invalid(client: kube.Kube, body: Mapping[str, Any], exc: pydantic.ValidationError) -> ledger.Written | None:
    """A body the API server took but the models refuse (a CRD older than the operator): say so
    in status, once per generation."""
    meta = body.get("metadata") or {}
    message = "; ".join(api.describe_errors(exc))[:2000]
    old = body.get("status") or {}
    if old.get("observedGeneration") == meta.get("generation") and any(
            c.get("reason") == "InvalidSpec" and c.get("message") == message for c in old.get("conditions") or []):
        return None
    now = datetime.datetime.now(datetime.UTC)
    condition = api.Condition(type="Ready", status=api.ConditionStatus.FALSE, reason="InvalidSpec",
                              message=message, last_transition_time=now,
                              observed_generation=meta.get("generation"))
    patch = {"phase": "Failed", "observedGeneration": meta.get("generation"),
             "conditions": [condition.model_dump(mode="json", by_alias=True, exclude_none=True)]}
    return ledger.Written(client.patch_status(str(meta.get("namespace")), str(meta.get("name")), patch), patch)


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


def reconcile(client: kube.Kube, body: Mapping[str, Any], children: observed.Children,
              view: ClusterView) -> ledger.Written | None:
    """One pass; returns the status it wrote with the resourceVersion it got (None if it wrote
    nothing), so that the next pass need not wait for the watch to show it."""
    try:
        qm = api.QuantizedModel.model_validate(body)
    except pydantic.ValidationError as exc:
        return _invalid(client, body, exc)
    namespace = qm.metadata.namespace or ""
    claim = manifests.storage_claim(qm)
    if claim is not None and claim["metadata"]["name"] not in children.claims:
        client.create(claim)
    states = [observe_build(qm, b, children) for b in builds.plan_builds(qm, namespace)]
    states = start_next_build(client, qm, states)
    serving_state = serve(client, qm, states, children, view)
    new = status.compute(qm, states, serving_state, datetime.datetime.now(datetime.UTC))
    if qm.status is not None and new.to_patch() == qm.status.to_patch():
        return None
    _announce(client, qm, new)
    patch = new.to_patch()
    return ledger.Written(client.patch_status(namespace, qm.metadata.name, patch), patch)
