"""The build's claim filled while the quantizer converts: a real build of SmolLM2 (the real
quantizer, fetching from a local hub) on a volume that holds exactly what its claim asks (the
local cluster's ``local-sized`` class, a tmpfs of the claim's size), and another writer taking
the space left once the converted GGUF starts to grow. The conversion meets ENOSPC half-way.

What must follow: the build fails, with a reason that names the claim and the fix (grow
spec.storage.pvc.size) in the model's status and in one Warning Event; the partial file is gone;
no second Job is started by itself (a full disk stays full). Once the space is back and the user runs
``kquant retry``, the build runs again and the model converges: built, served, one Job per try.
"""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import model_checks as mc
import pytest
import yaml
from e2e_helpers import OperatorProcess, condition, qm_status
from fixtures import cluster_client
from hub_server import FakeHub
from localcluster import agent

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
NAME = "filled"
CLAIM_SIZE = "1536Mi"
"""What the quantizer's own check asks for SmolLM2 (1.04 GiB: the download, the 16-bit GGUF, the
reference, the variant and a margin), and a little more."""


def _manifest(hub: FakeHub) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((mc.REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": NAME}
    spec = body["spec"]
    spec["source"]["huggingface"]["endpoint"] = hub.url
    spec["variants"] = [{"name": "q8", "type": "Q8_0"}]
    spec["serving"]["variant"] = "q8"
    spec["calibration"]["chunks"] = 4  # the smallest build the fixture allows (as the e2e SmolLM2 test)
    spec["evaluation"]["chunks"] = 2
    spec["storage"] = {"pvc": {"size": CLAIM_SIZE, "storageClassName": agent.SIZED_STORAGE_CLASS},
                       "keepIntermediates": False}
    return body


def _volume(apis: mc.Apis, namespace: str) -> pathlib.Path | None:
    """The folder of the claim's volume once it is bound (and, for this class, mounted)."""
    claims = apis.core.list_namespaced_persistent_volume_claim(
        namespace, field_selector=f"metadata.name={NAME}-storage").items
    if not claims or not claims[0].spec.volume_name:
        return None
    claim = claims[0]
    return pathlib.Path(apis.core.read_persistent_volume(claim.spec.volume_name).spec.host_path.path)


def _converting(root: pathlib.Path) -> pathlib.Path | None:
    """The 16-bit GGUF once the conversion has started writing it."""
    return next((p for p in root.rglob("*.gguf") if p.is_file() and p.stat().st_size > 0), None)


def _fill(root: pathlib.Path) -> pathlib.Path:
    """Take every free byte of the volume, as another writer on a shared disk would."""
    filler = root / "filler"
    with filler.open("wb") as out:
        # The converter keeps writing while this runs: what statvfs called free may be gone by the
        # time it is taken (ENOSPC here), so take what is free again until nothing is.
        for _ in range(50):
            stats = os.statvfs(root)
            free = stats.f_bavail * stats.f_frsize
            if free == 0:
                break
            try:
                os.posix_fallocate(out.fileno(), os.fstat(out.fileno()).st_size, free)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def test_the_claim_filled_during_convert_fails_once_with_the_fix_and_retries_on_request(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess, smollm2_hub: FakeHub) -> None:
    apis = mc.Apis(cluster)
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL,
                                                          _manifest(smollm2_hub))
    root = cluster_client.wait_for(lambda: _volume(apis, namespace), timeout=60, what="the claim to be bound")
    assert os.path.ismount(root), "the sized volume is not its own filesystem"
    partial = cluster_client.wait_for(lambda: _converting(root), timeout=300, interval=0.05,
                                      what="the conversion to start writing its GGUF")
    filler = _fill(root)

    def failed() -> dict[str, Any] | None:
        quantized = condition(qm_status(cluster, namespace, NAME), "Quantized")
        return quantized if quantized and quantized["reason"] == "BuildFailed" else None

    quantized = cluster_client.wait_for(failed, timeout=300, interval=1, what="the build to fail on the full claim")
    # The pod that met ENOSPC reports "is full while writing ...", naming the claim and the fix.
    message = quantized["message"]
    assert f"storage claim {NAME}-storage" in message and "grow spec.storage.pvc.size" in message, message
    assert not partial.exists(), "the partial GGUF was left on the full claim"
    [first] = mc.jobs(apis, namespace, NAME)
    # A full claim stays full: the quantizer exits "permanent" and the Job's podFailurePolicy ends
    # the Job with that one pod, instead of backoffLimit more that would each meet the full claim.
    job_failed = cluster_client.wait_for(
        lambda: next((c for c in apis.batch.read_namespaced_job(first.metadata.name, namespace).status.conditions
                      or [] if c.type == "Failed" and c.status == "True"), None),
        timeout=120, interval=1, what="the build Job to fail")
    assert job_failed.reason == "PodFailurePolicy", (job_failed.reason, job_failed.message)
    pods = apis.core.list_namespaced_pod(namespace, label_selector=f"job-name={first.metadata.name}").items
    assert [p.status.container_statuses[0].state.terminated.exit_code for p in pods] == [3]
    time.sleep(5)  # long enough for a blind retry to show
    assert [j.metadata.name for j in mc.jobs(apis, namespace, NAME)] == [first.metadata.name]
    warnings = [e.reason for e in mc.model_events(apis, namespace, NAME) if e.type == "Warning"]
    assert warnings.count("BuildFailed") == 1, warnings

    filler.unlink()
    subprocess.run([str(pathlib.Path(sys.executable).with_name("kquant")), "retry", NAME, "-n", namespace],
                   check=True, capture_output=True, timeout=60, env={**os.environ, "PYTHONSAFEPATH": "1"})

    def served() -> dict[str, Any] | None:
        status = qm_status(cluster, namespace, NAME)
        ready = condition(status, "Ready")
        return status if ready and ready["status"] == "True" else None

    status = cluster_client.wait_for(served, timeout=600, interval=2, what="the retried build to be served")
    assert (status.get("serving") or {}).get("variant") == "q8"
    jobs = mc.jobs(apis, namespace, NAME)
    assert len(jobs) <= 2 and first.metadata.name not in [j.metadata.name for j in jobs][1:]
    assert mc.duplicate_jobs(apis, namespace, NAME) == []
    assert mc.not_owned(mc.made(apis, namespace, NAME), created["metadata"]["uid"]) == []
    # The retry sends the model back to "variant q8 is not built yet": that Ready change happens
    # twice for real (each its own Event); any other Event posted twice is a duplicate.
    twice = [said for said in mc.events_twice(apis, namespace, NAME) if said[0] != "VariantNotBuilt"]
    assert twice == [], twice
    mc.delete_and_check_nothing_left(apis, namespace, NAME)
