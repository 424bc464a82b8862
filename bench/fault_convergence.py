"""How the operator recovers from each fault of tests/faults, on the real local control plane.

Each round creates a QuantizedModel with two variants, injects the fault while the first build
runs, then finishes both builds (writes their reports, as the quantizer would) and waits for the
model to converge: both variants built, the promoted one rolled out. The faults:
  * ``kube-apiserver``, ``etcd``: SIGKILLed, kept down ``--down`` seconds, started again;
  * ``operator``: the operator SIGKILLed and started again;
  * ``watch-reset``, ``watch-blackhole``: every connection of the operator to kube-apiserver cut
    (closed at once, or left open with every byte dropped) through a forwarder it talks through.
Prints, per fault over ``--rounds`` rounds:
  * time from the fault's end (the API server answering again, the operator started again, the
    cut) to the model's convergence (p50, p99);
  * duplicate Jobs (a build with two Jobs), objects without the model's ownerReference, Events
    posted twice, and objects left 60 s after the model was deleted (goal 0 for each); when some
    are, how long until they are gone (up to 5 minutes) and kube-controller-manager's log meanwhile;
  * models that did not converge within 180 s (goal 0);
  * the operator's RSS before and after.

The operator runs as ``kquant operator`` with a token of the chart's ServiceAccount. Builds and
servers run ``registry.k8s.io/pause``: the numbers measure the operator, not the quantizer.

    .venv/bin/python -P bench/fault_convergence.py [--rounds 5] [--down 10] [--faults operator,etcd]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from kubernetes import client, utils

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests"), str(REPO / "tests" / "faults")]

import control_plane  # noqa: E402
import model_checks as mc  # noqa: E402
import tcp_proxy  # noqa: E402
from e2e_helpers import OperatorProcess, chart_operator_kubeconfig  # noqa: E402
from fixtures import cluster_client  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane  # noqa: E402

NAMESPACE = "bench"
FAULTS = ("kube-apiserver", "etcd", "operator", "watch-reset", "watch-blackhole")
CONVERGE_SECONDS = 180


def _rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Bench:
    def __init__(self, cluster: cluster_client.Cluster, operator: OperatorProcess, proxy: tcp_proxy.Proxy,
                 down: float) -> None:
        self.cluster, self.operator, self.proxy, self.down = cluster, operator, proxy, down

    def inject(self, fault: str) -> None:
        """The fault, ended: returns when the component is back (or the cut is made)."""
        if fault in ("kube-apiserver", "etcd"):
            argv = control_plane.kill(self.cluster, fault)
            time.sleep(self.down)
            control_plane.start(self.cluster, fault, argv)
            control_plane.api_ready(self.cluster)
        elif fault == "operator":
            self.operator.kill()
            self.operator.start()
        else:
            time.sleep(2)  # the pass that made the Job has finished; only idle watches are open
            self.proxy.cut(fault.removeprefix("watch-"))

    def round(self, fault: str, name: str) -> dict[str, Any]:
        apis = mc.Apis(self.cluster)
        uid = apis.custom.create_namespaced_custom_object(mc.GROUP, mc.VERSION, NAMESPACE, mc.PLURAL,
                                                          mc.model(name))["metadata"]["uid"]
        cluster_client.wait_for(lambda: mc.jobs(apis, NAMESPACE, name), timeout=60, what="the first Job")
        self.inject(fault)
        recovered = time.monotonic()
        apis = mc.Apis(self.cluster)  # a fresh pool: a restarted server's old sockets are dead
        finished: set[str] = set()

        def converged() -> bool:
            for job in mc.jobs(apis, NAMESPACE, name):
                if job.metadata.name not in finished:
                    mc.finish(apis, NAMESPACE, job)
                    finished.add(job.metadata.name)
            return mc.converged(self.cluster, NAMESPACE, name, built=2) is not None

        try:
            cluster_client.wait_for(converged, timeout=CONVERGE_SECONDS, interval=0.3)
            seconds: float | None = time.monotonic() - recovered
        except AssertionError:
            seconds = None
        duplicates = len(mc.duplicate_jobs(apis, NAMESPACE, name))
        orphans = len(mc.not_owned(mc.made(apis, NAMESPACE, name), uid))
        twice = len(mc.events_twice(apis, NAMESPACE, name))
        gc_log = self.cluster.paths.logs / "kube-controller-manager.log"
        gc_log_from = gc_log.stat().st_size if gc_log.exists() else 0
        apis.custom.delete_namespaced_custom_object(mc.GROUP, mc.VERSION, NAMESPACE, mc.PLURAL, name)
        deleted = time.monotonic()
        while (left := mc.made(apis, NAMESPACE, name)) and time.monotonic() < deleted + 60:
            time.sleep(1)
        for o in left:  # what the garbage collector has not taken, and why it might not have
            owners = [(r.kind, r.name, r.uid == uid) for r in o.metadata.owner_references or []]
            print(f"  left after deletion: {type(o).__name__} {o.metadata.name} owners={owners} "
                  f"deleting={o.metadata.deletion_timestamp} finalizers={o.metadata.finalizers}", flush=True)
        if left:  # how late does the garbage collector catch up, and what does its log say meanwhile?
            while mc.made(apis, NAMESPACE, name) and time.monotonic() < deleted + LATE_GC_SECONDS:
                time.sleep(1)
            still = mc.made(apis, NAMESPACE, name)
            print(f"  {'still there' if still else 'all gone'} {time.monotonic() - deleted:.0f} s after the deletion",
                  flush=True)
            _print_gc_log(gc_log, gc_log_from)
        return {"seconds": seconds, "duplicates": duplicates, "orphans": orphans, "twice": twice, "left": len(left)}


LATE_GC_SECONDS = 300
"""How long a round waits, once objects outlived the 60 s check, to see when they are collected."""


def _print_gc_log(log: pathlib.Path, offset: int) -> None:
    """kube-controller-manager's lines about the garbage collector and its informers since ``offset``."""
    if not log.exists():
        return
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    words = ("garbagecollector.go", "graph_builder.go", "quantizedmodel", "failed to discover", "reflector.go")
    shown = [line for line in lines if any(w in line.lower() for w in words)]
    print(f"  kube-controller-manager log since the deletion: {len(lines)} lines, {len(shown)} about the "
          "garbage collector or watches:", flush=True)
    for line in shown[:60]:
        print(f"    {line[:300]}", flush=True)


