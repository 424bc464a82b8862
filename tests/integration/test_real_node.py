"""kquant's own image on a real node: a real kubelet, containerd and runc, nothing mapped to host files.

The local cluster's simulated nodes run pods as host processes; these tests start a cluster with a
real node (``hack/cluster up --real-node``) and run the operator image that ``make images`` pushed
to the local registry, under the restricted pod security standard: non-root, read-only root file
system, every capability dropped. They read the container's log and exec into it through the API
server (the same calls ``kubectl logs`` and ``kubectl exec`` make), reach it through a Service's
ClusterIP (kube-proxy), and show that a memory limit really kills a process that exceeds it.

They skip, saying why, only where this machine cannot run a container runtime at all.
"""

from __future__ import annotations

import os
import pathlib
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from fixtures import cluster_client, node_images
from kubernetes import client
from kubernetes.stream import stream
from localcluster import cluster as localcluster
from localcluster import controlplane, realnode

# The first test's setup builds the operator image when the cache is cold (about 5 minutes here).
pytestmark = [pytest.mark.integration, pytest.mark.realnode, pytest.mark.timeout(1500),
              node_images.NEEDS_CONTAINER_RUNTIME]

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGE_NAME = "kquant"




@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[client.ApiClient]:
    # The image, built and pushed to the local registry (cached: nothing is rebuilt when unchanged).
    node_images.build(IMAGE_NAME)
    paths = controlplane.ClusterPaths(tmp_path_factory.mktemp("realcluster"))
    localcluster.up(paths, localcluster.build_binaries(), real_node=True)
    try:
        yield localcluster.api_client(paths)
    finally:
        localcluster.down(paths)


@pytest.fixture
def restricted_namespace(real_cluster: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(real_cluster)
    name = f"rn-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    })))
    cluster_client.wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        what=f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        # Pods go first, so the kubelet tears down their sandboxes (network included) while it runs;
        # a grace period, because grace 0 deletes only the API objects.
        core.delete_collection_namespaced_pod(name, grace_period_seconds=1)
        cluster_client.wait_for(lambda: not core.list_namespaced_pod(name).items, timeout=60,
                                what=f"pods of {name} to be gone")
        core.delete_namespace(name)


def _restricted_pod(name: str, image: str, command: list[str], memory: str) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
        spec=client.V1PodSpec(
            node_selector={realnode.REAL_NODE_LABEL: "true"},
            restart_policy="Never",
            automount_service_account_token=False,
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=65532, run_as_group=65532,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
            containers=[client.V1Container(
                name="main", image=image, command=command,
                security_context=client.V1SecurityContext(
                    allow_privilege_escalation=False, read_only_root_filesystem=True,
                    capabilities=client.V1Capabilities(drop=["ALL"])),
                resources=client.V1ResourceRequirements(limits={"memory": memory, "cpu": "500m"},
                                                        requests={"memory": memory, "cpu": "50m"}),
                volume_mounts=[client.V1VolumeMount(name="tmp", mount_path="/tmp")],
            )],
            volumes=[client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource(size_limit="16Mi"))],
        ),
    )


def _wait_phase(core: client.CoreV1Api, namespace: str, name: str, phases: set[str],
                timeout: float = 180) -> client.V1Pod:
    deadline = time.monotonic() + timeout
    pod = core.read_namespaced_pod(name, namespace)
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase in phases:
            return pod
        time.sleep(0.5)
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    raise AssertionError(f"pod {namespace}/{name} is {pod.status.phase}, not {phases}, after {timeout:.0f}s; "
                         f"events: {[(e.reason, e.message) for e in events]}")


