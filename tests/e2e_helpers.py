"""Helpers for end-to-end tests: QuantizedModel status, the operator as a process, and the
credentials the chart gives it."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Any

import yaml
from fixtures import cluster_client
from kubernetes import client
from localcluster import controlplane

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kquant"
CHART_NAMESPACE = "kquant-system"
CHART_RELEASE = "e2e"


def qm_status(cluster: cluster_client.Cluster, namespace: str, name: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(cluster.api_client())
    body = custom.get_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", name)
    status: dict[str, Any] = body.get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def chart_operator_kubeconfig(cluster: cluster_client.Cluster, path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig that carries a token of the chart's own operator ServiceAccount, with the
    chart's ClusterRole bound to it, rendered by helm from charts/kquant: the operator process then
    has exactly the rights an install gives it, so a call the chart does not allow fails here as it
    would in a cluster (the admin kubeconfig would hide it)."""
    rendered = subprocess.run(
        [str(cluster.helm), "template", CHART_RELEASE, str(CHART), "--namespace", CHART_NAMESPACE,
         "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"],
        capture_output=True, text=True, check=True, timeout=120,
        env={**os.environ, "HELM_CACHE_HOME": str(path.parent / "helm-cache"),
             "HELM_CONFIG_HOME": str(path.parent / "helm-config"), "HELM_DATA_HOME": str(path.parent / "helm-data")})
    api = cluster.api_client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": CHART_NAMESPACE}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    account = ""
    for doc in (d for d in yaml.safe_load_all(rendered.stdout) if d):
        kind, name = doc["kind"], doc["metadata"]["name"]
        create, replace = {
            "ServiceAccount": (lambda b: core.create_namespaced_service_account(CHART_NAMESPACE, b), None),
            "ClusterRole": (rbac.create_cluster_role, rbac.replace_cluster_role),
            "ClusterRoleBinding": (rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding),
        }[kind]
        if kind == "ServiceAccount":
            account = name
        try:
            create(doc)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            if replace is not None:
                replace(name, doc)
    token = core.create_namespaced_service_account_token(
        account, CHART_NAMESPACE, {"spec": {"expirationSeconds": 86400}}).status.token
    admin = json.loads(cluster.kubeconfig.read_text())
    entry = admin["clusters"][0]["cluster"]
    controlplane.write_kubeconfig(path, entry["server"], pathlib.Path(entry["certificate-authority"]), token,
                                  user=f"system:serviceaccount:{CHART_NAMESPACE}:{account}")
    return path


TROUBLE = re.compile(r"Forbidden|Traceback|\b403\b")


def log_trouble(log: pathlib.Path) -> list[str]:
    """Lines of an operator log that show a refused call or an unhandled exception."""
    return [line for line in log.read_text(errors="replace").splitlines() if TROUBLE.search(line)]


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