def _report(fault: str, results: list[dict[str, Any]], down: float) -> None:
    what = f"{fault} SIGKILLed, down {down:.0f} s" if fault in ("kube-apiserver", "etcd") else fault
    print(f"{what}: {len(results)} rounds", flush=True)
    times = sorted(r["seconds"] for r in results if r["seconds"] is not None)
    if times:
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
        print(f"  converged after the fault ended: p50 {statistics.median(times):.1f} s, p99 {p99:.1f} s")

    def total(key: str) -> int:
        return sum(int(r[key]) for r in results)

    print(f"  not converged within {CONVERGE_SECONDS} s: {sum(1 for r in results if r['seconds'] is None)}; "
          f"duplicate Jobs: {total('duplicates')}; objects without their owner: {total('orphans')}; "
          f"Events posted twice: {total('twice')}; objects left 60 s after deletion: {total('left')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--down", type=float, default=10.0)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {', '.join(FAULTS)}")
    parser.add_argument("--logs", type=pathlib.Path,
                        help="copy the cluster's logs folder (kube-controller-manager's included) here at the end")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="kquant-faults-") as tmp:
        root = pathlib.Path(tmp)
        paths = controlplane.ClusterPaths(root / "cluster")
        bin_dir = localcluster.build_binaries()
        localcluster.up(paths, bin_dir)
        proxy: tcp_proxy.Proxy | None = None
        try:
            cluster = cluster_client.Cluster(paths, bin_dir)
            api = cluster.api_client()
            utils.create_from_yaml(api, str(REPO / "crds/kquant.dev_quantizedmodels.yaml"))
            time.sleep(3)
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
            cluster_client.wait_for(lambda: client.CoreV1Api(api).list_namespaced_service_account(
                NAMESPACE, field_selector="metadata.name=default").items)
            kubeconfig = chart_operator_kubeconfig(cluster, root / "operator-kubeconfig")
            proxy = tcp_proxy.Proxy(tcp_proxy.target_of(kubeconfig))
            operator = OperatorProcess(proxy.kubeconfig(kubeconfig, root / "proxied-kubeconfig"),
                                       root / "operator.log", env={"KQUANT_RESYNC_SECONDS": "30"})
            operator.start()
            assert operator.proc is not None
            rss_before = _rss(operator.proc.pid)
            bench = Bench(cluster, operator, proxy, args.down)
            for fault in faults:
                _report(fault, [bench.round(fault, f"{fault[:9]}-{i}") for i in range(args.rounds)], args.down)
            assert operator.proc is not None
            print(f"operator RSS: {rss_before / 2**20:.0f} MiB before, {_rss(operator.proc.pid) / 2**20:.0f} MiB after "
                  "(the operator fault restarts it: 'after' is the last process)")
            operator.stop()
        finally:
            if proxy is not None:
                proxy.close()
            localcluster.down(paths)
            if args.logs is not None:
                shutil.copytree(paths.logs, args.logs, dirs_exist_ok=True)


if __name__ == "__main__":
    main()
