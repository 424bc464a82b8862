"""The node under a served model's server pod removed from the cluster (its Node object deleted,
as a cluster autoscaler or an operator removing a broken machine does). The pod garbage
collector deletes the pod bound to the missing node, the Deployment starts another on a node that
is left, and the model is served again: the same Deployment, one server pod, nothing orphaned,
no Event posted twice. The node is registered again afterwards for the tests that follow.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import model_checks as mc
import pytest
from e2e_helpers import OperatorProcess, qm_status
from fixtures import cluster_client
from localcluster import agent, nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _server_pods(apis: mc.Apis, namespace: str, name: str) -> list[Any]:
    pods = apis.core.list_namespaced_pod(namespace, label_selector=f"{mc.selector(name)},kquant.dev/role=server").items
    return [p for p in pods if not p.metadata.deletion_timestamp]


@pytest.fixture
def removed_nodes(cluster: cluster_client.Cluster, tmp_path: pathlib.Path) -> Iterator[list[str]]:
    """Names the test removes; each is registered again at the end, as the node agent does at start."""
    removed: list[str] = []
    yield removed
    specs = tuple(n for n in nodes.DEFAULT_NODES if n.name in removed)
    if specs:
        agent.NodeAgent(cluster.api_client(), tmp_path, "", pathlib.Path(), node_specs=specs).register_nodes()


def test_the_servers_node_removed_and_the_model_is_served_again(
        cluster: cluster_client.Cluster, namespace: str, chart_operator: OperatorProcess,
        removed_nodes: list[str]) -> None:
    apis = mc.Apis(cluster)
    name = "noderm"
    created = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, namespace, mc.PLURAL,
                                                          mc.model(name, variants=("q8",)))
    [job] = cluster_client.wait_for(lambda: mc.jobs(apis, namespace, name), timeout=60, what="the build Job")
    mc.finish(apis, namespace, job)
    cluster_client.wait_for(lambda: mc.converged(cluster, namespace, name, built=1), timeout=120, interval=0.5,
                            what="the model to be served")
    [pod] = cluster_client.wait_for(
        lambda: [p for p in _server_pods(apis, namespace, name) if p.status.phase == "Running"], timeout=60,
        what="the server pod to run")
    node = pod.spec.node_name
    removed_nodes.append(node)
    apis.core.delete_node(node)
    removed = time.monotonic()

    [moved] = cluster_client.wait_for(
        lambda: [p for p in _server_pods(apis, namespace, name)
                 if p.spec.node_name not in (None, node) and p.status.phase == "Running"],
        timeout=180, interval=1, what=f"a server pod on another node than the removed {node}")

    # The pause "server" never passes its readiness probe, so Ready stays False (RollingOut)
    # throughout: what must hold is that the model still serves q8 from the one Deployment.
    status = qm_status(cluster, namespace, name)
    assert status.get("phase") != "Failed", status
    print(f"\nnode {node} removed: served again on {moved.spec.node_name} {time.monotonic() - removed:.1f}s later")
    assert (status.get("serving") or {}).get("variant") == "q8"
    assert len(apis.apps.list_namespaced_deployment(namespace, label_selector=mc.selector(name)).items) == 1
    assert len(_server_pods(apis, namespace, name)) == 1
    mc.check_after(apis, namespace, name, created["metadata"]["uid"])
    mc.delete_and_check_nothing_left(apis, namespace, name)
