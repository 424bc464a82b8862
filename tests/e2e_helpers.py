"""Helpers for reading QuantizedModel status in tests."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

from fixtures import cluster_client
from kubernetes import client


def qm_status(cluster: cluster_client.Cluster, namespace: str, name: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(cluster.api_client())
    body = custom.get_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", name)
    status: dict[str, Any] = body.get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


class OperatorProcess:
    """``kquant operator`` as a separate process against the local cluster, restartable."""

    def __init__(self, kubeconfig: pathlib.Path, log: pathlib.Path, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONSAFEPATH="1", **self.env)
        command = [str(pathlib.Path(sys.executable).with_name("kquant")), "operator", *self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        time.sleep(3)  # kopf needs a moment to list and watch; a crash at start shows here
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would end it: no cleanup runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
