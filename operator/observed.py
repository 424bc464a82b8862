"""What the operator has seen of the objects it owns, reduced to what a pass reads. Pure code.

The watch streams feed kopf indexes with these records (see ``handlers``), so a pass over a
QuantizedModel reads its build ConfigMaps, build Jobs, build pods and server Deployment from memory
instead of asking the API server: with hundreds of models, reads per pass, not writes, were what
the API server and the operator spent their time on.

A record is small and immutable: the whole object is never kept, only the fields a pass uses.
Each keeps the uids of its owners: labels are anyone's to set, so a ConfigMap labelled with a
model's name but not owned by it (a forged report) is dropped by ``Children.collect``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

Body = Mapping[str, Any]

IGNORED_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
"""Waiting reasons every pod passes through on its way to running."""


def _owners(body: Body) -> frozenset[str]:
    return frozenset(str(r.get("uid")) for r in _meta(body).get("ownerReferences") or [])


@dataclasses.dataclass(frozen=True)
class BuildConfigMap:
    """A build's result ConfigMap: the quantizer writes ``progress`` and ``report`` into it."""

    name: str
    data: Mapping[str, str]
    owners: frozenset[str] = frozenset()
    retry: str = ""
    """The ``kquant.dev/retry`` token of the model when this build was (re)started."""
    variant: str = ""
    uid: str = ""


@dataclasses.dataclass(frozen=True)
class BuildJob:
    name: str
    failed: tuple[str, str] | None
    """(reason, message) of the Job's Failed condition, once it has one."""
    completed: str | None = None
    """When the Job completed (its pod exited 0), as the API server wrote it; None until then."""
    owners: frozenset[str] = frozenset()
    uid: str = ""

    @property
    def finished(self) -> bool:
        return self.failed is not None or self.completed is not None


@dataclasses.dataclass(frozen=True)
class BuildPod:
    job: str
    created: str
    waiting: tuple[str, str] | None
    """(reason, message) from the kubelet when a container cannot start."""
    last_words: str
    """The termination message of a container that exited with an error: the quantizer's own words."""
    owners: frozenset[str] = frozenset()
    """The uid of its Job."""


@dataclasses.dataclass(frozen=True)
class ServerDeployment:
    name: str
    variant: str | None
    serving_hash: str | None
    generation: int
    observed_generation: int
    replicas: int
    updated_replicas: int
    available_replicas: int
    ready_replicas: int
    owners: frozenset[str] = frozenset()

    def ready(self, wanted: int) -> bool:
        """Rolled out: the controller saw the newest spec and every wanted pod is new and available."""
        return (self.observed_generation >= self.generation and self.updated_replicas >= wanted
                and self.available_replicas >= wanted and self.replicas == wanted)


@dataclasses.dataclass(frozen=True)
class ServerPod:
    """A llama-server pod: which one it is, where it runs and whether it is Ready (its log is read
    once, when it first is)."""

    name: str
    uid: str
    node: str
    digest: str
    """The served artifact's digest label (16 characters)."""
    ready: bool


def _meta(body: Body) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = body.get("metadata") or {}
    return meta


RETRY_ANNOTATION = "kquant.dev/retry"
"""On a QuantizedModel: a new value asks for its failed builds to run again (``kquant retry``);
on a build's ConfigMap: the value it was started under."""


def build_configmap(body: Body) -> BuildConfigMap:
    meta = _meta(body)
    return BuildConfigMap(name=meta["name"], data=dict(body.get("data") or {}), owners=_owners(body),
                          retry=str((meta.get("annotations") or {}).get(RETRY_ANNOTATION) or ""),
                          variant=str((meta.get("labels") or {}).get("kquant.dev/variant") or ""),
                          uid=str(meta.get("uid") or ""))


def build_job(body: Body) -> BuildJob:
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)
    complete = next((c for c in conditions if c.get("type") == "Complete" and c.get("status") == "True"), None)
    completed = None
    if complete is not None:
        completed = str(status.get("completionTime") or complete.get("lastTransitionTime") or "")
    return BuildJob(name=_meta(body)["name"],
                    failed=(str(failed.get("reason") or ""), str(failed.get("message") or "")) if failed else None,
                    completed=completed, owners=_owners(body), uid=str(_meta(body).get("uid") or ""))


