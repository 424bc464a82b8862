"""The local cluster is a real Kubernetes: scheduling, Jobs, garbage collection, admission, probes."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from fixtures import cluster_client
from kubernetes import client, utils

pytestmark = pytest.mark.integration


def _shell_pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "busybox", "command": ["sh", "-c", script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def _job(name: str, script: str, backoff_limit: int = 0) -> dict[str, Any]:
    template = _shell_pod(name, script)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff_limit, "template": {"spec": template["spec"]}}}


def _condition(conditions: list[Any] | None, kind: str) -> Any:
    return next((c for c in conditions or [] if c.type == kind), None)


def test_nodes_carry_gpu_labels_and_capacity(cluster: cluster_client.Cluster) -> None:
    core = client.CoreV1Api(cluster.api_client())
    nodes = {n.metadata.name: n for n in core.list_node().items}
    big = nodes["gpu-8x80g"]
    assert big.metadata.labels["nvidia.com/gpu.count"] == "8"
    assert big.metadata.labels["nvidia.com/gpu.memory"] == "81559"
    assert big.status.allocatable["nvidia.com/gpu"] == "8"
    assert nodes["gpu-24g"].metadata.labels["nvidia.com/gpu.memory"] == "24564"
    assert "nvidia.com/gpu" not in nodes["cpu-only"].status.capacity
    assert all(_condition(n.status.conditions, "Ready").status == "True" for n in nodes.values())


def test_scheduler_places_gpu_pods_by_capacity(cluster: cluster_client.Cluster, namespace: str) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    for name, gpus in (("eight", 8), ("sixteen", 16)):
        pod = _shell_pod(name, "sleep 600",
                         container={"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}})
        utils.create_from_dict(api, pod, namespace=namespace)
    running = cluster_client.wait_for(
        lambda: (p := core.read_namespaced_pod("eight", namespace)).status.phase == "Running"
        and p, what="the 8-GPU pod to run")
    assert running.spec.node_name == "gpu-8x80g"

    def unschedulable() -> Any:
        pod = core.read_namespaced_pod("sixteen", namespace)
        scheduled = _condition(pod.status.conditions, "PodScheduled")
        return scheduled if scheduled and scheduled.reason == "Unschedulable" else None

    scheduled = cluster_client.wait_for(unschedulable, what="the 16-GPU pod to be unschedulable")
    assert pod_phase(core, namespace, "sixteen") == "Pending"
    assert "Insufficient nvidia.com/gpu" in scheduled.message


def pod_phase(core: client.CoreV1Api, namespace: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, namespace).status.phase)


def test_job_that_exits_zero_completes_with_its_message(cluster: cluster_client.Cluster, namespace: str) -> None:
    api = cluster.api_client()
    utils.create_from_dict(api, _job("ok", "echo all good > /dev/termination-log"), namespace=namespace)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    cluster_client.wait_for(
        lambda: _condition(batch.read_namespaced_job("ok", namespace).status.conditions, "Complete"),
        what="Job ok to complete")
    pod = core.list_namespaced_pod(namespace, label_selector="job-name=ok").items[0]
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message.strip()) == (0, "all good")


def test_job_that_exits_one_fails_after_backoff_limit(cluster: cluster_client.Cluster, namespace: str) -> None:
    api = cluster.api_client()
    utils.create_from_dict(api, _job("bad", "echo broken; exit 1", backoff_limit=1), namespace=namespace)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    failed = cluster_client.wait_for(lambda: _condition(batch.read_namespaced_job("bad", namespace).status.conditions,
                                                        "Failed"), timeout=90, what="Job bad to fail")
    assert failed.reason == "BackoffLimitExceeded"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=bad").items
    assert len(pods) == 2  # the first try plus one retry
    assert {p.status.container_statuses[0].state.terminated.exit_code for p in pods} == {1}


def test_deleting_an_owner_collects_its_children(cluster: cluster_client.Cluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        return not [c for c in core.list_namespaced_config_map(namespace).items
                    if c.metadata.name == "child"]

    cluster_client.wait_for(child_gone, what="the garbage collector to delete the child")


def test_structural_schema_refuses_a_bad_object(cluster: cluster_client.Cluster, namespace: str) -> None:
    api = cluster.api_client()
    ext = client.ApiextensionsV1Api(api)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.kquant.dev"},
        "spec": {"group": "test.kquant.dev", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {
                         "type": "object", "required": ["size"],
                         "properties": {"size": {"type": "integer", "minimum": 1}}}}}}}]},
    }
    try:
        ext.create_custom_resource_definition(crd)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    cluster_client.wait_for(lambda: _condition(ext.read_custom_resource_definition("widgets.test.kquant.dev")
                                               .status.conditions, "Established"), what="the CRD to be Established")
    custom = client.CustomObjectsApi(api)
    bad = {"apiVersion": "test.kquant.dev/v1", "kind": "Widget", "metadata": {"name": "w"},
           "spec": {"size": 0}}
    with pytest.raises(client.ApiException) as refused:
        cluster_client.wait_for(lambda: _create_or_404(custom, namespace, bad), what="the CRD's API to be served")
    assert refused.value.status == 422
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" \
        in refused.value.body


def _create_or_404(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> Any:
    try:
        return custom.create_namespaced_custom_object("test.kquant.dev", "v1", namespace, "widgets", body)
    except client.ApiException as exc:
        if exc.status == 404:  # discovery of a new CRD takes a moment
            return None
        raise


def test_deployment_with_failing_readiness_never_becomes_available(cluster: cluster_client.Cluster,
                                                                   namespace: str) -> None:
    api = cluster.api_client()
    apps = client.AppsV1Api(api)

    def deployment(name: str, probe_command: str) -> dict[str, Any]:
        container = {"name": "main", "image": "busybox", "command": ["sh", "-c", "sleep 600"],
                     "readinessProbe": {"exec": {"command": ["sh", "-c", probe_command]},
                                        "periodSeconds": 1}}
        labels = {"app": name}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}}}

    utils.create_from_dict(api, deployment("healthy", "true"), namespace=namespace)
    utils.create_from_dict(api, deployment("sick", "false"), namespace=namespace)
    cluster_client.wait_for(
        lambda: (apps.read_namespaced_deployment("healthy", namespace).status.available_replicas or 0) == 1,
        what="the healthy Deployment to become Available")
    sick = apps.read_namespaced_deployment("sick", namespace)
    assert not sick.status.available_replicas
    available = _condition(sick.status.conditions, "Available")
    assert available is not None and available.status == "False"
    core = client.CoreV1Api(api)
    pod = core.list_namespaced_pod(namespace, label_selector="app=sick").items[0]
    assert pod.status.phase == "Running"
    assert not pod.status.container_statuses[0].ready


def test_deleting_a_running_pod_stops_its_process_gracefully(cluster: cluster_client.Cluster, namespace: str,
                                                             tmp_path: pathlib.Path) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    marker = tmp_path / "terminated"
    script = "trap 'echo got TERM > /out/terminated; exit 0' TERM; while true; do sleep 0.2; done"
    pod = _shell_pod("graceful", script, container={"volumeMounts": [{"name": "out", "mountPath": "/out"}]},
                     volumes=[{"name": "out", "hostPath": {"path": str(tmp_path)}}])
    utils.create_from_dict(api, pod, namespace=namespace)
    cluster_client.wait_for(lambda: pod_phase(core, namespace, "graceful") == "Running", what="the pod to run")
    core.delete_namespaced_pod("graceful", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("graceful", namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    cluster_client.wait_for(gone, timeout=30, what="the deleted pod to disappear")
    assert marker.read_text().strip() == "got TERM"


def test_pod_logs_are_served_through_the_api(cluster: cluster_client.Cluster, namespace: str) -> None:
    """pods/log on a simulated node: the API server proxies to the agent's container-log endpoint
    (the operator's plan check reads llama-server's startup log this way)."""
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    script = "for i in 1 2 3 4 5; do echo line $i; done; sleep 30"
    utils.create_from_dict(api, _shell_pod("talker", script, nodeSelector={"kubernetes.io/hostname": "cpu-only"}),
                           namespace=namespace)

    def log_so_far() -> str:
        # Before its container starts the pod has no log: the API answers 400, or an empty body.
        try:
            return core.read_namespaced_pod_log("talker", namespace, container="main") or ""
        except client.ApiException:
            return ""

    cluster_client.wait_for(lambda: "line 5" in log_so_far(), what="the pod's log through the API")
    assert core.read_namespaced_pod_log("talker", namespace, tail_lines=2) == "line 4\nline 5\n"
    assert core.read_namespaced_pod_log("talker", namespace, limit_bytes=6) == "line 1"
    with pytest.raises(client.ApiException):
        core.read_namespaced_pod_log("no-such-pod", namespace)


def test_provisioned_volume_is_writable_by_non_root_pods(cluster: cluster_client.Cluster, namespace: str) -> None:
    """The local class's hostPath folders are world-writable, as a local-path provisioner makes
    them: hostPath gets no fsGroup change, and the real node's pods run as uid 65532."""
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                 "resources": {"requests": {"storage": "1Gi"}}}})
    claim = cluster_client.wait_for(
        lambda: (c := core.read_namespaced_persistent_volume_claim("data", namespace)).status.phase == "Bound" and c,
        timeout=60, what="the claim to be bound")
    folder = pathlib.Path(core.read_persistent_volume(claim.spec.volume_name).spec.host_path.path)
    assert folder.stat().st_mode & 0o777 == 0o777, oct(folder.stat().st_mode)
