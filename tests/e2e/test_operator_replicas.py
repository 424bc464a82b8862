"""Two operator replicas with kopf peering, as the chart runs them with replicaCount 2: one acts,
the other waits, and when the active one is stopped (a rolling update, a drained node) the other
carries the same model on from where it stood.

Builds and servers run ``registry.k8s.io/pause`` and the test writes the build's final report
into its ConfigMap itself, so what is checked is who acts, not the quantizer.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import pytest
import yaml
from e2e_helpers import OperatorProcess
from fixtures import cluster_client
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD_JOBS = "!kquant.dev/step"
"""Build Jobs only: the sizing Job (label kquant.dev/step=size) runs before the first build."""
PAUSE = "registry.k8s.io/pause:3.10"


def _install_peering_crds(cluster: cluster_client.Cluster) -> None:
    ext = client.ApiextensionsV1Api(cluster.api_client())
    for crd in yaml.safe_load_all((REPO / "charts/kquant/crds/kopf.dev_peerings.yaml").read_text()):
        try:
            ext.create_custom_resource_definition(crd)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    custom = client.CustomObjectsApi(cluster.api_client())
    cluster_client.wait_for(
        lambda: custom.list_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings") is not None,
        timeout=60, what="ClusterKopfPeerings to be served")


def _model() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": "twin"}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"].update({"variant": "q8", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    return body


def _report(digest: str) -> str:
    variant = {"name": "q8", "digest": digest, "type": "Q8_0", "recipe": "uniform", "sizeBytes": 144_810_432,
               "path": f"/var/lib/kquant/{digest}/q8.gguf", "bitsPerWeight": 8.5, "gatePassed": True}
    return json.dumps({"status": "Succeeded", "quantizerVersion": "0.1.0", "variants": [variant]})


def test_one_replica_acts_and_the_other_takes_over(cluster: cluster_client.Cluster, crd: None, namespace: str,
                                                  operator_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> None:
    _install_peering_crds(cluster)
    api = cluster.api_client()
    custom, core, batch, apps = (client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api),
                                 client.AppsV1Api(api))
    peering = f"kquant-{namespace}"
    custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                         "metadata": {"name": peering}})
    first, second = (OperatorProcess(operator_kubeconfig, tmp_path / f"{name}.log", ("--peering", peering),
                                     {"KQUANT_PEERING_PRIORITY": priority})
                     for name, priority in (("first", "200"), ("second", "100")))
    first.start()
    second.start()
    try:
        time.sleep(5)  # peers find each other; the lower priority pauses
        custom.create_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", _model())
        [job] = cluster_client.wait_for(
            lambda: batch.list_namespaced_job(namespace, label_selector=BUILD_JOBS).items, timeout=90,
            what="the build Job")
        time.sleep(5)
        jobs = batch.list_namespaced_job(namespace, label_selector=BUILD_JOBS).items
        assert len(jobs) == 1, "two replicas made two Jobs"
        assert "started build" in first.log.read_text() and "started build" not in second.log.read_text()

        first.stop()  # SIGTERM: kopf leaves the peering, the other replica resumes at once
        digest = job.metadata.labels["kquant.dev/digest"]  # the whole 16-digit build digest
        core.patch_namespaced_config_map(job.metadata.name, namespace,
                                          {"data": {"progress": "done", "report": _report(digest)}})
        cluster_client.wait_for(
            lambda: apps.list_namespaced_deployment(namespace, label_selector="kquant.dev/model=twin").items,
            timeout=90, what="the second replica to roll out the served variant")
        cluster_client.wait_for(lambda: "rolling out q8" in second.log.read_text(), timeout=10,
                                what="the second replica's log to say it rolled out")
        assert len(batch.list_namespaced_job(namespace, label_selector=BUILD_JOBS).items) == 1
    finally:
        first.stop()
        second.stop()
        custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