def build_pod(body: Body) -> BuildPod:
    meta = _meta(body)
    waiting: tuple[str, str] | None = None
    last_words = ""
    for container in (body.get("status") or {}).get("containerStatuses") or []:
        state = container.get("state") or {}
        held = state.get("waiting") or {}
        if held.get("reason") and held["reason"] not in IGNORED_WAITING and waiting is None:
            waiting = (str(held["reason"]), str(held.get("message") or ""))
        ended = state.get("terminated") or {}
        if ended.get("exitCode") and not last_words:
            last_words = str(ended.get("message") or ended.get("reason") or "").strip()[-800:]
    return BuildPod(job=(meta.get("labels") or {}).get("job-name", ""),
                    created=str(meta.get("creationTimestamp") or ""), waiting=waiting, last_words=last_words,
                    owners=_owners(body))


def server_deployment(body: Body, variant_label: str, hash_annotation: str) -> ServerDeployment:
    meta, spec, status = _meta(body), body.get("spec") or {}, body.get("status") or {}
    template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    return ServerDeployment(
        name=meta["name"], variant=template_labels.get(variant_label),
        serving_hash=(meta.get("annotations") or {}).get(hash_annotation),
        generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        replicas=int(status.get("replicas") or 0), updated_replicas=int(status.get("updatedReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0), owners=_owners(body))


def server_pod(body: Body, digest_label: str) -> ServerPod:
    meta, status = _meta(body), body.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ServerPod(name=str(meta.get("name") or ""), uid=str(meta.get("uid") or ""),
                     node=str((body.get("spec") or {}).get("nodeName") or ""),
                     digest=str((meta.get("labels") or {}).get(digest_label) or ""),
                     ready=ready and not meta.get("deletionTimestamp"))


@dataclasses.dataclass(frozen=True)
class Children:
    """Everything one model owns that a pass reads, as the watches last showed it."""

    configmaps: Mapping[str, BuildConfigMap] = dataclasses.field(default_factory=dict)
    jobs: Mapping[str, BuildJob] = dataclasses.field(default_factory=dict)
    pods: tuple[BuildPod, ...] = ()
    deployments: Mapping[str, ServerDeployment] = dataclasses.field(default_factory=dict)
    claims: frozenset[str] = frozenset()
    """Names of the storage claims that exist."""
    server_pods: tuple[ServerPod, ...] = ()
    """Pods of the server Deployment (by name: they belong to its ReplicaSets, which nothing here watches)."""

    @classmethod
    def collect(cls, configmaps: Iterable[BuildConfigMap] = (), jobs: Iterable[BuildJob] = (),
                pods: Iterable[BuildPod] = (), deployments: Iterable[ServerDeployment] = (),
                claims: Iterable[str] = (), owner: str | None = None,
                server_pods: Iterable[ServerPod] = ()) -> Children:
        """The records, keyed by name; with ``owner`` (the model's uid) only those the model owns
        (pods: those of its Jobs), whatever their labels say."""
        if owner is not None:
            configmaps = [c for c in configmaps if owner in c.owners]
            jobs = [j for j in jobs if owner in j.owners]
            uids = {j.uid for j in jobs}
            pods = [p for p in pods if p.owners & uids]
            deployments = [d for d in deployments if owner in d.owners]
            # a Deployment's pods are named <deployment>-<replicaset hash>-<suffix>
            server_pods = [p for p in server_pods if any(p.name.startswith(f"{d.name}-") for d in deployments)]
        return cls(configmaps={c.name: c for c in configmaps}, jobs={j.name: j for j in jobs},
                   pods=tuple(pods), deployments={d.name: d for d in deployments}, claims=frozenset(claims),
                   server_pods=tuple(server_pods))

    def build_data(self, build: str) -> Mapping[str, str] | None:
        found = self.configmaps.get(build)
        return found.data if found else None

    def waiting(self, job: str) -> tuple[str, str] | None:
        return next((p.waiting for p in self.pods if p.job == job and p.waiting), None)

    def last_words(self, job: str) -> str:
        """The newest failed pod's termination message."""
        failed = sorted((p for p in self.pods if p.job == job and p.last_words), key=lambda p: p.created)
        return failed[-1].last_words if failed else ""
