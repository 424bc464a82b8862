"""How a build's progress and report reach the operator: what the channel carries, and what the
per-build identity (ServiceAccount + Role + RoleBinding) costs. The numbers behind the choice in
docs/security.md ("Each build's ServiceAccount, and why it stays").

1. **What the channel carries.** A real build of SmolLM2-135M-Instruct (fetch through
   ``tests/hub_server.py``, convert, calibrate, reference, quantize, evaluate, publish: one variant, as
   one build Job of the operator runs) whose sink is the quantizer's own ``ConfigMapSink`` with a
   patcher that records each write instead of sending it. Printed: how many writes, when, their sizes,
   and the size of the final report against the 4096 bytes a container's termination message holds.
   The 16-bit GGUF is split into shards of ``--shard-mib`` so the report lists several files, as a
   large model's does.
2. **What the per-build identity costs.** On the real local control plane, for ``--builds`` builds:
   the time to create the ServiceAccount, Role and RoleBinding (and to delete them), against the time
   to create the result ConfigMap the build needs in every design.

    PYTHONSAFEPATH=1 .venv/bin/python -P bench/report_channel.py [--builds 50] [--shard-mib 64]
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from kubernetes import client

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

from kquant.quantizer import pipeline, progress, report, settings  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane  # noqa: E402

TERMINATION_MESSAGE_LIMIT = 4096
"""Bytes of one container's termination message that the kubelet keeps (the API's documented cap)."""

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class RecordedWrite:
    def __init__(self, at: float, data: dict[str, str]) -> None:
        self.at = at
        self.keys = sorted(data)
        self.bytes = sum(len(v.encode()) for v in data.values())


def channel(shard_mib: int, chunks: int) -> None:
    from fixtures import smollm2
    from hub_server import FakeHub

    writes: list[RecordedWrite] = []
    start = time.monotonic()

    def record(data: dict[str, str]) -> None:
        writes.append(RecordedWrite(time.monotonic() - start, data))

    sink = progress.ConfigMapSink(record)
    with tempfile.TemporaryDirectory() as tmp, FakeHub() as hub:
        hub.add_repo(REPO_ID, smollm2.hf_dir())
        spec = settings.parse_spec({
            "source": {"huggingface": {"repo": REPO_ID, "endpoint": hub.url,
                                       "allowPatterns": ["*.json", "*.safetensors", "*.jinja"]}},
            "calibration": {"chunks": chunks, "contextSize": 512},
            "convertType": "f16",
            "variants": [{"name": "dyn", "type": "Q4_K_M", "recipe": "dynamic"}],
            "evaluation": {"chunks": chunks, "contextSize": 512},
            "storageRoot": str(pathlib.Path(tmp) / "claim"),
            "maxShardBytes": shard_mib << 20,
            "threads": os.cpu_count() or 1,
        })
        result = pipeline.BuildRunner(spec, sink, env={}).run()
    if result.status is not report.BuildStatus.SUCCEEDED:
        raise SystemExit(f"build failed in {result.failed_step}: {result.reason}")
    final = writes[-1]
    reports = [w for w in writes if "report" in w.keys]
    progress_writes = [w for w in writes if w.keys == ["progress"]]
    files = sum(len(v.files) for v in result.variants)
    report_bytes = len(result.to_json().encode())
    print(f"== 1. the channel during one real build (SmolLM2, Q4_K_M dynamic, {files} published files)")
    print(f"build wall time                         {final.at:8.1f} s")
    print(f"writes in all                           {len(writes):8d}")
    print(f"  progress writes before the report     {len(progress_writes):8d}")
    if progress_writes:
        gaps = [b.at - a.at for a, b in itertools.pairwise(progress_writes)]
        print(f"  first progress write after            {progress_writes[0].at:8.1f} s")
        if gaps:
            print(f"  longest gap between progress writes   {max(gaps):8.1f} s")
    print(f"  report writes                         {len(reports):8d}")
    print(f"final report                            {report_bytes:8d} bytes")
    print(f"termination message limit               {TERMINATION_MESSAGE_LIMIT:8d} bytes "
          f"(report / limit = {report_bytes / TERMINATION_MESSAGE_LIMIT:.2f})")
    bare = result.model_copy(update={"variants": [v.model_copy(update={"files": []}) for v in result.variants]})
    bare_bytes = len(bare.to_json().encode())
    print(f"the same report without its file list  {bare_bytes:8d} bytes "
          f"({(report_bytes - bare_bytes) // max(files, 1)} bytes per listed file: name, size, sha256)")


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1000:6.1f} ms   p95 {p95 * 1000:6.1f} ms"


def identity_cost(builds: int) -> None:
    paths = controlplane.ClusterPaths(pathlib.Path(tempfile.mkdtemp(prefix="kquant-bench-")))
    controlplane.start(paths, localcluster.build_binaries())  # the API server alone: no nodes needed
    try:
        api_client = localcluster.api_client(paths)
        core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
        ns = "bench-identity"
        core.create_namespace({"metadata": {"name": ns}})
        configmap, identity, removal = [], [], []
        for i in range(builds):
            name = f"m-v-{i:08x}"
            t0 = time.perf_counter()
            core.create_namespaced_config_map(ns, {"metadata": {"name": name}, "data": {"spec": "{}"}})
            t1 = time.perf_counter()
            core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
            rbac.create_namespaced_role(ns, _role(name))
            rbac.create_namespaced_role_binding(ns, _binding(name, ns))
            t2 = time.perf_counter()
            core.delete_namespaced_service_account(name, ns)
            rbac.delete_namespaced_role(name, ns)
            rbac.delete_namespaced_role_binding(name, ns)
            t3 = time.perf_counter()
            configmap.append(t1 - t0)
            identity.append(t2 - t1)
            removal.append(t3 - t2)
        print(f"\n== 2. the per-build identity on the real API server ({builds} builds)")
        print(f"result ConfigMap create (every design)      {_ms(configmap)}")
        print(f"ServiceAccount + Role + RoleBinding create  {_ms(identity)}")
        print(f"the same three deleted                      {_ms(removal)}")
        print("API writes per build: 2 without the identity (ConfigMap, Job), 5 with it, +3 deletes")
    finally:
        localcluster.down(paths)


def _role(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get", "patch"]}]}


def _binding(name: str, ns: str) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=50)
    parser.add_argument("--shard-mib", type=int, default=64, help="largest 16-bit GGUF shard, MiB")
    parser.add_argument("--chunks", type=int, default=2, help="calibration and evaluation chunks of 512 tokens")
    parser.add_argument("--sections", default="1,2")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if "1" in sections:
        channel(args.shard_mib, args.chunks)
    if "2" in sections:
        identity_cost(args.builds)


if __name__ == "__main__":
    main()
