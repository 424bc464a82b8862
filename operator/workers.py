"""The operator's workers: a few tasks take model keys from the work queue and run one pass each.

A pass (``reconcile.reconcile``) blocks on the Kubernetes client, so each runs in a thread of
one executor; the tasks themselves live in the event loop, where the watches change the indexes,
so that what a pass reads is copied out there (``WorkerPool.snapshot``) and never read while a
watch writes it. A failed pass is logged and retried with the queue's backoff; the other models
keep going. ``handlers`` starts the pool at startup, keeps it in kopf's ``memo`` and stops it at
cleanup.

The pool also runs the resync: every ``resync_seconds`` it puts every model it knows in the queue,
the safety net for a watch event that got lost. It lives here and not in a kopf timer, because a
kopf timer needs a finalizer on every QuantizedModel (the operator may not write one, and a model
must stay deletable while the operator is down). With several replicas, kopf pauses the watches of
all but one; a paused replica must not resync either, so the resync reads the peering object
(``outranked``) before it queues anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

import kopf
from kquant.operator import kube, ledger, metrics, observed, reconcile, workqueue

log = logging.getLogger("kquant.operator")
WORKERS = 4
"""Passes that run at once. Each is mostly waiting on the API server; more would only queue there."""
Key = tuple[str, str]
"""A model's (namespace, name)."""
V = TypeVar("V")
RESYNC_SECONDS = 300.0
"""How often every known model gets a pass even without an event (``KQUANT_RESYNC_SECONDS``)."""


@dataclasses.dataclass(frozen=True)
class Peering:
    """Which kopf peering object this replica takes part in (None in ``WorkerPool``: standalone)."""

    name: str
    clusterwide: bool
    priority: int


def outranked(peers: Mapping[str, Any] | None, priority: int, now: datetime.datetime) -> bool:
    """kopf's rule for pausing, from a peering object's ``status`` (identity -> priority, lifetime,
    lastseen): a live peer with a higher priority pauses this one, and two live peers with this
    priority (this replica and another) pause each other."""
    higher = same = 0
    for info in (peers or {}).values():
        if not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.datetime.fromisoformat(str(info.get("lastseen")))
        except ValueError:
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        if seen + datetime.timedelta(seconds=int(info.get("lifetime") or 60)) <= now:
            continue
        peer = int(info.get("priority") or 0)
        higher += peer > priority
        same += peer == priority
    return higher > 0 or same > 1


