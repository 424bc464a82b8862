"""One idempotent pass over a QuantizedModel: observe, decide, act, report.

Every event of the model or of an object it owns, and the periodic resync, ends here (through the
work queue in ``handlers``). The pass works from the current spec and what the watches show of the
cluster (``observed``), never from a diff, so a re-delivered event or an operator restart finds
the same answer and creates nothing twice: each build has one deterministic name, and creating an
object that exists is a no-op. It reads nothing from the API server but the keys of a ConfigMap a
build is about to mount, the learned margins at a rollout, and a Ready server pod's log until one
has been read (``check_plan``); it writes only what changed, and only through ``Writer``, so that
a unit test can run a whole pass against a recording fake.

What it decides is said with one ``findings.Reason``. An object that someone else owns, or that
the API server refuses as rendered from the spec, is a condition and a Warning Event that name
it, never an exception that the work queue would retry for ever.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import pydantic
from kquant.operator import (
    artifacts,
    build_gpus,
    build_manifests,
    builds,
    config,
    findings,
    ledger,
    manifests,
    observed,
    policy,
    server_manifests,
    serving,
    status,
)
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import check, nodes, server_log
from kquant.quantizer import gguf_facts
from kquant.quantizer import report as quantizer_report

log = logging.getLogger("kquant.operator")
Reason = findings.Reason
T = TypeVar("T")
REPORT_GRACE_SECONDS = 30.0
"""How long after its Job completed a build's final report may still be on its way: the ConfigMap
and the Job come through different watches, so the Job's completion can be seen first."""
CONFIG_RECHECK_SECONDS = 30.0
"""How soon a build blocked on a missing ConfigMap looks again (the operator does not watch users'
ConfigMaps, so no event says that it appeared)."""


class Writer(Protocol):
    """What a pass may do to the cluster. ``kube.Kube`` does it; unit tests record it."""

    @property
    def settings(self) -> config.OperatorConfig: ...

    def create(self, manifest: manifests.Manifest) -> manifests.Manifest | None:
        """Create; None when the model's own object exists. Raises ``findings.NotOwnedError`` or
        ``findings.RefusedError``."""
        ...

    def apply(self, manifest: manifests.Manifest) -> manifests.Manifest:
        """Server-side apply under kquant's field manager; raises like ``create``."""
        ...

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> str: ...

    def event(self, qm: api.QuantizedModel, kind: str, reason: str, message: str, once: str | None = None) -> None:
        """Post an Event; ``once`` names it, so a second post of the same ``once`` (a pass repeated
        after a crash between its Event and its status write) makes no second Event."""
        ...

    def delete(self, manifest: manifests.Manifest) -> bool: ...

    def model_exists(self, namespace: str, name: str, uid: str) -> bool:
        """Whether this very model (name and uid) is still in the API server, read there, not
        in the watch's copy: a pass that starts a build checks it first."""
        ...

    def config_map_keys(self, namespace: str, name: str) -> list[str] | None:
        """The keys of a user's ConfigMap, None if it does not exist (the one read a pass makes)."""
        ...

    def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """The labels of a Secret (its metadata only, never its data); None if it does not exist."""
        ...

    def pod_log(self, namespace: str, name: str, container: str) -> str | None:
        """The head of a container's log; None when it cannot be read."""
        ...

    def plan_margins(self) -> tuple[dict[str, str], str]:
        """The learned margins ConfigMap's data and a name for it (read at a rollout, not every pass)."""
        ...

    def record_margin(self, product: str, excess: int) -> None:
        """Keep ``excess`` for a GPU product when it is the largest seen."""
        ...


@dataclasses.dataclass(frozen=True)
class Result:
    """What a pass did: the status it wrote (with the resourceVersion it got, for the ledger) and
    when it wants to look again without an event (a report that may still arrive, a ConfigMap the
    operator does not watch)."""

    written: ledger.Written | None = None
    again_in: float | None = None


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """Nodes and GPU-holding pods as plain dicts, from the operator's watch-fed indexes."""

    nodes: list[dict[str, Any]]
    pods: list[dict[str, Any]]


def _age(stamp: str | None, now: datetime.datetime) -> float:
    """Seconds since an API server timestamp; 0 when there is none to read."""
    try:
        then = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (now - then).total_seconds()


def observe_build(qm: api.QuantizedModel, build: builds.Build, children: observed.Children,
                  now: datetime.datetime | None = None) -> findings.BuildState:
    """Where one build stands, from its ConfigMap, its Job and its pods as the watches show them."""
    data = children.build_data(build.name) or {}
    parsed, report = artifacts.parse_report(data.get("report"), build.variant)
    sizing = parsed.sizing if parsed is not None else None
    if parsed is not None and parsed.status is quantizer_report.BuildStatus.SUCCEEDED and report is not None:
        return findings.BuildState(build, findings.BuildPhase.SUCCEEDED, report=report, sizing=sizing)
    if parsed is not None and parsed.status is quantizer_report.BuildStatus.FAILED:
        reason = parsed.reason or "the quantizer reported a failure"
        job = children.jobs.get(build.name)
        if job is not None and not job.finished:
            # The quantizer exited 1 (a cause a rerun may not meet again) and the Job runs its next
            # pod: the build goes on. A permanent failure ends the Job at once (podFailurePolicy),
            # and the last retry's failure ends it too; either then shows as FAILED.
            return findings.BuildState(build, findings.BuildPhase.RUNNING, progress=f"retrying after: {reason}",
                                       sizing=sizing)
        return findings.BuildState(build, findings.BuildPhase.FAILED, reason=reason, why=Reason.BUILD_FAILED,
                                   sizing=sizing)
    if children.jobs.get(build.name) is None:
        return findings.BuildState(build, findings.BuildPhase.QUEUED)
    return _from_job(qm, build, children, data, now or datetime.datetime.now(datetime.UTC))


