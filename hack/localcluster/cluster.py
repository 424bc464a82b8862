"""The whole local cluster as one unit: control plane plus node agent, up and down."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

from kubernetes import client, config

from localcluster import controlplane, nodes, realnode

REPO = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("KQUANT_CACHE", pathlib.Path.home() / ".cache/kquant"))


def build_binaries() -> pathlib.Path:
    """Build (or find in the cache) the control-plane binaries; return their folder."""
    done = subprocess.run(["bash", str(REPO / "hack/build-k8s.sh")], check=True,
                          stdout=subprocess.PIPE, text=True)
    return pathlib.Path(done.stdout.strip().splitlines()[-1])


def api_client(paths: controlplane.ClusterPaths) -> client.ApiClient:
    return config.new_client_from_config(str(paths.kubeconfig))


def wait_nodes_ready(paths: controlplane.ClusterPaths, count: int, timeout: float = 60.0) -> None:
    core = client.CoreV1Api(api_client(paths))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [n for n in core.list_node().items
                 if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])]
        if len(ready) >= count:
            return
        time.sleep(0.3)
    raise RuntimeError(f"nodes not Ready after {timeout:.0f}s; see {paths.logs / 'agent.log'}")


def agent_environment() -> dict[str, str]:
    """What the agent passes on to pods: where the venv and the llama.cpp tools are."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "hack"), PYTHONSAFEPATH="1")
    env.setdefault("KQUANT_VENV", str(pathlib.Path(sys.executable).parents[1]))
    env.setdefault("KQUANT_REPO", str(REPO))
    env.setdefault("LLAMA_CPP_BIN", str(CACHE / "llama.cpp/0.3.36/bin"))
    # The quantizer image carries llama-imatrix; here the pods' PATH (the agent's) leads to the tools.
    env["PATH"] = f"{env['LLAMA_CPP_BIN']}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def up(paths: controlplane.ClusterPaths, bin_dir: pathlib.Path | None = None,
       real_node: bool = False) -> controlplane.ClusterState:
    """Start the control plane and the node agent; return once every node is Ready.

    ``real_node`` adds a node run by a real kubelet with containerd (realnode.py) beside the
    simulated ones; it needs root and Debian's container packages (realnode.unavailable_reason).
    """
    # With a real node, the `kubernetes` Service points at the node's address (realnode's relay),
    # so in-cluster clients in its pods reach the API server through the ClusterIP.
    state = controlplane.start(paths, bin_dir or build_binaries(),
                               advertise_address=realnode.NODE_IP if real_node else "127.0.0.1")
    argv = [sys.executable, "-P", "-m", "localcluster", "--root", str(paths.root), "agent"]
    with (paths.logs / "agent.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=agent_environment(), start_new_session=True)
    (paths.pids / "agent.pid").write_text(str(proc.pid))
    if real_node:
        realnode.start(paths, realnode.build_node_binaries())
    wait_nodes_ready(paths, len(nodes.DEFAULT_NODES) + (1 if real_node else 0), timeout=120 if real_node else 60)
    return state


def down(paths: controlplane.ClusterPaths) -> None:
    realnode.stop(paths)
    controlplane.stop_all(paths)
    unmount_volumes(paths)


def unmount_volumes(paths: controlplane.ClusterPaths) -> None:
    """Unmount the sized volumes (tmpfs, agent.SIZED_STORAGE_CLASS) still under the cluster's
    folder: their memory is freed and the folder can be removed."""
    root = str(paths.root.resolve()) + "/"
    mounted = [line.split()[1] for line in pathlib.Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounted if m.startswith(root)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=30)
