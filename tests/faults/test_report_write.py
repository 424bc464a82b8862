"""The quantizer's final report survives an API server that is down when it is written: the
build's ConfigMapSink, with the real in-cluster patcher, writes into a real ConfigMap while
kube-apiserver is killed, and the report is there once the API server is back (its first tries
are refused: connection refused, then 503 while the server starts)."""

from __future__ import annotations

import threading
import time

import control_plane
import pytest
from fixtures import cluster_client
from kquant.quantizer import progress, report
from kubernetes import client
from kubernetes.config import kube_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
DOWN_SECONDS = 4


def test_the_report_reaches_its_configmap_across_an_api_server_restart(
        cluster: cluster_client.Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client reads $KUBECONFIG when it is imported, before the cluster fixture set it.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(cluster.kubeconfig))
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "build"}, "data": {"progress": "q8 quantizing"}})
    sink = progress.ConfigMapSink(progress.kubernetes_patcher("build", namespace))
    argv = control_plane.kill(cluster, "kube-apiserver")

    def come_back() -> None:
        time.sleep(DOWN_SECONDS)
        control_plane.start(cluster, "kube-apiserver", argv)

    restarter = threading.Thread(target=come_back, daemon=True)
    restarter.start()
    started = time.monotonic()
    sink.report(report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0"))
    took = time.monotonic() - started
    restarter.join()
    control_plane.api_ready(cluster)
    data = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map("build", namespace).data
    assert data["progress"] == "done" and '"status": "Succeeded"' in data["report"]
    assert took >= DOWN_SECONDS, "the first tries must have met the dead API server"