@dataclasses.dataclass
class WorkerPool:
    """What the workers share, from startup to cleanup: the client, the queue, the ledger of
    status writes, the executor the passes run in, the indexes they read, and the metrics."""

    client: kube.Kube
    queue: workqueue.WorkQueue[Key]
    ledger: ledger.StatusLedger
    executor: concurrent.futures.ThreadPoolExecutor
    indexes: dict[str, kopf.Index[Any, Any]]
    metrics: metrics.Metrics
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    node_shapes: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Each node's labels and allocatable resources as last seen, to tell a change from a heartbeat."""
    peering: Peering | None = None
    resync_seconds: float = RESYNC_SECONDS

    @classmethod
    def start(cls, client: kube.Kube, indexes: dict[str, kopf.Index[Any, Any]], peering: Peering | None = None,
              resync_seconds: float = RESYNC_SECONDS) -> WorkerPool:
        """The pool with its metrics served (when the chart asks), its workers and its resync running."""
        pool = cls(client=client, queue=workqueue.WorkQueue(), ledger=ledger.StatusLedger(),
                   executor=concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="kquant-pass"),
                   indexes=indexes, metrics=metrics.Metrics(), peering=peering, resync_seconds=resync_seconds)
        pool.metrics.track(queue_depth=lambda: len(pool.queue), models=lambda: len(pool.indexes["models"]),
                           bodies=lambda: [b for k in list(pool.indexes["models"]) for b in pool.indexes["models"][k]])
        if client.settings.metrics_port:
            pool.metrics.serve(client.settings.metrics_port)
        pool.tasks = [asyncio.create_task(pool._work(), name=f"kquant-worker-{i}") for i in range(WORKERS)]
        pool.tasks.append(asyncio.create_task(pool._resync_forever(), name="kquant-resync"))
        return pool

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            self.metrics.held_objects(self.held())
            try:
                await self.resync()
            except Exception as exc:  # the API server is away: the next round tries again
                log.warning("resync skipped: %s", kube.describe_error(exc))

    def held(self) -> dict[str, int]:
        """What this replica keeps in memory, per store. Counted on the event loop, where kopf
        changes the indexes, so no count meets a dict that changes under it."""
        counts = {f"index/{name}": sum(len(store) for store in index.values()) for name, index in self.indexes.items()}
        counts.update(workqueue=self.queue.held(), ledger=len(self.ledger), node_shapes=len(self.node_shapes))
        return counts

    async def resync(self) -> int:
        """Queue every model this replica knows, unless kopf has paused it in favour of another
        replica (then the other one resyncs); returns how many were queued."""
        keys = list(self.indexes["models"])
        if self.peering is not None and keys:
            loop = asyncio.get_running_loop()
            peering = self.peering
            now = datetime.datetime.now(datetime.UTC)
            namespaces = [None] if peering.clusterwide else sorted({namespace for namespace, _ in keys})
            paused = set()
            for namespace in namespaces:
                peers = await loop.run_in_executor(self.executor, self.client.peers, peering.name, namespace)
                if outranked(peers, peering.priority, now):
                    paused.add(namespace)
            keys = [k for k in keys if (None if peering.clusterwide else k[0]) not in paused]
        for key in keys:
            self.queue.add(key)
        return len(keys)

    async def stop(self) -> None:
        """End the workers, wait for passes under way, close the client."""
        self.queue.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=True)
        self.client.close()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key, waited = await self.queue.get()
            self.metrics.queue_wait_seconds.observe(waited)
            started = loop.time()
            try:
                snapshot = self.snapshot(key)
                if snapshot is None:
                    self.queue.done(key)
                    continue
                body, children, view = snapshot
                result = await loop.run_in_executor(self.executor, reconcile.reconcile,
                                                    self.client, body, children, view)
            except Exception as exc:  # an API error or a bug: log it, retry later, keep the others going
                if kube.namespace_terminating(exc):
                    log.info("QuantizedModel %s/%s: its namespace is being deleted; nothing to do", *key)
                    self.queue.done(key)
                    continue
                self.metrics.passes.labels(result="error").inc()
                delay = self.queue.failed(key)
                log.warning("QuantizedModel %s/%s: pass failed (%s); retrying in %.1fs", key[0], key[1],
                            kube.describe_error(exc), delay, exc_info=log.isEnabledFor(logging.DEBUG))
                continue
            self.metrics.passes.labels(result="success").inc()
            self.metrics.pass_seconds.observe(loop.time() - started)
            if result.written is not None:
                self.ledger.wrote(str(body["metadata"]["uid"]), result.written)
            self.queue.done(key)
            if result.again_in is not None:
                self.queue.add_after(key, result.again_in)

    def snapshot(self, key: Key) -> tuple[dict[str, Any], observed.Children, reconcile.ClusterView] | None:
        """What the pass reads, copied out of the indexes in the event loop's thread (the watches
        change them there); None when the model is gone or going."""
        idx = self.indexes
        body = next(iter(_values(idx["models"], key)), None)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        children = observed.Children.collect(
            configmaps=_values(idx["build_configmaps"], key), jobs=_values(idx["build_jobs"], key),
            pods=_values(idx["build_pods"], key), deployments=_values(idx["server_deployments"], key),
            claims=_values(idx["storage_claims"], key), owner=str(body["metadata"].get("uid") or ""),
            server_pods=_values(idx["server_pods"], key))
        view = reconcile.ClusterView(nodes=[n for k in idx["cluster_nodes"] for n in idx["cluster_nodes"][k]],
                                     pods=[p for k in idx["gpu_pods"] for p in idx["gpu_pods"][k]])
        return dict(self.ledger.newest(body)), children, view

    def capacity_changed(self) -> None:
        """A pass for every model that fits nowhere, now that the cluster changed."""
        for key in self.indexes["models"]:
            if any(reconcile.waits_for_capacity(body) for body in self.indexes["models"][key]):
                self.queue.add(key)


def _values(index: kopf.Index[Key, V], key: Key) -> list[V]:
    return list(index[key]) if key in index else []
