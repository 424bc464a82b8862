"""What the operator has seen of the objects it owns, reduced to what a pass reads. Pure code.

The watch streams feed kopf indexes with these records (see ``handlers``), so a pass over a
QuantizedModel reads its build ConfigMaps, build Jobs, build pods and server Deployment from memory
instead of asking the API server: with hundreds of models, reads per pass, not writes, were what
the API server and the operator spent their time on.

A record is small and immutable: the whole object is never kept, only the fields a pass uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

Body = Mapping[str, Any]

IGNORED_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
"""Waiting reasons every pod passes through on its way to running."""


@dataclasses.dataclass(frozen=True)
class BuildConfigMap:
    """A build's result ConfigMap: the quantizer writes ``progress`` and ``report`` into it."""

    name: str
    data: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class BuildJob:
    name: str
    failed: tuple[str, str] | None
    """(reason, message) of the Job's Failed condition, once it has one."""


@dataclasses.dataclass(frozen=True)
class BuildPod:
    job: str
    created: str
    waiting: tuple[str, str] | None
    """(reason, message) from the kubelet when a container cannot start."""
    last_words: str
    """The termination message of a container that exited with an error: the quantizer's own words."""


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

    def ready(self, wanted: int) -> bool:
        """Rolled out: the controller saw the newest spec and every wanted pod is new and available."""
        return (self.observed_generation >= self.generation and self.updated_replicas >= wanted
                and self.available_replicas >= wanted and self.replicas == wanted)


def _meta(body: Body) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = body.get("metadata") or {}
    return meta


def build_configmap(body: Body) -> BuildConfigMap:
    return BuildConfigMap(name=_meta(body)["name"], data=dict(body.get("data") or {}))


def build_job(body: Body) -> BuildJob:
    conditions = (body.get("status") or {}).get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)
    return BuildJob(name=_meta(body)["name"],
                    failed=(str(failed.get("reason") or ""), str(failed.get("message") or "")) if failed else None)


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
                    created=str(meta.get("creationTimestamp") or ""), waiting=waiting, last_words=last_words)


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
        ready_replicas=int(status.get("readyReplicas") or 0))


@dataclasses.dataclass(frozen=True)
class Children:
    """Everything one model owns that a pass reads, as the watches last showed it."""

    configmaps: Mapping[str, BuildConfigMap] = dataclasses.field(default_factory=dict)
    jobs: Mapping[str, BuildJob] = dataclasses.field(default_factory=dict)
    pods: tuple[BuildPod, ...] = ()
    deployments: Mapping[str, ServerDeployment] = dataclasses.field(default_factory=dict)
    claims: frozenset[str] = frozenset()
    """Names of the storage claims that exist."""

    @classmethod
    def collect(cls, configmaps: Iterable[BuildConfigMap] = (), jobs: Iterable[BuildJob] = (),
                pods: Iterable[BuildPod] = (), deployments: Iterable[ServerDeployment] = (),
                claims: Iterable[str] = ()) -> Children:
        return cls(configmaps={c.name: c for c in configmaps}, jobs={j.name: j for j in jobs},
                   pods=tuple(pods), deployments={d.name: d for d in deployments}, claims=frozenset(claims))

    def build_data(self, build: str) -> Mapping[str, str] | None:
        found = self.configmaps.get(build)
        return found.data if found else None

    def waiting(self, job: str) -> tuple[str, str] | None:
        return next((p.waiting for p in self.pods if p.job == job and p.waiting), None)

    def last_words(self, job: str) -> str:
        """The newest failed pod's termination message."""
        failed = sorted((p for p in self.pods if p.job == job and p.last_words), key=lambda p: p.created)
        return failed[-1].last_words if failed else ""
