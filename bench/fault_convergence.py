"""How the operator recovers from a killed kube-apiserver, on the real local control plane.

Each round creates a QuantizedModel with two variants, kills kube-apiserver (SIGKILL) while the
first build runs, keeps it down ``--down`` seconds, starts it again with the same arguments, then
finishes both builds (writes their reports, as the quantizer would) and waits for the model to
converge: both variants built, the promoted one rolled out. Prints, over ``--rounds`` rounds:
  * time from the API server answering again to the model's convergence (p50, p99);
  * duplicate Jobs (a build with two Jobs), objects without the model's ownerReference, and
    objects left 60 s after the model was deleted (goal 0 for each);
  * models that did not converge within 120 s (goal 0);
  * the operator's RSS before and after.

The operator runs as ``kquant operator`` with a token of the chart's ServiceAccount. Builds and
servers run ``registry.k8s.io/pause``: the numbers measure the operator, not the quantizer.

    .venv/bin/python -P bench/fault_convergence.py [--rounds 5] [--down 10]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import yaml
from kubernetes import client

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests"), str(REPO / "tests" / "faults")]

import control_plane  # noqa: E402
from e2e_helpers import OperatorProcess, chart_operator_kubeconfig  # noqa: E402
from fixtures import cluster_client  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane  # noqa: E402

PAUSE = "registry.k8s.io/pause:3.10"
GROUP, VERSION, PLURAL = "kquant.dev", "v1alpha1", "quantizedmodels"


def _model(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}, {"name": "q4", "type": "Q4_0"}]
    body["spec"]["serving"].update({"variant": "q8", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    return body


def _finish(core: client.CoreV1Api, namespace: str, job: Any) -> None:
    digest, variant = job.metadata.labels["kquant.dev/digest"], job.metadata.labels["kquant.dev/variant"]
    entry = {"name": variant, "digest": digest, "type": "Q8_0", "recipe": "uniform", "sizeBytes": 1,
             "path": f"/var/lib/kquant/{digest}/{variant}.gguf", "gatePassed": True}
    core.patch_namespaced_config_map(job.metadata.name, namespace, {"data": {"progress": "done", "report": json.dumps(
        {"status": "Succeeded", "quantizerVersion": "0.1.0", "variants": [entry]})}})


def _rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _round(cluster: cluster_client.Cluster, namespace: str, name: str, down: float) -> dict[str, Any]:
    api = cluster.api_client()
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _model(name))["metadata"]["uid"]
    selector = f"kquant.dev/model={name}"
    cluster_client.wait_for(lambda: batch.list_namespaced_job(namespace, label_selector=selector).items, timeout=60)
    argv = control_plane.kill(cluster, "kube-apiserver")
    time.sleep(down)
    control_plane.start(cluster, "kube-apiserver", argv)
    control_plane.api_ready(cluster)
    recovered = time.monotonic()
    api = cluster.api_client()
    custom, core, batch, apps = (client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api),
                                 client.AppsV1Api(api))
    finished: set[str] = set()

    def converged() -> bool:
        for job in batch.list_namespaced_job(namespace, label_selector=selector).items:
            if job.metadata.name not in finished:
                _finish(core, namespace, job)
                finished.add(job.metadata.name)
        body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = body.get("status") or {}
        built = [v for v in status.get("variants") or [] if v.get("gatePassed")]
        return len(built) == 2 and (status.get("serving") or {}).get("variant") == "q8" and bool(
            apps.list_namespaced_deployment(namespace, label_selector=selector).items)

    try:
        cluster_client.wait_for(converged, timeout=120, interval=0.3)
        seconds: float | None = time.monotonic() - recovered
    except AssertionError:
        seconds = None
    jobs = batch.list_namespaced_job(namespace, label_selector=selector).items
    names = [j.metadata.name for j in jobs]
    made = [*jobs, *core.list_namespaced_config_map(namespace, label_selector=selector).items,
            *apps.list_namespaced_deployment(namespace, label_selector=selector).items,
            *core.list_namespaced_service(namespace, label_selector=selector).items]
    orphans = sum(1 for o in made if uid not in {r.uid for r in o.metadata.owner_references or []})
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    time.sleep(60)
    remaining = [*batch.list_namespaced_job(namespace, label_selector=selector).items,
                 *core.list_namespaced_config_map(namespace, label_selector=selector).items,
                 *apps.list_namespaced_deployment(namespace, label_selector=selector).items]
    for o in remaining:  # what the garbage collector has not taken, and why it might not have
        owners = [(r.kind, r.name, r.uid == uid) for r in o.metadata.owner_references or []]
        print(f"  left after deletion: {type(o).__name__} {o.metadata.name} owners={owners} "
              f"deleting={o.metadata.deletion_timestamp} finalizers={o.metadata.finalizers}", flush=True)
    return {"seconds": seconds, "duplicates": len(names) - len(set(names)) + max(0, len(names) - 2),
            "orphans": orphans, "left": len(remaining)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--down", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kquant-faults-") as tmp:
        root = pathlib.Path(tmp)
        paths = controlplane.ClusterPaths(root / "cluster")
        bin_dir = localcluster.build_binaries()
        localcluster.up(paths, bin_dir)
        try:
            cluster = cluster_client.Cluster(paths, bin_dir)
            from kubernetes import utils

            api = cluster.api_client()
            utils.create_from_yaml(api, str(REPO / "crds/kquant.dev_quantizedmodels.yaml"))
            time.sleep(3)
            client.CoreV1Api(api).create_namespace({"metadata": {"name": "bench"}})
            cluster_client.wait_for(lambda: client.CoreV1Api(api).list_namespaced_service_account(
                "bench", field_selector="metadata.name=default").items)
            operator = OperatorProcess(chart_operator_kubeconfig(cluster, root / "operator-kubeconfig"),
                                       root / "operator.log", env={"KQUANT_RESYNC_SECONDS": "30"})
            operator.start()
            assert operator.proc is not None
            rss_before = _rss(operator.proc.pid)
            results = [_round(cluster, "bench", f"fault-{i}", args.down) for i in range(args.rounds)]
            rss_after = _rss(operator.proc.pid)
            operator.stop()
        finally:
            localcluster.down(paths)
    times = sorted(r["seconds"] for r in results if r["seconds"] is not None)
    print(f"kube-apiserver killed mid-build, down {args.down:.0f} s, {args.rounds} rounds")
    if times:
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
        print(f"  converged after recovery: p50 {statistics.median(times):.1f} s, p99 {p99:.1f} s")
    print(f"  not converged within 120 s: {sum(1 for r in results if r['seconds'] is None)}")
    print(f"  duplicate Jobs: {sum(r['duplicates'] for r in results)}")
    print(f"  objects without the model's ownerReference: {sum(r['orphans'] for r in results)}")
    print(f"  objects left 60 s after deletion: {sum(r['left'] for r in results)}")
    print(f"  operator RSS: {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB after")


if __name__ == "__main__":
    main()
