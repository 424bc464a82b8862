"""Real faults in the local control plane: a component killed with SIGKILL, as an OOM kill or a
lost node would end it, and started again with exactly the arguments it ran with."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

from fixtures import cluster_client
from kubernetes import client
from localcluster import controlplane


def kill(cluster: cluster_client.Cluster, component: str) -> list[str]:
    """SIGKILL ``component`` (``kube-apiserver``, ``etcd``, ...); returns its command line."""
    pidfile = cluster.paths.pids / f"{component}.pid"
    pid = int(pidfile.read_text())
    argv = [part.decode() for part in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part]
    os.killpg(pid, signal.SIGKILL)  # started in a session of its own: the group is the process
    deadline = time.monotonic() + 30
    while controlplane.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not controlplane.alive(pid), f"{component} ({pid}) survived SIGKILL"
    return argv


def start(cluster: cluster_client.Cluster, component: str, argv: list[str]) -> None:
    """Start ``component`` again as the control plane did (its log appended, its pid file rewritten)."""
    with (cluster.paths.logs / f"{component}.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (cluster.paths.pids / f"{component}.pid").write_text(str(proc.pid))


def api_ready(cluster: cluster_client.Cluster, timeout: float = 90) -> float:
    """Wait until the API server answers again; returns the seconds waited."""
    started = time.monotonic()
    core = client.CoreV1Api(cluster.api_client())

    def answers() -> bool:
        try:
            core.list_namespace(limit=1, _request_timeout=2)
        except Exception:  # refused, reset, 503 while it starts: not yet
            return False
        return True

    cluster_client.wait_for(answers, timeout=timeout, interval=0.5, what="the API server to answer again")
    return time.monotonic() - started