def test_restricted_pod_logs_exec_service(real_cluster: client.ApiClient, restricted_namespace: str) -> None:
    core = client.CoreV1Api(real_cluster)
    image = node_images.reference(IMAGE_NAME)
    server = ("import http.server, os, sys\n"
              "print(f'kquant on a real node: uid={os.getuid()} gid={os.getgid()}', flush=True)\n"
              "open('/tmp/index.html', 'w').write('served from ' + os.uname().nodename)\n"
              "os.chdir('/tmp')\n"
              "http.server.ThreadingHTTPServer(('0.0.0.0', 8080), http.server.SimpleHTTPRequestHandler)"
              ".serve_forever()\n")
    core.create_namespaced_pod(restricted_namespace, _restricted_pod(
        "web", image, ["python3.11", "-c", server], "128Mi"))
    pod = _wait_phase(core, restricted_namespace, "web", {"Running"})
    assert pod.spec.node_name == realnode.NODE_NAME
    assert pod.status.pod_ip and pod.status.pod_ip.startswith(realnode.POD_SUBNET.rsplit(".", 1)[0])

    # kubectl logs: the API server fetches the log from the kubelet at the node's address.
    cluster_client.wait_for(
        lambda: "kquant on a real node" in core.read_namespaced_pod_log("web", restricted_namespace),
        timeout=30, what="the pod's first log line")
    log = core.read_namespaced_pod_log("web", restricted_namespace)
    assert "uid=65532 gid=65532" in log, log

    # kubectl exec: the image's user, a read-only root and no capabilities, seen from inside.
    def execute(*command: str) -> str:
        return str(stream(core.connect_get_namespaced_pod_exec, "web", restricted_namespace,
                          command=list(command), stderr=True, stdout=True, stdin=False, tty=False))

    status = execute("python3.11", "-c", "print(open('/proc/self/status').read())")
    assert "Uid:\t65532\t65532\t65532\t65532" in status, status
    assert "CapEff:\t0000000000000000" in status, status
    refused = execute("python3.11", "-c",
                      "import pathlib\ntry:\n pathlib.Path('/opt/x').write_text('x')\n"
                      "except OSError as e:\n print('refused:', e.strerror)")
    assert "refused: Read-only file system" in refused, refused
    assert "kquant" in execute("kquant", "--help")

    # A Service's ClusterIP, reached from this machine through kube-proxy's rules.
    service = core.create_namespaced_service(restricted_namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector={"app": "web"},
                                  ports=[client.V1ServicePort(port=80, target_port=8080)])))
    url = f"http://{service.spec.cluster_ip}:80/index.html"

    def answered() -> str:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    cluster_client.wait_for(answered, timeout=60, what=f"the Service web at {url}")
    assert answered() == "served from web"


def test_in_cluster_client_reaches_api_server(real_cluster: client.ApiClient, restricted_namespace: str) -> None:
    """A pod's in-cluster client (the operator's and the quantizer Job's way in) reaches the API
    server: the `kubernetes` Service's ClusterIP from the environment, kube-proxy to the node's
    address, the relay to loopback; TLS verified against the mounted CA, the projected token
    authenticated as the pod's ServiceAccount."""
    core = client.CoreV1Api(real_cluster)
    whoami = ("import os\n"
              "from kubernetes import client, config\n"
              "config.load_incluster_config()\n"
              "print('service', os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])\n"
              "review = client.AuthenticationV1Api().create_self_subject_review(\n"
              "    client.V1SelfSubjectReview(metadata=client.V1ObjectMeta()))\n"
              "print('user', review.status.user_info.username, flush=True)\n")
    pod = _restricted_pod("whoami", node_images.reference(IMAGE_NAME), ["python3.11", "-c", whoami], "128Mi")
    pod.spec.automount_service_account_token = True
    core.create_namespaced_pod(restricted_namespace, pod)
    done = _wait_phase(core, restricted_namespace, "whoami", {"Succeeded", "Failed"})
    log = core.read_namespaced_pod_log("whoami", restricted_namespace)
    assert done.status.phase == "Succeeded", log
    kubernetes_service = core.read_namespaced_service("kubernetes", "default")
    assert f"service {kubernetes_service.spec.cluster_ip} 443" in log, log
    assert f"user system:serviceaccount:{restricted_namespace}:default" in log, log


def test_memory_limit_kills(real_cluster: client.ApiClient, restricted_namespace: str) -> None:
    core = client.CoreV1Api(real_cluster)
    hog = "import time\nprint('allocating', flush=True)\nb = bytearray(256 << 20)\nprint('survived', flush=True)\n"
    core.create_namespaced_pod(restricted_namespace, _restricted_pod(
        "hog", node_images.reference(IMAGE_NAME), ["python3.11", "-c", hog], "48Mi"))
    pod = _wait_phase(core, restricted_namespace, "hog", {"Failed", "Succeeded"})
    terminated = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed", pod.status
    assert terminated.reason == "OOMKilled" and terminated.exit_code == 137, terminated
    log = core.read_namespaced_pod_log("hog", restricted_namespace)
    assert "allocating" in log and "survived" not in log, log


def test_real_node_reports_itself(real_cluster: client.ApiClient) -> None:
    node = client.CoreV1Api(real_cluster).read_node(realnode.NODE_NAME)
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses.get("InternalIP") == realnode.NODE_IP
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    assert node.status.node_info.kubelet_version == "v" + os.environ.get("KUBE_VERSION", "1.36.3")