def _from_job(qm: api.QuantizedModel, build: builds.Build, children: observed.Children, data: Mapping[str, str],
              now: datetime.datetime) -> findings.BuildState:
    """A build with a Job and no final report: failed, finished without a word, blocked, or running."""
    job = children.jobs[build.name]
    if job.failed is not None:
        last_words = children.last_words(build.name)
        reason = f"Job {build.name} failed ({job.failed[0]}: {job.failed[1]})"
        return findings.BuildState(build, findings.BuildPhase.FAILED, why=Reason.BUILD_FAILED,
                                   reason=f"{reason}: {last_words}" if last_words else reason)
    if job.completed is not None and _age(job.completed, now) >= REPORT_GRACE_SECONDS:
        # The pod exited 0 but its report never reached the ConfigMap (the write was refused or
        # lost): the result is unknown, which is a failure, not a build that runs for ever.
        return findings.BuildState(build, findings.BuildPhase.FAILED, why=Reason.REPORT_MISSING, reason=(
            f"Job {build.name} completed at {job.completed} but ConfigMap {build.name} holds no final report "
            f"(the quantizer could not write it; its pod's log says why); retry the build with "
            f"kquant retry {qm.metadata.name}"))
    waiting = children.waiting(build.name)
    if waiting is not None and waiting[0] in WAITING_REASONS:
        # Not a failure: the Job keeps its pod, and the kubelet starts it once the cause is fixed.
        why, message = blocked(qm, build, waiting[0], waiting[1])
        return findings.BuildState(build, findings.BuildPhase.BLOCKED, reason=message, why=why)
    return findings.BuildState(build, findings.BuildPhase.RUNNING, progress=data.get("progress", ""))


def waits_for_capacity(body: Mapping[str, Any]) -> bool:
    """The model cannot be served until the cluster changes: worth a pass when it does."""
    conditions = (body.get("status") or {}).get("conditions") or []
    for c in conditions:
        reason = findings.reason_of(c.get("reason"))
        if c.get("type") == api.ConditionType.SERVING.value and reason is not None and reason.waits_for_capacity:
            return True
    return False


