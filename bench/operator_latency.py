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
import dataclasses
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_round_trip(core: client.CoreV1Api, namespace: str, n: int = 10) -> str:
    """How fast the API server answers a write right now: the floor under every number above."""
    took = []
    for i in range(n):
        start = time.monotonic()
        core.create_namespaced_config_map(namespace, {"metadata": {"name": f"rtt-{i}"}}, _preload_content=False)
        took.append(time.monotonic() - start)
        core.delete_namespaced_config_map(f"rtt-{i}", namespace, _preload_content=False)
    return f"API server write round trip p50 {statistics.median(took) * 1000:.1f} ms, max {max(took) * 1000:.1f} ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> dict[str, float]:
    """The operator's own counters (kquant.operator.metrics), summed over labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            totals[name] = totals.get(name, 0.0) + value
    return totals


def passes_since(port: int, before: dict[str, float]) -> str:
    now = scrape(port)

    def delta(name: str) -> float:
        return now.get(name, 0.0) - before.get(name, 0.0)

    count = delta("kquant_reconcile_duration_seconds_count") or 1.0
    waits = delta("kquant_workqueue_wait_seconds_count") or 1.0
    return (f"operator: {delta('kquant_reconcile_duration_seconds_count'):.0f} passes, mean pass "
            f"{delta('kquant_reconcile_duration_seconds_sum') / count * 1000:.1f} ms, mean queue wait "
            f"{delta('kquant_workqueue_wait_seconds_sum') / waits * 1000:.1f} ms")


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


@dataclasses.dataclass
class Bench:
    """One local cluster with the CRD, a namespace, the operator and the two watchers."""

    api_client: client.ApiClient
    namespace: str
    facts: dict[str, Any]
    operator: subprocess.Popen[bytes]
    metrics_port: int
    jobs: FirstSeen
    deployments: FirstSeen

    def phase(self, label: str, names: list[str], one_at_a_time: bool) -> None:
        """Apply and report ``names``, then print both latencies and what the operator did."""
        core, custom = client.CoreV1Api(self.api_client), client.CustomObjectsApi(self.api_client)
        cpu_before, started, before = cpu_seconds(self.operator.pid), time.monotonic(), scrape(self.metrics_port)
        to_job, to_deployment = measure(custom, core, names, self.namespace, self.facts, self.jobs,
                                        self.deployments, one_at_a_time)
        print(f"{label:<24} apply -> Job          {percentiles(to_job)}")
        print(f"{label:<24} report -> Deployment  {percentiles(to_deployment)}")
        print(f"{'':<24} {passes_since(self.metrics_port, before)}; {time.monotonic() - started:.1f} s wall, "
              f"operator CPU {cpu_seconds(self.operator.pid) - cpu_before:.1f} s")

    def round_trip(self) -> None:
        print(api_round_trip(client.CoreV1Api(self.api_client), self.namespace))


def start(paths: controlplane.ClusterPaths, facts: dict[str, Any]) -> Bench:
    api_client = config.new_client_from_config(str(paths.kubeconfig))
    crd = yaml.safe_load((REPO / "crds/kquant.dev_quantizedmodels.yaml").read_text())
    client.ApiextensionsV1Api(api_client).create_custom_resource_definition(crd)
    time.sleep(3)
    namespace = "bench"
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": namespace}})
    time.sleep(2)
    # As the chart runs it: MALLOC_ARENA_MAX=2 (see charts/kquant/templates/deployment.yaml).
    metrics_port = free_port()
    env = dict(os.environ, KUBECONFIG=str(paths.kubeconfig), PYTHONSAFEPATH="1",
               KQUANT_METRICS_PORT=str(metrics_port), MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"))
    log = (paths.root / "operator.log").open("wb")
    operator = subprocess.Popen([str(pathlib.Path(sys.executable).with_name("kquant")), "operator"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    time.sleep(5)
    jobs = FirstSeen(lambda **kw: client.BatchV1Api(api_client).list_namespaced_job(namespace, **kw))
    deployments = FirstSeen(lambda **kw: client.AppsV1Api(api_client).list_namespaced_deployment(namespace, **kw))
    return Bench(api_client, namespace, facts, operator, metrics_port, jobs, deployments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--probes", type=int, default=25, help="models applied one at a time (5 at the start)")
    args = parser.parse_args()
    from fixtures import smollm2

    facts = gguf_facts.read_facts(smollm2.gguf_path()).model_dump(mode="json")
    paths = controlplane.ClusterPaths(pathlib.Path(tempfile.mkdtemp(prefix="kquant-bench-")))
    localcluster.up(paths)
    bench = None
    try:
        bench = start(paths, facts)
        print(f"operator RSS at start: {rss_mib(bench.operator.pid):.0f} MiB")
        bench.round_trip()
        probes = [f"p{i:02d}" for i in range(args.probes)]
        bench.phase("1 model present:", probes[:5], one_at_a_time=True)
        rest = [f"m{i:03d}" for i in range(args.models - 5)]
        bench.phase(f"burst of {len(rest)} at once:", rest, one_at_a_time=False)
        time.sleep(20)  # let the burst settle: what follows is the steady state
        bench.round_trip()
        bench.phase(f"{args.models} models present:", probes[5:], one_at_a_time=True)
        time.sleep(10)
        print(f"operator RSS with {args.models + len(probes) - 5} models: {rss_mib(bench.operator.pid):.0f} MiB")
    finally:
        if bench is not None:
            bench.operator.terminate()
            bench.operator.wait(timeout=30)
        localcluster.down(paths)


if __name__ == "__main__":
    main()
