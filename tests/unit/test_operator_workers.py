"""The worker loop: a key from the queue becomes one pass over what the indexes hold, through a
recording fake of the client, and the status it wrote is remembered until the watch shows it."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import yaml
from kquant.operator import config, workers

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

    def event(self, qm: object, kind: str, reason: str, message: str) -> None:
        self.calls.append(("event", reason))

    def close(self) -> None:
        self.closed = True


def _indexes(body: dict[str, Any], waiting: bool = False) -> dict[str, Any]:
    if waiting:
        body = {**body, "status": {"conditions": [{"type": "Serving", "status": "False", "reason": "DoesNotFit"}]}}
    empty: dict[Any, list[Any]] = {}
    return {"models": {KEY: [body]}, "build_configmaps": empty, "build_jobs": empty, "build_pods": empty,
            "server_deployments": empty, "storage_claims": empty, "cluster_nodes": empty, "gpu_pods": empty}


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
        assert written["status"]["phase"] == "Downloading", "the pass's own write, before the watch shows it"

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