WAITING_REASONS = {"CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                   "ErrImageNeverPull", "CreateContainerError"}
"""Container waiting reasons that need a person; a build pod showing one is blocked, not running."""


_MISSING = re.compile(r'(?P<kind>secret|configmap) "(?P<name>[^"]+)" not found', re.IGNORECASE)
_NO_KEY = re.compile(r"couldn't find key (?P<key>\S+) in (?P<kind>Secret|ConfigMap) (?:(?P<ns>[^/\s]+)/)?(?P<name>\S+)",
                     re.IGNORECASE)


def _config_fields(qm: api.QuantizedModel) -> dict[str, tuple[str, str]]:
    """ConfigMap name -> (the spec field that names it, the key it asks for)."""
    fields = {}
    for field, section in (("spec.calibration.configMapRef", qm.spec.calibration),
                           ("spec.evaluation.configMapRef", qm.spec.evaluation)):
        if section is not None and section.config_map_ref is not None:
            fields[section.config_map_ref.name] = (field, section.config_map_ref.key)
    return fields


def blocked(qm: api.QuantizedModel, build: builds.Build, reason: str, message: str) -> tuple[Reason, str]:
    """Why a build pod cannot start, from the kubelet's waiting reason and message: which Secret or
    ConfigMap (or key in one) is missing, the spec field that names it, and the fix."""
    text = f"the build pod of {build.variant} cannot start ({reason}): {message}"
    if reason != "CreateContainerConfigError":
        field = "spec.quantizer.image" if "image" in reason.lower() else "spec.quantizer"
        return Reason.BUILD_BLOCKED, f"{text}; check {field}"
    found = _MISSING.search(message) or _NO_KEY.search(message)
    if found is None:
        return Reason.BUILD_BLOCKED, text
    kind, name = found["kind"].lower(), found["name"]
    key = found.groupdict().get("key")
    namespace = qm.metadata.namespace
    if kind == "secret":
        ref = qm.spec.source.hub.token_secret_ref
        if ref is not None and ref.name == name:
            field = qm.spec.source.kind
            what = f"Secret {name!r} has no key {key!r}" if key else f"Secret {name!r} does not exist"
            text += (f"; spec.source.{field}.tokenSecretRef names Secret {ref.name!r} (key {ref.key!r}) in namespace "
                     f"{namespace}: {what}; create it with kubectl create secret generic {ref.name} "
                     f"--from-literal={ref.key}=<token>; the build starts by itself once it exists")
        return Reason.SECRET_NOT_FOUND, text
    field, wanted_key = _config_fields(qm).get(name, ("the build's own ConfigMap", builds.SPEC_KEY))
    what = f"ConfigMap {name!r} has no key {key!r}" if key else f"ConfigMap {name!r} does not exist"
    return Reason.CONFIG_NOT_FOUND, (f"{text}; {field} names ConfigMap {name!r} (key {wanted_key!r}) in "
                                     f"namespace {namespace}: {what}")


def missing_config(qm: api.QuantizedModel, client: Writer) -> str | None:
    """What is missing of the ConfigMaps a build mounts (calibration and evaluation text), with
    the field that names it and the fix; None when all are there. Asked before the Job exists: a
    volume whose ConfigMap is missing keeps the pod in ContainerCreating with no word in its status."""
    namespace = qm.metadata.namespace or ""
    for name, (field, key) in _config_fields(qm).items():
        keys = client.config_map_keys(namespace, name)
        if keys is None:
            return (f"{field} names ConfigMap {name!r} in namespace {namespace}, which does not exist: create it "
                    f"with kubectl create configmap {name} --from-file={key}=<file>; the build starts by itself "
                    f"within a minute of it")
        if key not in keys:
            return (f"{field} names key {key!r} of ConfigMap {name!r} in namespace {namespace}, which has only "
                    f"{', '.join(repr(k) for k in keys) or 'no keys'}: add the key or fix {field}.key")
    return None


_USER_FIELDS = (
    ("storageClassName", "spec.storage.pvc.storageClassName"),
    ("tolerations", "{pod}.tolerations"),
    ("nodeSelector", "{pod}.nodeSelector"),
    ("image", "{pod}.image"),
    ("resources", "{pod}.resources"),
    ("args", "spec.serving.extraArgs"),
    ("metadata.labels", "metadata.name (child objects are labelled with it)"),
    ("metadata.name", "metadata.name (child objects are named after it)"),
)


def refusal(error: findings.RefusedError) -> str:
    """The API server's refusal with the spec field that the refused value came from."""
    pod = "spec.serving" if error.kind in ("Deployment", "Service") else "spec.quantizer"
    field = next((user.format(pod=pod) for child, user in _USER_FIELDS if child in error.message), "the spec")
    return (f"the API server refused {error.kind} {error.name}, which the operator renders from {field}: "
            f"{error.message}; fix {field}")


def conflict(error: findings.NotOwnedError) -> str:
    return (f"{error}: the operator neither uses nor changes it; delete or rename it, or rename the "
            f"QuantizedModel")


def attempt(action: Callable[[], T]) -> T | findings.Problem:
    """``action()``, or the problem when the object is someone else's or refused."""
    try:
        return action()
    except findings.NotOwnedError as exc:
        return findings.Problem(Reason.CONFLICT, conflict(exc))
    except findings.RefusedError as exc:
        return findings.Problem(Reason.REFUSED, refusal(exc))


def _still_there(client: Writer, qm: api.QuantizedModel) -> bool:
    """Whether the API server still has this model. The index may hold one whose deletion is
    under way (the watch's DELETED event not yet handled): a build started for it would make a
    Job, its ServiceAccount and its ConfigMap owned by a model that is gone, which run, or fail,
    until the garbage collector finds them. One read, made only when a build is about to start."""
    if client.model_exists(qm.metadata.namespace or "", qm.metadata.name, qm.metadata.uid or ""):
        return True
    log.info("QuantizedModel %s/%s: gone from the API server; no build started", qm.metadata.namespace,
             qm.metadata.name)
    return False


@dataclasses.dataclass(frozen=True)
class Sized:
    """Where the model's sizing stands: what its builds need, or why none may start yet."""

    summary: quantizer_report.SizingSummary | None = None
    """None: not known (no listing; the builds run on the spec's own requests, as before)."""
    pending: bool = False
    """The sizing Job is to be made, or runs: the next build waits for it."""
    refusal: str | None = None
    """The claim cannot hold the builds, in words with the numbers."""


def parse_listing(data: str | None) -> quantizer_report.SourceListing | None:
    """The sizing Job's result from its ConfigMap; None while there is none or it is not one."""
    if not data:
        return None
    try:
        return quantizer_report.SourceListing.model_validate_json(data)
    except ValueError:
        return None


def read_sizing(qm: api.QuantizedModel, step: builds.SizingStep, children: observed.Children,
                now: datetime.datetime, node_list: Sequence[Mapping[str, Any]] = ()) -> Sized:
    """The builds' sizing from the sizing Job's listing. A listing the Job could not make (the hub
    refused, a repository that does not exist) holds nothing back: the build's own fetch step meets
    the same problem and reports it in the words users already know."""
    listing = parse_listing((children.build_data(step.name) or {}).get(LISTING_KEY))
    if listing is not None and listing.status is quantizer_report.BuildStatus.SUCCEEDED:
        found, gpus = build_gpus.size_from_listing(qm, listing, node_list)
        summary = quantizer_report.SizingSummary.from_sizing(found, gpus.product)
        return Sized(summary, refusal=builds.claim_shortfall(qm, found))
    if listing is not None:
        return Sized()
    job = children.jobs.get(step.name)
    if job is None:
        return Sized(pending=True)
    if job.failed is not None or (job.completed is not None and _age(job.completed, now) >= REPORT_GRACE_SECONDS):
        return Sized()
    return Sized(pending=True)


LISTING_KEY = "listing"
"""Key of the sizing Job's result in its ConfigMap (``kquant-quantize size``)."""


def _size(client: Writer, qm: api.QuantizedModel, children: observed.Children,
          now: datetime.datetime, node_list: Sequence[Mapping[str, Any]]) -> Sized | findings.Problem:
    """The sizing for the next build, making the sizing Job when there is none yet."""
    step = builds.plan_sizing(qm, qm.metadata.namespace or "")
    sized = read_sizing(qm, step, children, now, node_list)
    if sized.pending and step.name not in children.jobs:
        for manifest in build_manifests.sizing_objects(qm, step, client.settings):
            outcome = attempt(functools.partial(client.create, manifest))
            if isinstance(outcome, findings.Problem):
                return outcome
        log.info("QuantizedModel %s/%s: sizing the builds (%s)", qm.metadata.namespace, qm.metadata.name, step.name)
    return sized


def _hold(client: Writer, qm: api.QuantizedModel, build: builds.Build, children: observed.Children | None,
          now: datetime.datetime | None, node_list: Sequence[Mapping[str, Any]]
          ) -> findings.BuildState | quantizer_report.SizingSummary | None:
    """What keeps ``build`` from starting now (a missing ConfigMap, the platform's policy, the sizing
    Job still running, a claim that is too small), as its state; else the sizing of its Job."""
    missing = missing_config(qm, client)
    if missing is not None:
        return findings.BuildState(build, findings.BuildPhase.BLOCKED, reason=missing, why=Reason.CONFIG_NOT_FOUND)
    refusals = _build_refusals(client, qm)
    if refusals:
        return findings.BuildState(build, findings.BuildPhase.BLOCKED,
                                   reason="refused by the platform policy: " + "; ".join(refusals),
                                   why=Reason.POLICY_VIOLATION)
    return None if children is None else _sizing_hold(client, qm, build, children, now, node_list)


def _sizing_hold(client: Writer, qm: api.QuantizedModel, build: builds.Build, children: observed.Children,
                 now: datetime.datetime | None, node_list: Sequence[Mapping[str, Any]],
                 ) -> findings.BuildState | quantizer_report.SizingSummary | None:
    sized = _size(client, qm, children, now or datetime.datetime.now(datetime.UTC), node_list)
    if isinstance(sized, findings.Problem):
        return findings.BuildState(build, findings.BuildPhase.BLOCKED, reason=sized.message, why=sized.why)
    if sized.pending:
        # The sizing pod mounts what a build pod mounts of the user's (the token's Secret): a missing
        # one holds it in the kubelet's waiting state, which says the same as it would of the build.
        waiting = children.waiting(builds.plan_sizing(qm, qm.metadata.namespace or "").name)
        if waiting is not None and waiting[0] in WAITING_REASONS:
            why, message = blocked(qm, build, waiting[0], waiting[1])
            return findings.BuildState(build, findings.BuildPhase.BLOCKED, reason=message, why=why)
        return findings.BuildState(build, findings.BuildPhase.RUNNING,
                                   progress="sizing: listing the source (no download yet)")
    if sized.refusal is not None:
        return findings.BuildState(build, findings.BuildPhase.BLOCKED, reason=sized.refusal,
                                   why=Reason.CLAIM_TOO_SMALL)
    return sized.summary


def start_next_build(client: Writer, qm: api.QuantizedModel, states: list[findings.BuildState],
                     children: observed.Children | None = None, now: datetime.datetime | None = None,
                     view: ClusterView | None = None) -> list[findings.BuildState]:
    """Builds of one model run one at a time: they share the download, the 16-bit GGUF and the
    importance matrix on the storage volume, and usually the same GPU. With ``children`` (what
    the watches show) the first one waits for the model's sizing Job (``_size``)."""
    if any(s.phase in (findings.BuildPhase.RUNNING, findings.BuildPhase.BLOCKED) for s in states):
        return states
    queued = next((i for i, s in enumerate(states) if s.phase is findings.BuildPhase.QUEUED), None)
    if queued is None or not _still_there(client, qm):
        return states
    result = list(states)
    build = states[queued].build
    others = [s for i, s in enumerate(states) if i != queued]
    if all(s.phase is findings.BuildPhase.SUCCEEDED for s in others):
        build = builds.discarding_intermediates(build, qm)
    # An earlier build of this model sized the builds from the hub's listing: later Jobs get its numbers.
    earlier = next((s.sizing for s in states if s.sizing is not None), None)
    held = _hold(client, qm, build, children, now, view.nodes if view else [])
    if isinstance(held, findings.BuildState):
        result[queued] = held
        return result
    sizing = held or earlier
    token = (qm.metadata.annotations or {}).get(observed.RETRY_ANNOTATION)
    started = False
    for manifest in build_manifests.objects(qm, build, client.settings, sizing):
        if token and manifest["kind"] == "ConfigMap":
            manifest["metadata"] = {**manifest["metadata"], "annotations": {observed.RETRY_ANNOTATION: token}}
        outcome = attempt(functools.partial(client.create, manifest))
        if isinstance(outcome, findings.Problem):
            result[queued] = findings.BuildState(build, findings.BuildPhase.BLOCKED, reason=outcome.message,
                                                 why=outcome.why)
            return result
        if manifest["kind"] == "Job" and outcome is not None:  # None: a pass before this one made it
            started = True
            log.info("QuantizedModel %s/%s: started build %s", qm.metadata.namespace, qm.metadata.name, build.name)
    if started and sizing is not None:
        for problem in build_manifests.undersized(qm, sizing):
            client.event(qm, "Warning", Reason.BUILD_UNDERSIZED, f"build {build.name}: {problem}",
                         once=hashlib.sha256(f"{qm.metadata.uid}\0{build.name}\0{problem}".encode()).hexdigest()[:16])
    result[queued] = findings.BuildState(build, findings.BuildPhase.RUNNING, progress="starting")
    return result


def _build_refusals(client: Writer, qm: api.QuantizedModel) -> list[str]:
    """The platform's rules, checked again before each build starts: the admission policy only
    sees objects created or changed after it was installed or narrowed."""
    rules = client.settings.policy
    refusals = policy.build_refusals(qm, rules)
    ref = qm.spec.source.hub.token_secret_ref
    if ref is not None and rules.hub_token_label:
        refusal = policy.token_refusal(qm, rules, client.secret_labels(qm.metadata.namespace or "", ref.name))
        refusals += [refusal] if refusal else []
    return refusals


def serve(client: Writer, qm: api.QuantizedModel, states: list[findings.BuildState],
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
    unservable = _unservable(spec.variant, state, keeps)
    if unservable is not None or state.report is None:
        return unservable
    artifact = artifacts.from_report(state.build, state.report)
    wanted = server_manifests.serving_hash(qm, artifact)
    old = qm.status.serving if qm.status else None
    if current is None or current.serving_hash != wanted or old is None or old.variant != spec.variant:
        outcome = _roll_out(client, qm, artifact, state.report, view, [p.name for p in children.server_pods])
        if isinstance(outcome, serving.NoFit):
            return findings.ServingState(False, outcome.reason, outcome.message + keeps)
        if isinstance(outcome, findings.Problem):
            return findings.ServingState(False, outcome.why, f"{outcome.message}{keeps}")
        current, candidate = outcome
        facts = gguf_facts.ModelFacts.model_validate(state.report.facts) if state.report.facts else None
        old = status.serving_status(qm, artifact, candidate, facts)
    ready = current.ready(spec.replicas)
    serving_status = old.model_copy(update={"ready_replicas": current.ready_replicas}) if old else None
    if serving_status is not None:
        serving_status = check_plan(client, qm, serving_status, artifact, children, view)
    if ready:
        return findings.ServingState(True, Reason.SERVING, f"variant {spec.variant} is served at "
                                     f"{serving_status.endpoint if serving_status else ''}", serving_status)
    return findings.ServingState(False, Reason.ROLLING_OUT, f"rolling out variant {spec.variant}{keeps}",
                                 serving_status, rolling_out=True)


SERVER_CONTAINER = "llama-server"


def check_plan(client: Writer, qm: api.QuantizedModel, served: api.ServingStatus, artifact: artifacts.Artifact,
               children: observed.Children, view: ClusterView) -> api.ServingStatus:
    """Measure the plan on the first Ready server pod of ``artifact`` whose log was not read yet:
    llama-server's startup log (pods/log) against the prediction recorded at rollout. Each pod is
    read once (its uid is kept in status); a log that cannot be read (a node without a kubelet
    log endpoint, a container gone) leaves the check for a later pod, and costs no retry."""
    found = served.plan_check
    if found is None or found.devices is None:
        return served
    pods = [p for p in children.server_pods if p.ready and artifact.digest and p.digest == artifact.digest[:16]]
    if found.pod_uid and any(p.uid == found.pod_uid for p in children.server_pods):
        return served  # this pod was read: once per pod
    predicted = status.prediction(found)
    if not pods or predicted is None:
        return served
    pod = pods[0]
    text = client.pod_log(qm.metadata.namespace or "", pod.name, SERVER_CONTAINER)
    if text is None:
        return served
    try:
        measured = server_log.parse(text)
    except server_log.LogError as exc:
        log.info("QuantizedModel %s/%s: pod %s: %s", qm.metadata.namespace, qm.metadata.name, pod.name, exc)
        return served
    result = check.compare(predicted, measured)
    labels = next((((n.get("metadata") or {}).get("labels") or {}) for n in view.nodes
                   if (n.get("metadata") or {}).get("name") == pod.node), {})
    product = labels.get(nodes.LabelKeys().product)
    log.info("QuantizedModel %s/%s: plan check of pod %s: %s", qm.metadata.namespace, qm.metadata.name,
             pod.name, result.message())
    if product and result.largest_gpu_excess > 0:
        client.record_margin(product, result.largest_gpu_excess)
    return served.model_copy(update={"plan_check": status.measured_check(found, result, pod.name, pod.uid,
                                                                         pod.node, product)})


def _unservable(variant: str, state: findings.BuildState, keeps: str) -> findings.ServingState | None:
    """Why the promoted variant cannot be rolled out yet, from its build; None when it can."""
    if state.phase in (findings.BuildPhase.FAILED, findings.BuildPhase.BLOCKED):
        # The build's own reason (a missing Secret, a conflict), so that Ready says what to fix.
        return findings.ServingState(False, state.why or Reason.BUILD_FAILED,
                                     f"variant {variant} cannot be built: {state.reason}{keeps}")
    if state.phase is not findings.BuildPhase.SUCCEEDED or state.report is None:
        return findings.ServingState(False, Reason.VARIANT_NOT_BUILT, f"variant {variant} is not built yet{keeps}")
    if state.report.format != api.VariantFormat.GGUF:
        # the API refuses it; an object stored before that rule still must not reach llama-server
        return findings.ServingState(False, Reason.NOT_SERVABLE, f"variant {variant} is format "
                                     f"{state.report.format}: llama-server serves GGUF only{keeps}")
    if not state.report.gate_passed:
        why = "; ".join(state.report.gate.reasons) if state.report.gate else "quality gate failed"
        return findings.ServingState(False, Reason.GATE_FAILED,
                                     f"variant {variant} failed its quality gate ({why}){keeps}")
    return None


def _roll_out(client: Writer, qm: api.QuantizedModel, artifact: artifacts.Artifact,
              report: quantizer_report.VariantReport, view: ClusterView, own_pods: Sequence[str] = (),
              ) -> tuple[observed.ServerDeployment, serving.Candidate | None] | serving.NoFit | findings.Problem:
    """Place ``artifact`` (on a GPU pool, or on CPU when the spec asks for no GPUs) and apply its
    Deployment and Service; returns the Deployment as stored and where it went. ``own_pods``: the
    model's server pods, whose GPUs the new rollout may take over."""
    spec = qm.spec.serving
    assert spec is not None
    refusals = policy.serving_refusals(qm, client.settings.policy)
    if refusals:  # admitted before the platform narrowed the allowed images
        return serving.NoFit(Reason.POLICY_VIOLATION, "; ".join(refusals))
    candidate: serving.Candidate | None = None
    found: list[serving.Candidate] = []
    if spec.gpus:
        if report.facts is None:
            return serving.NoFit(Reason.NO_MODEL_FACTS, f"the build report of {artifact.variant} has no GGUF facts")
        facts = gguf_facts.ModelFacts.model_validate(report.facts)
        learned, source = client.plan_margins()
        found = serving.candidates(qm, facts, view.nodes, view.pods, learned, source, own=own_pods)
        candidate = serving.choose(found)
        if candidate is None:
            return serving.no_fit(qm, found, facts)
    deployment = server_manifests.deployment(qm, artifact, candidate, serving.surge_fits(candidate, found),
                                             client.settings)
    stored = attempt(functools.partial(client.apply, deployment))
    if isinstance(stored, findings.Problem):
        return stored
    service = attempt(functools.partial(client.apply, server_manifests.service(qm)))
    if isinstance(service, findings.Problem):
        return service
    log.info("QuantizedModel %s/%s: rolling out %s", qm.metadata.namespace, qm.metadata.name, artifact.variant)
    return observed.server_deployment(stored, manifests.VARIANT_LABEL, server_manifests.HASH_ANNOTATION), candidate


def _invalid(client: Writer, body: Mapping[str, Any], exc: pydantic.ValidationError) -> ledger.Written | None:
    """A body the API server took but the models refuse (a CRD older than the operator): say so
    in status, once per generation."""
    meta = body.get("metadata") or {}
    message = "; ".join(api.describe_errors(exc))[:2000]
    old = body.get("status") or {}
    if old.get("observedGeneration") == meta.get("generation") and any(
            c.get("reason") == Reason.INVALID_SPEC and c.get("message") == message
            for c in old.get("conditions") or []):
        return None
    now = datetime.datetime.now(datetime.UTC)
    condition = api.Condition(type="Ready", status=api.ConditionStatus.FALSE, reason=Reason.INVALID_SPEC.value,
                              message=message, last_transition_time=now,
                              observed_generation=meta.get("generation"))
    patch = {"phase": "Failed", "observedGeneration": meta.get("generation"),
             "conditions": [condition.model_dump(mode="json", by_alias=True, exclude_none=True)]}
    return ledger.Written(client.patch_status(str(meta.get("namespace")), str(meta.get("name")), patch), patch)


def _announce(client: Writer, qm: api.QuantizedModel, new: api.QuantizedModelStatus) -> None:
    """An Event when Ready changes, and a Warning for each failure a user must act on, once per
    reason even where several conditions carry it (events cost API calls, so the other
    conditions' routine moves stay in status only)."""
    previous = {c.type: c for c in (qm.status.conditions or [])} if qm.status else {}
    old = {kind: (c.status, c.reason) for kind, c in previous.items()}
    warned: set[str] = set()
    for condition in new.conditions or []:
        if old.get(condition.type) == (condition.status, condition.reason):
            continue
        reason = findings.reason_of(condition.reason)
        failing = condition.status is api.ConditionStatus.FALSE and reason is not None and reason.warning
        routine = not failing and condition.type != api.ConditionType.READY.value
        if routine or (failing and condition.reason in warned):
            continue
        if failing:
            warned.add(condition.reason)
        client.event(qm, "Warning" if failing else "Normal", condition.reason,
                     f"{condition.type}={condition.status.value}: {condition.message}",
                     once=transition_id(qm, condition, previous.get(condition.type)))


def transition_id(qm: api.QuantizedModel, new: api.Condition, old: api.Condition | None) -> str:
    """One name per change of a condition: the model, the condition, the state it leaves (with
    the time that state began, so the same change made again later is a new one) and the state
    it enters. The Event goes out before the status write that records the change; an operator
    killed between the two makes the same change again on its next pass, and the same name
    makes the API server refuse the second Event as AlreadyExists."""
    before = (old.status.value, old.reason, old.last_transition_time.isoformat()) if old else ("", "", "")
    parts = (qm.metadata.uid or qm.metadata.name, new.type, *before, new.status.value, new.reason)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _again_in(states: list[findings.BuildState], children: observed.Children, now: datetime.datetime) -> float | None:
    """When to look again without an event: a completed Job whose report may still be on its way,
    or a build waiting for a ConfigMap the operator does not watch."""
    waits = []
    for state in states:
        job = children.jobs.get(state.build.name)
        if state.phase is findings.BuildPhase.RUNNING and job is not None and job.completed is not None:
            waits.append(max(1.0, REPORT_GRACE_SECONDS - _age(job.completed, now)))
        if state.why is Reason.CONFIG_NOT_FOUND:
            waits.append(CONFIG_RECHECK_SECONDS)
    return min(waits) if waits else None


def _build_objects(qm: api.QuantizedModel, name: str, kinds: tuple[str, ...],
                   uids: Mapping[str, str] | None = None) -> list[manifests.Manifest]:
    """Just enough of a build's objects to name them for ``Writer.delete`` (which checks that the
    live ones are the model's, and, where ``uids`` gives one, the very object the pass saw)."""
    versions = {"Job": "batch/v1", "ConfigMap": "v1", "ServiceAccount": "v1",
                "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1"}
    found = []
    for kind in kinds:
        meta = {"name": name, "namespace": qm.metadata.namespace, "ownerReferences": [manifests.owner_reference(qm)]}
        if uids and uids.get(kind):
            meta["uid"] = uids[kind]
        found.append({"apiVersion": versions[kind], "kind": kind, "metadata": meta})
    return found


BUILD_KINDS = ("Job", "RoleBinding", "Role", "ServiceAccount", "ConfigMap")
"""A build's objects, in the order they go: the Job first, so nothing runs on a removed account."""


def retry_failed(client: Writer, qm: api.QuantizedModel, states: list[findings.BuildState],
                 children: observed.Children) -> list[findings.BuildState]:
    """A failed build whose model carries a ``kquant.dev/retry`` token it was not started under
    runs again: its Job and ConfigMap go (the report with them) and the build is queued. The
    token makes the request once-only: the new ConfigMap remembers it."""
    token = (qm.metadata.annotations or {}).get(observed.RETRY_ANNOTATION)
    if not token:
        return states
    result = []
    for found in states:
        state = found
        configmap = children.configmaps.get(state.build.name)
        # Only what the pass saw goes (by uid): a pass whose view lags behind its own retry must
        # not remove the build that the retry started.
        if state.phase is findings.BuildPhase.FAILED and configmap is not None and configmap.retry != token:
            job = children.jobs.get(state.build.name)
            uids = {"ConfigMap": configmap.uid, "Job": job.uid if job else ""}
            for manifest in _build_objects(qm, state.build.name, ("Job", "ConfigMap"), uids):
                attempt(functools.partial(client.delete, manifest))
            log.info("QuantizedModel %s/%s: retrying build %s (%s=%s)", qm.metadata.namespace, qm.metadata.name,
                     state.build.name, observed.RETRY_ANNOTATION, token)
            state = findings.BuildState(state.build, findings.BuildPhase.QUEUED)
        result.append(state)
    return result


MAX_KEPT_REPORTS = 3
"""Superseded builds whose report is kept per variant (by name order: the records keep no
creation time): a spec edited back to one of them (a rollback) serves its artifact at once,
without a build."""


def clean_up(client: Writer, qm: api.QuantizedModel, states: list[findings.BuildState],
             children: observed.Children) -> None:
    """Remove what no current build and no serving needs: a running Job whose digest left the
    spec is cancelled, a finished one goes with its account and Role; the ConfigMaps of superseded
    builds go too, but for a few per variant that hold a successful report (what a rollback needs);
    without ``spec.serving`` the server Deployment and Service go. Each delete happens once: the
    watches stop showing what went."""
    sizing_step = builds.plan_sizing(qm, qm.metadata.namespace or "").name
    current = {s.build.name for s in states} | {sizing_step}
    sizing_job = children.jobs.get(sizing_step)
    if sizing_job is not None and sizing_job.finished and (children.build_data(sizing_step) or {}).get(LISTING_KEY):
        # The listing is read: the sizing Job, its account and Role go; its ConfigMap stays as the record.
        for manifest in _build_objects(qm, sizing_step, BUILD_KINDS[:-1], {"Job": sizing_job.uid}):
            attempt(functools.partial(client.delete, manifest))
    for job in children.jobs.values():
        if job.name not in current:
            verb = "finished" if job.finished else "cancelled"
            for manifest in _build_objects(qm, job.name, BUILD_KINDS[:-1], {"Job": job.uid}):
                attempt(functools.partial(client.delete, manifest))
            log.info("QuantizedModel %s/%s: %s build %s removed, its digest left the spec", qm.metadata.namespace,
                     qm.metadata.name, verb, job.name)
    kept: dict[str, int] = {}
    for configmap in sorted(children.configmaps.values(), key=lambda c: c.name, reverse=True):
        if configmap.name in current:
            continue
        parsed, _ = artifacts.parse_report(configmap.data.get("report"), configmap.variant)
        if parsed is not None and parsed.status is quantizer_report.BuildStatus.SUCCEEDED \
                and kept.get(configmap.variant, 0) < MAX_KEPT_REPORTS and configmap.name not in children.jobs:
            kept[configmap.variant] = kept.get(configmap.variant, 0) + 1
            continue
        if configmap.name in children.jobs:
            continue  # its Job goes first, above; the ConfigMap in a later pass
        kinds = ("RoleBinding", "Role", "ServiceAccount", "ConfigMap")
        for manifest in _build_objects(qm, configmap.name, kinds, {"ConfigMap": configmap.uid}):
            attempt(functools.partial(client.delete, manifest))
    if qm.spec.serving is None and children.deployments:
        for name in children.deployments:
            meta = {"name": name, "namespace": qm.metadata.namespace,
                    "ownerReferences": [manifests.owner_reference(qm)]}
            attempt(functools.partial(client.delete, {"apiVersion": "apps/v1", "kind": "Deployment",
                                                      "metadata": meta}))
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": server_manifests.service_name(qm), "namespace": qm.metadata.namespace,
            "ownerReferences": [manifests.owner_reference(qm)]}}
        attempt(functools.partial(client.delete, service))
        log.info("QuantizedModel %s/%s: spec.serving removed, its server removed", qm.metadata.namespace,
                 qm.metadata.name)


