"""The worker loop: a key from the queue becomes one pass over what the indexes hold, through a
recording fake of the client, and the status it wrote is remembered until the watch shows it."""

from __future__ import annotations

import asyncio
import datetime
import logging
import pathlib
from typing import Any

import pytest
import yaml
from kquant.operator import config, workers
from kubernetes.client import ApiException

REPO = pathlib.Path(__file__).resolve().parents[2]
KEY = ("ml", "smollm2")


class RecordingClient:
    settings = config.DEFAULTS

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", manifest["kind"]))
        return manifest

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> str:
        self.calls.append(("patch_status", f"{namespace}/{name}"))
        return "7"

    def model_exists(self, namespace: str, name: str, uid: str) -> bool:
        return True

    def event(self, qm: object, kind: str, reason: str, message: str, once: str | None = None) -> None:
        self.calls.append(("event", reason))

    def close(self) -> None:
        self.closed = True


def _indexes(body: dict[str, Any], waiting: bool = False) -> dict[str, Any]:
    if waiting:
        body = {**body, "status": {"conditions": [{"type": "Serving", "status": "False", "reason": "DoesNotFit"}]}}
    empty: dict[Any, list[Any]] = {}
    return {"models": {KEY: [body]}, "build_configmaps": empty, "build_jobs": empty, "build_pods": empty,
            "server_deployments": empty, "storage_claims": empty, "cluster_nodes": empty, "gpu_pods": empty,
            "server_pods": empty}


def _body() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1234", generation=1, resourceVersion="6")
    return body


def test_a_queued_model_gets_one_pass_and_its_write_is_remembered() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        pool = workers.WorkerPool.start(client, _indexes(_body()))  # type: ignore[arg-type]
        pool.queue.add(KEY)
        for _ in range(200):
            if ("patch_status", "ml/smollm2") in client.calls and not len(pool.queue):
                break
            await asyncio.sleep(0.01)
        await pool.stop()
        assert ("create", "Job") in client.calls and client.calls[-1][0] in ("patch_status", "event")
        written = pool.ledger.newest(_body())
        # The first pass makes the sizing Job (no listing yet): the model waits for it, Pending.
        assert written["status"]["phase"] == "Pending", "the pass's own write, before the watch shows it"
        assert "sizing: listing the source" in written["status"]["progress"], written["status"]

    asyncio.run(scenario())
    assert client.closed


def test_snapshot_skips_a_model_being_deleted_and_capacity_wakes_only_the_waiting() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        going = _body()
        going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        pool = workers.WorkerPool.start(client, _indexes(going))  # type: ignore[arg-type]
        assert pool.snapshot(KEY) is None
        pool.capacity_changed()
        assert len(pool.queue) == 0
        pool.indexes = _indexes(_body(), waiting=True)
        pool.capacity_changed()
        assert len(pool.queue) == 1
        await pool.stop()

    asyncio.run(scenario())



def test_held_counts_each_store_and_falls_back_once_the_model_is_forgotten() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        pool = workers.WorkerPool.start(client, _indexes(_body()))  # type: ignore[arg-type]
        pool.queue.add(KEY)
        for _ in range(200):
            if ("patch_status", "ml/smollm2") in client.calls and not pool.queue.held():
                break
            await asyncio.sleep(0.01)
        held = pool.held()
        assert held["index/models"] == 1 and held["index/build_jobs"] == 0
        assert held["workqueue"] == 0, "a finished pass leaves nothing queued"
        assert held["ledger"] == 1, "the pass's status write until the watch shows it"
        pool.ledger.forget("1234")  # the model's DELETED event
        pool.queue.forget(KEY)
        pool.indexes = _indexes(_body()) | {"models": {}}
        assert sum(pool.held().values()) == 0
        pool.metrics.held_objects(pool.held())
        assert 'kquant_held_objects{store="ledger"} 0.0' in pool.metrics.exposition()
        await pool.stop()

    asyncio.run(scenario())

def test_outranked_follows_kopfs_pausing_rule() -> None:
    now = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)

    def peer(priority: int, seconds_ago: int, lifetime: int = 60) -> dict[str, Any]:
        seen = now - datetime.timedelta(seconds=seconds_ago)
        return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}

    assert not workers.outranked(None, 100, now)
    assert not workers.outranked({"me": peer(100, 5)}, 100, now)
    assert not workers.outranked({"me": peer(100, 5), "low": peer(50, 5)}, 100, now)
    assert workers.outranked({"me": peer(100, 5), "high": peer(200, 5)}, 100, now)
    assert not workers.outranked({"me": peer(100, 5), "high": peer(200, 90)}, 100, now), "a dead peer counts not"
    assert workers.outranked({"me": peer(100, 5), "twin": peer(100, 5)}, 100, now), "a tie pauses both"
    naive = {"me": peer(100, 5), "high": {**peer(200, 5), "lastseen": "2026-01-01T11:59:58"}}
    assert workers.outranked(naive, 100, now)


class PeeringClient(RecordingClient):
    def __init__(self, peers: dict[str, Any] | None) -> None:
        super().__init__()
        self._peers = peers

    def peers(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        self.calls.append(("peers", f"{namespace}/{name}"))
        return self._peers


def test_resync_queues_every_known_model_unless_another_replica_is_active() -> None:
    now = datetime.datetime.now(datetime.UTC).isoformat()
    models: dict[Any, list[Any]] = {KEY: [_body()], ("dev", "other"): [_body()]}

    async def scenario(peers: dict[str, Any] | None, peering: workers.Peering | None) -> int:
        client = PeeringClient(peers)
        pool = workers.WorkerPool.start(client, {**_indexes(_body()), "models": models},  # type: ignore[arg-type]
                                        peering, resync_seconds=3600)
        queued = await pool.resync()
        assert len(pool.queue) == queued
        await pool.stop()
        return queued

    assert asyncio.run(scenario(None, None)) == 2
    alone = {"me": {"priority": 5, "lifetime": 60, "lastseen": now}}
    assert asyncio.run(scenario(alone, workers.Peering("kquant", True, 5))) == 2
    beaten = {**alone, "other": {"priority": 9, "lifetime": 60, "lastseen": now}}
    assert asyncio.run(scenario(beaten, workers.Peering("kquant", True, 5))) == 0
    assert asyncio.run(scenario(beaten, workers.Peering("kquant", False, 5))) == 0


class TerminatingNamespaceClient(RecordingClient):
    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", manifest["kind"]))
        error = ApiException(status=403, reason="Forbidden")
        error.body = ('{"message": "configmaps \\"x\\" is forbidden: unable to create new content in namespace ml '
                      'because it is being terminated"}')
        raise error


def test_a_namespace_being_deleted_ends_the_model_quietly(caplog: pytest.LogCaptureFixture) -> None:
    client = TerminatingNamespaceClient()

    async def scenario() -> workers.WorkerPool:
        pool = workers.WorkerPool.start(client, _indexes(_body()))  # type: ignore[arg-type]
        pool.queue.add(KEY)
        for _ in range(200):
            if client.calls and not len(pool.queue):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await pool.stop()
        return pool

    with caplog.at_level(logging.INFO, logger="kquant.operator"):
        pool = asyncio.run(scenario())
    assert client.calls, "the pass ran"
    assert not pool.queue._timers and not pool.queue._failures, "no retry for a model whose namespace goes"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "nothing a person must read"
