"""The node agent across a kube-apiserver restart: the nodes run pods again afterwards, and a pod
that ran through the outage runs on (its processes kept, as a kubelet keeps its containers while
the API server is away) and ends when it is deleted.

Before the fix, the agent's pod watch listed pods outside its error handling: the first re-list
against the dead server raised a connection error that ended the watch thread, and no pod created
after a restart ever ran, while the heartbeat kept every node Ready.
"""

from __future__ import annotations

import time
from typing import Any

import control_plane
import pytest
from fixtures import cluster_client
from kubernetes import client, utils

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
DOWN_SECONDS = 5


def _pod(name: str, script: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]}}


def _phase(core: client.CoreV1Api, namespace: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, namespace).status.phase)


def test_pods_run_after_a_restart_and_a_running_pod_survives_it(
        cluster: cluster_client.Cluster, namespace: str) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    utils.create_from_dict(api, _pod("through", "sleep 600"), namespace=namespace)
    cluster_client.wait_for(lambda: _phase(core, namespace, "through") == "Running", what="the first pod to run")
    before = core.read_namespaced_pod("through", namespace).status.container_statuses[0].state.running.started_at

    argv = control_plane.kill(cluster, "kube-apiserver")
    time.sleep(DOWN_SECONDS)
    control_plane.start(cluster, "kube-apiserver", argv)
    control_plane.api_ready(cluster)

    api = cluster.api_client()
    core = client.CoreV1Api(api)
    utils.create_from_dict(api, _pod("after", "echo ran > /dev/termination-log"), namespace=namespace)
    cluster_client.wait_for(lambda: _phase(core, namespace, "after") == "Succeeded", timeout=60,
                            what="a pod created after the restart to run to completion")
    after = core.read_namespaced_pod("after", namespace).status.container_statuses[0].state.terminated
    assert (after.exit_code, after.message.strip()) == (0, "ran")

    through = core.read_namespaced_pod("through", namespace).status
    assert through.phase == "Running"
    assert through.container_statuses[0].state.running.started_at == before, "the process was started again"
    core.delete_namespaced_pod("through", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("through", namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    cluster_client.wait_for(gone, timeout=30, what="the pod that ran through the restart to end when deleted")
