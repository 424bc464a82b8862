"""Two operator replicas under kopf peering, the active one (the higher priority) killed with
SIGKILL mid-build. The standby takes over once the dead replica's peering entry expires (kopf's
lifetime, 60 s: a SIGKILL leaves no goodbye) and the model converges, with one Job per build and
no Event posted twice (the standby must not have acted while the leader lived).
"""

from __future__ import annotations

import pathlib
import time
import uuid
from collections.abc import Iterator

import model_checks as mc
import pytest
import yaml
from e2e_helpers import CHART, OperatorProcess
from fixtures import cluster_client
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
PEERING_CRDS = CHART / "crds" / "kopf.dev_peerings.yaml"


@pytest.fixture
def two_replicas(cluster: cluster_client.Cluster, crd: None, operator_kubeconfig: pathlib.Path,
                 tmp_path: pathlib.Path) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    api = cluster.api_client()
    for body in (d for d in yaml.safe_load_all(PEERING_CRDS.read_text()) if d):
        try:
            client.ApiextensionsV1Api(api).create_custom_resource_definition(body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    custom = client.CustomObjectsApi(api)
    name = f"faults-{uuid.uuid4().hex[:8]}"

    def peering_served() -> bool:
        try:
            custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", {
                "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}})
        except client.ApiException as exc:
            return exc.status == 409
        return True

    cluster_client.wait_for(peering_served, timeout=60, what="ClusterKopfPeering to be served")
    replicas = tuple(
        OperatorProcess(operator_kubeconfig, tmp_path / f"operator-{priority}.log", args=(f"--peering={name}",),
                        env={"KQUANT_RESYNC_SECONDS": mc.RESYNC_SECONDS, "KQUANT_PEERING_PRIORITY": str(priority)})
        for priority in (200, 100))
    for replica in replicas:
        replica.start()
    try:
        yield replicas[0], replicas[1]
    finally:
        for replica in replicas:
            replica.stop()
        custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)


def test_the_leader_killed_mid_build_and_the_standby_converges(
        cluster: cluster_client.Cluster, namespace: str, two_replicas: tuple[OperatorProcess, OperatorProcess]) -> None:
    leader, standby = two_replicas
    apis = mc.Apis(cluster)
    name = "leader"
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL,
                                                          mc.model(name, variants=("q8",)))
    [job] = cluster_client.wait_for(lambda: mc.jobs(apis, namespace, name), timeout=90, what="the build Job")
    leader.kill()
    killed = time.monotonic()
    mc.finish(apis, namespace, job)

    status = cluster_client.wait_for(lambda: mc.converged(cluster, namespace, name, built=1), timeout=150,
                                     interval=0.5, what="the standby to take over and converge the model")
    print(f"\nleader killed: the standby converged the model {time.monotonic() - killed:.1f}s later")
    assert status["observedGeneration"] == 1
    assert [j.metadata.name for j in mc.jobs(apis, namespace, name)] == [job.metadata.name]
    mc.check_after(apis, namespace, name, created["metadata"]["uid"])
    assert standby.proc is not None and standby.proc.poll() is None
    mc.delete_and_check_nothing_left(apis, namespace, name)
