"""Does the operator's memory follow the cluster, or grow with churn?

Runs ``--cycles`` apply/edit/delete cycles of QuantizedModels against one operator (``kquant
operator`` under the chart's ServiceAccount) on the real local control plane: each cycle applies
a model (the operator starts its build: ServiceAccount, Role, RoleBinding, ConfigMap, Job, and
the claim, which outlives the model by design and is found again by the next model of that
name), edits its spec so the build's digest changes (the operator cancels the first build and
starts another), and deletes it. Every ``--every`` cycles it waits until the cluster is quiet
(no model left, every object the operator made collected, the operator's queue empty) and
prints the operator's RSS and what it holds in memory (``kquant_held_objects``, per store:
each kopf index, the work queue's bookkeeping, the status ledger), plus what the cluster still
holds. Goal: both flat, no growth with cycles. Builds run ``registry.k8s.io/pause``.

    .venv/bin/python -P bench/operator_churn.py [--cycles 1000] [--every 100] [--window 4]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import socket
import sys
import tempfile
import time
import urllib.request
from typing import Any

import yaml
from kubernetes import client, utils

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

from e2e_helpers import OperatorProcess, chart_operator_kubeconfig  # noqa: E402
from fixtures import cluster_client  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane  # noqa: E402

PAUSE = "registry.k8s.io/pause:3.10"
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"
NAMESPACE = "churn"
SELECTOR = "app.kubernetes.io/managed-by=kquant"
RESYNC_SECONDS = 3
NAMES = 16
"""Model names cycle through this many, as a team re-applies the same few manifests: a model's
claim outlives it by design (the operator never deletes storage), and the next model of that
name finds it again instead of piling up a claim per cycle."""


def _model(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"].update({"variant": "q8", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    return body


def _rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _held(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    held = {m[1]: float(m[2]) for m in re.finditer(r'^kquant_held_objects\{store="([^"]+)"\} (\S+)$', text, re.M)}
    depth = re.search(r"^kquant_workqueue_depth (\S+)$", text, re.M)
    held["(queue depth)"] = float(depth[1]) if depth else -1
    return held


def _left(api: client.ApiClient) -> dict[str, int]:
    core, batch, rbac = client.CoreV1Api(api), client.BatchV1Api(api), client.RbacAuthorizationV1Api(api)
    custom = client.CustomObjectsApi(api)
    return {
        "models": len(custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]),
        "jobs": len(batch.list_namespaced_job(NAMESPACE, label_selector=SELECTOR).items),
        "pods": len(core.list_namespaced_pod(NAMESPACE).items),
        "configmaps": len(core.list_namespaced_config_map(NAMESPACE, label_selector=SELECTOR).items),
        "serviceaccounts": len(core.list_namespaced_service_account(NAMESPACE, label_selector=SELECTOR).items),
        "roles": len(rbac.list_namespaced_role(NAMESPACE, label_selector=SELECTOR).items),
        "rolebindings": len(rbac.list_namespaced_role_binding(NAMESPACE, label_selector=SELECTOR).items),
    }


def _quiet(api: client.ApiClient, port: int, timeout: float = 240) -> tuple[dict[str, int], dict[str, float], float]:
    """Wait until nothing is left in the cluster and the operator's counts show it (a resync
    after the last deletion); returns what is left, what is held and the seconds waited."""
    started = time.monotonic()
    left = _left(api)
    while any(left.values()) and time.monotonic() - started < timeout:
        time.sleep(2)
        left = _left(api)
    time.sleep(RESYNC_SECONDS * 2 + 1)  # two resyncs: the held counts are taken at each
    held = _held(port)
    while held.get("workqueue", 0) and time.monotonic() - started < timeout:
        time.sleep(RESYNC_SECONDS)
        held = _held(port)
    return left, held, time.monotonic() - started


def _cycle(custom: client.CustomObjectsApi, i: int, window: list[str], size: int) -> None:
    """Apply model ``i``, edit the one applied two cycles ago, delete the oldest past ``size``."""
    name = f"churn-{i % NAMES}"
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _model(name))
    window.append(name)
    if len(window) >= 2:
        edited = window[-2]
        custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, edited, {
            "spec": {"variants": [{"name": "q8", "type": "Q4_0"}]}})
    while len(window) > size:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, window.pop(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--window", type=int, default=4, help="models alive at once")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between cycles")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kquant-churn-") as tmp:
        root = pathlib.Path(tmp)
        paths = controlplane.ClusterPaths(root / "cluster")
        bin_dir = localcluster.build_binaries()
        localcluster.up(paths, bin_dir)
        try:
            cluster = cluster_client.Cluster(paths, bin_dir)
            api = cluster.api_client()
            utils.create_from_yaml(api, str(REPO / "crds/kquant.dev_quantizedmodels.yaml"))
            time.sleep(3)
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
            cluster_client.wait_for(lambda: client.CoreV1Api(api).list_namespaced_service_account(
                NAMESPACE, field_selector="metadata.name=default").items)
            port = _free_port()
            operator = OperatorProcess(chart_operator_kubeconfig(cluster, root / "operator-kubeconfig"),
                                       root / "operator.log", env={"KQUANT_RESYNC_SECONDS": str(RESYNC_SECONDS),
                                                                   "KQUANT_METRICS_PORT": str(port)})
            operator.start()
            assert operator.proc is not None
            custom = client.CustomObjectsApi(api)
            _, held, _ = _quiet(api, port)
            print(f"cycle     0: RSS {_rss(operator.proc.pid) / 2**20:6.1f} MiB; held {held}", flush=True)
            window: list[str] = []
            started = time.monotonic()
            for i in range(1, args.cycles + 1):
                _cycle(custom, i, window, args.window)
                time.sleep(args.pause)
                if i % args.every == 0:
                    while window:
                        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, window.pop(0))
                    left, held, waited = _quiet(api, port)
                    print(f"cycle {i:5d}: RSS {_rss(operator.proc.pid) / 2**20:6.1f} MiB; held {held}; "
                          f"left in the cluster {({k: v for k, v in left.items() if v}) or 'nothing'} "
                          f"(quiet after {waited:.0f} s; {time.monotonic() - started:.0f} s in all)", flush=True)
            trouble = [line for line in operator.log.read_text().splitlines() if "Traceback" in line]
            claims = len(client.CoreV1Api(api).list_namespaced_persistent_volume_claim(NAMESPACE).items)
            print(f"operator log: {len(trouble)} tracebacks; claims kept for the next model of their name: {claims}")
            operator.stop()
        finally:
            localcluster.down(paths)


if __name__ == "__main__":
    main()
