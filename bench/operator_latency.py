"""Operator reaction times and memory, on the real local control plane.

Prints, with 1 and with N QuantizedModels present (default 200), and for a burst of N at once:
  * apply -> build Job created (p50, p99);
  * the quantizer's final report written into the build ConfigMap -> server Deployment created
    (p50, p99), which includes reading the report and planning offload over the cluster's nodes;
  * the operator's resident memory (VmRSS) with all N models present.

Builds and servers run ``registry.k8s.io/pause`` (a ``sleep`` on the local node agent), so the
numbers measure the operator, not the quantizer. The report each build "writes" is a real
BuildReport with the GGUF facts of SmolLM2-135M, so the planner does real work.

    .venv/bin/python -P bench/operator_latency.py [--models 200]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import yaml
from kubernetes import client, config, watch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

from kquant.operator import builds  # noqa: E402
from kquant.operator.api import v1alpha1 as api  # noqa: E402
from kquant.quantizer import gguf_facts, report  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane  # noqa: E402

PAUSE = "registry.k8s.io/pause:3.10"


class FirstSeen:
    """Watches one kind and records when an object of each model first appears."""

    def __init__(self, lister: Any, label: str = "kquant.dev/model") -> None:
        self.times: dict[str, float] = {}
        self._lister, self._label = lister, label
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # the cluster goes away at the end of the run
            return

    def _watch(self) -> None:
        while True:
            for event in watch.Watch().stream(self._lister, label_selector=self._label, timeout_seconds=600):
                obj = event["object"]  # a dict: the lister is a lambda, so no type to deserialise into
                labels = obj["metadata"]["labels"] if isinstance(obj, dict) else obj.metadata.labels
                model = labels[self._label]
                self.times.setdefault(model, time.monotonic())


def manifest(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"].update({"variant": "q8", "gpus": 1, "gpuLayers": "auto", "image": PAUSE})
    body["spec"]["quantizer"] = {"gpus": 0, "image": PAUSE}
    return body


def final_report(qm: dict[str, Any], namespace: str, facts: dict[str, Any]) -> str:
    model = api.QuantizedModel.model_validate({**qm, "metadata": {"name": qm["metadata"]["name"],
                                                                  "namespace": namespace, "uid": "x"}})
    build = builds.plan_builds(model, namespace)[0]
    variant = report.VariantReport(
        name="q8", digest=build.digest, type="Q8_0", recipe="uniform", size_bytes=144_810_432,
        path=f"{builds.STORAGE_MOUNT}/{build.digest}/q8.gguf", bits_per_weight=8.5, gate_passed=True,
        facts=facts)
    return report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0.1.0",
                              variants=[variant]).to_json()


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms   (n={len(ordered)})"


def measure(custom: client.CustomObjectsApi, core: client.CoreV1Api, names: list[str], namespace: str,
            facts: dict[str, Any], jobs: FirstSeen, deployments: FirstSeen,
            one_at_a_time: bool) -> tuple[list[float], list[float]]:
    """Apply each model, then write its final report; ``one_at_a_time`` waits for each reaction
    before the next (the latency a user sees), else everything is sent as one burst."""
    applied: dict[str, float] = {}
    reported: dict[str, float] = {}

    def wait(seen: FirstSeen, wanted: list[str]) -> None:
        deadline = time.monotonic() + 900
        while any(n not in seen.times for n in wanted) and time.monotonic() < deadline:
            time.sleep(0.01)

    for name in names:
        applied[name] = time.monotonic()
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, manifest(name))
        if one_at_a_time:
            wait(jobs, [name])
    wait(jobs, names)
    for name in names:
        qm = manifest(name)
        build = builds.plan_builds(api.QuantizedModel.model_validate(
            {**qm, "metadata": {"name": name, "namespace": namespace, "uid": "x"}}), namespace)[0]
        reported[name] = time.monotonic()
        core.patch_namespaced_config_map(build.name, namespace,
                                         {"data": {"progress": "done", "report": final_report(qm, namespace, facts)}})
        if one_at_a_time:
            wait(deployments, [name])
    wait(deployments, names)
    to_job = [jobs.times[n] - applied[n] for n in names if n in jobs.times]
    to_deployment = [deployments.times[n] - reported[n] for n in names if n in deployments.times]
    return to_job, to_deployment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--probes", type=int, default=25, help="models applied one at a time (5 at the start)")
    args = parser.parse_args()
    from fixtures import smollm2

    facts = gguf_facts.read_facts(smollm2.gguf_path()).model_dump(mode="json")
    root = pathlib.Path(tempfile.mkdtemp(prefix="kquant-bench-"))
    paths = controlplane.ClusterPaths(root)
    localcluster.up(paths)
    operator = None
    try:
        api_client = config.new_client_from_config(str(paths.kubeconfig))
        ext = client.ApiextensionsV1Api(api_client)
        crd = yaml.safe_load((REPO / "crds/kquant.dev_quantizedmodels.yaml").read_text())
        ext.create_custom_resource_definition(crd)
        time.sleep(3)
        core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        namespace = "bench"
        core.create_namespace({"metadata": {"name": namespace}})
        time.sleep(2)
        # As the chart runs it: MALLOC_ARENA_MAX=2 (see charts/kquant/templates/deployment.yaml).
        env = dict(os.environ, KUBECONFIG=str(paths.kubeconfig), PYTHONSAFEPATH="1",
                   MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"))
        log = (root / "operator.log").open("wb")
        operator = subprocess.Popen([str(pathlib.Path(sys.executable).with_name("kquant")), "operator"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(5)
        jobs = FirstSeen(lambda **kw: client.BatchV1Api(api_client).list_namespaced_job(namespace, **kw))
        deployments = FirstSeen(lambda **kw: client.AppsV1Api(api_client).list_namespaced_deployment(namespace, **kw))
        print(f"operator RSS at start: {rss_mib(operator.pid):.0f} MiB")
        probes = [f"p{i:02d}" for i in range(args.probes)]
        one_job, one_dep = measure(custom, core, probes[:5], namespace, facts, jobs, deployments, True)
        print(f"1 model present:        apply -> Job          {percentiles(one_job)}")
        print(f"1 model present:        report -> Deployment  {percentiles(one_dep)}")
        rest = [f"m{i:03d}" for i in range(args.models - 5)]
        burst_job, burst_dep = measure(custom, core, rest, namespace, facts, jobs, deployments, False)
        print(f"burst of {len(rest)} at once:   apply -> Job          {percentiles(burst_job)}")
        print(f"burst of {len(rest)} at once:   report -> Deployment  {percentiles(burst_dep)}")
        time.sleep(20)  # let the burst settle: what follows is the steady state
        many_job, many_dep = measure(custom, core, probes[5:], namespace, facts, jobs, deployments, True)
        print(f"{args.models} models present:  apply -> Job          {percentiles(many_job)}")
        print(f"{args.models} models present:  report -> Deployment  {percentiles(many_dep)}")
        time.sleep(10)
        print(f"operator RSS with {args.models + len(probes) - 5} models: {rss_mib(operator.pid):.0f} MiB")
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        localcluster.down(paths)


if __name__ == "__main__":
    main()
