"""The chart's NetworkPolicy, enforced: only labelled clients and the metrics scraper reach a server.

llama-server listens on every address of its pod, /metrics included, and has no authentication
unless spec.serving.apiKeySecretRef is set. `networkPolicy.enabled` in the chart puts a policy in
front of every pod labelled `kquant.dev/role: server`. These tests render that policy with the real
chart (helm template), apply it on a cluster whose real node enforces NetworkPolicies (kube-router's
firewall, hack/localcluster/netpolicy.py), and try the attack: a pod of the same namespace without
the client label, and a pod of another namespace, open a connection to the server. The labelled
client and the scraper's namespace get through; the others time out.

The server pod stands in for llama-server with the same labels, port name and security context
(the policy selects by label and named port, not by image), so the test needs only the operator
image that the real-node tests already build.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from fixtures import cluster_client, node_images
from kubernetes import client
from kubernetes.stream import stream
from localcluster import cluster as localcluster
from localcluster import controlplane, netpolicy, realnode

pytestmark = [pytest.mark.integration, pytest.mark.realnode, pytest.mark.timeout(1500),
              node_images.NEEDS_CONTAINER_RUNTIME]

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kquant"
SCRAPER_NAMESPACE_LABEL = {"kquant.dev/test-monitoring": "true"}
SCRAPER_POD_LABEL = {"app": "prometheus"}




@pytest.fixture(scope="module")
def enforcing_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ClusterPaths]:
    node_images.build("kquant")
    enforcer = netpolicy.build_binary()
    bin_dir = localcluster.build_binaries()
    paths = controlplane.ClusterPaths(tmp_path_factory.mktemp("netpolcluster"))
    localcluster.up(paths, bin_dir, real_node=True)
    try:
        netpolicy.start(paths, enforcer)
        yield paths
    finally:
        netpolicy.stop(paths)
        localcluster.down(paths)


def _namespace(core: client.CoreV1Api, labels: dict[str, str] | None = None) -> str:
    name = f"np-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={
        "pod-security.kubernetes.io/enforce": "restricted", **(labels or {})})))
    cluster_client.wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        what=f"ServiceAccount {name}/default")
    return name


def _pod(name: str, labels: dict[str, str], command: list[str], port: int | None = None) -> client.V1Pod:
    ports = [client.V1ContainerPort(name="http", container_port=port)] if port else None
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            node_selector={realnode.REAL_NODE_LABEL: "true"},
            automount_service_account_token=False,
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=65532, run_as_group=65532,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
            containers=[client.V1Container(
                name="main", image=node_images.reference("kquant"), command=command, ports=ports,
                security_context=client.V1SecurityContext(
                    allow_privilege_escalation=False, read_only_root_filesystem=True,
                    capabilities=client.V1Capabilities(drop=["ALL"])),
                resources=client.V1ResourceRequirements(limits={"memory": "96Mi", "cpu": "250m"},
                                                        requests={"memory": "96Mi", "cpu": "20m"}),
            )],
        ),
    )


SERVE = ("import http.server\n"
         "class H(http.server.BaseHTTPRequestHandler):\n"
         "    def do_GET(self):\n"
         "        self.send_response(200); self.end_headers(); self.wfile.write(b'model server')\n"
         "http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()\n")


def _running(core: client.CoreV1Api, namespace: str, pod: client.V1Pod) -> client.V1Pod:
    core.create_namespaced_pod(namespace, pod)
    name = pod.metadata.name
    return cluster_client.wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace)).status.phase == "Running" and p,
        timeout=180, what=f"pod {namespace}/{name} to run")


def _reach(core: client.CoreV1Api, namespace: str, client_pod: str, url: str) -> str:
    """Open a connection from inside ``client_pod``: what the pod itself can reach."""
    probe = ("import urllib.request, sys\n"
             f"try: print(urllib.request.urlopen({url!r}, timeout=3).read().decode())\n"
             "except OSError as e: print('blocked:', type(e).__name__)\n")
    return str(stream(core.connect_get_namespaced_pod_exec, client_pod, namespace,
                      command=["python3.11", "-c", probe], stderr=True, stdout=True, stdin=False, tty=False))


def _chart_policies(paths: controlplane.ClusterPaths, namespace: str) -> list[dict[str, Any]]:
    helm = localcluster.build_binaries() / "helm"
    rendered = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--namespace", "kq-system",
         "--set", "networkPolicy.enabled=true", "--set", f"networkPolicy.namespaces={{{namespace}}}",
         "--set-json", "networkPolicy.metricsScraper.namespaceSelector="
                       + json.dumps({"matchLabels": SCRAPER_NAMESPACE_LABEL}),
         "--set-json", "networkPolicy.metricsScraper.podSelector=" + json.dumps({"matchLabels": SCRAPER_POD_LABEL})],
        check=True, capture_output=True, text=True, env={"HOME": str(paths.root)}).stdout
    return [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "NetworkPolicy"]


def test_only_labelled_clients_and_the_scraper_reach_a_server(enforcing_cluster: controlplane.ClusterPaths) -> None:
    api = localcluster.api_client(enforcing_cluster)
    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    team = _namespace(core)
    monitoring = _namespace(core, SCRAPER_NAMESPACE_LABEL)
    elsewhere = _namespace(core)

    server = _running(core, team, _pod("chat-server", {"kquant.dev/role": "server", "kquant.dev/model": "chat"},
                                       ["python3.11", "-c", SERVE], port=8080))
    url = f"http://{server.status.pod_ip}:8080/"
    sleeper = ["python3.11", "-c", "import time; time.sleep(3600)"]
    clients = {
        "labelled": (team, _running(core, team, _pod("app", {"kquant.dev/client": "true"}, sleeper))),
        "unlabelled": (team, _running(core, team, _pod("intruder", {"app": "intruder"}, sleeper))),
        "scraper": (monitoring, _running(core, monitoring, _pod("prom", SCRAPER_POD_LABEL, sleeper))),
        "other-namespace": (elsewhere, _running(core, elsewhere, _pod("app", {"kquant.dev/client": "true"}, sleeper))),
    }

    # Before the policy every pod gets through: the enforcer blocks nothing by itself.
    for who, (namespace, pod) in clients.items():
        assert _reach(core, namespace, pod.metadata.name, url).strip() == "model server", who

    [policy] = _chart_policies(enforcing_cluster, team)
    networking.create_namespaced_network_policy(team, policy)

    def outcome() -> dict[str, bool]:
        return {who: "model server" in _reach(core, namespace, pod.metadata.name, url)
                for who, (namespace, pod) in clients.items()}

    expected = {"labelled": True, "unlabelled": False, "scraper": True, "other-namespace": False}
    cluster_client.wait_for(lambda: outcome() == expected, timeout=90, interval=2,
                            what=f"the policy to admit exactly {expected}")
    assert "blocked" in _reach(core, team, "intruder", url)