def _claim_blocks(states: list[findings.BuildState], problem: findings.Problem) -> list[findings.BuildState]:
    """Without its storage claim no build can start: every unfinished build says why."""
    return [s if s.phase is findings.BuildPhase.SUCCEEDED else
            findings.BuildState(s.build, findings.BuildPhase.BLOCKED, reason=problem.message, why=problem.why)
            for s in states]


def reconcile(client: Writer, body: Mapping[str, Any], children: observed.Children, view: ClusterView) -> Result:
    """One pass; returns the status it wrote with the resourceVersion it got (so that the next pass
    need not wait for the watch to show it) and when it wants another pass without an event."""
    try:
        qm = api.QuantizedModel.model_validate(body)
    except pydantic.ValidationError as exc:
        return Result(_invalid(client, body, exc))
    now = datetime.datetime.now(datetime.UTC)
    namespace = qm.metadata.namespace or ""
    states = [observe_build(qm, b, children, now) for b in builds.plan_builds(qm, namespace)]
    states = retry_failed(client, qm, states, children)
    clean_up(client, qm, states, children)
    claim = manifests.storage_claim(qm)
    made = None
    if claim is not None and claim["metadata"]["name"] not in children.claims:
        made = attempt(functools.partial(client.create, claim))
    states = (_claim_blocks(states, made) if isinstance(made, findings.Problem)
              else start_next_build(client, qm, states, children, now, view))
    serving_state = serve(client, qm, states, children, view)
    again = _again_in(states, children, now)
    new = status.compute(qm, states, serving_state, now)
    if qm.status is not None and new.to_patch() == qm.status.to_patch():
        return Result(None, again)
    _announce(client, qm, new)
    patch: dict[str, Any] = new.to_patch()
    if qm.status is not None and qm.status.serving is not None and new.serving is None:
        patch["serving"] = None  # a merge patch removes a key only when told to
    return Result(ledger.Written(client.patch_status(namespace, qm.metadata.name, patch), patch), again)
