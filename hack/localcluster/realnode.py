"""A real node for the local cluster: containerd + runc, the kubelet and kube-proxy.

The simulated nodes (``agent``) stand in for GPU capacity this machine lacks; this node runs kquant's
real images under a real kubelet, so restricted pod security, read-only root file systems, the
non-root user, memory limits, image entry points, ``kubectl logs``/``exec`` and Service ClusterIPs
are exercised for real.

Everything stays on this machine:

* the node's address (``NODE_IP``) sits on an interface of its own (dummy, or a bridge without
  ports where the kernel lacks the dummy driver): it is not loopback (the kubelet
  refuses a loopback node IP, and the API server reaches the kubelet there for logs and exec), and
  it exists nowhere else;
* pods get addresses from a CNI bridge whose subnet exists only here, without masquerading, and a
  FORWARD rule rejects anything they send off that network;
* images come from the local registry (``images/build.sh`` pushes there): containerd resolves
  ``ghcr.io`` and the registry itself through hosts.toml files whose server is that registry, so the
  chart's own image references pull from it and never from outside;
* the sandbox (pause) image is made from Kubernetes' own pause.c (``hack/build-node.sh``) and
  imported, not pulled.

containerd 1.6 (Debian's) needs ``restrict_oom_score_adj = true`` here: the VM lacks
CAP_SYS_RESOURCE, so runc cannot lower oom_score_adj and every sandbox would fail to start.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import time

from localcluster import certs, controlplane

NODE_NAME = "kquant-real"
NODE_IP = "10.213.0.1"
INTERFACE = "kquant0"
BRIDGE = "kquant-cni0"
POD_SUBNET = "10.213.128.0/24"
LOCAL_NETWORK = "10.213.0.0/16"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
REAL_NODE_LABEL = "kquant.dev/real-node"
REGISTRY = os.environ.get("KQUANT_REGISTRY", "127.0.0.1:5000")
# Registries whose images the node resolves through the local one: the chart's defaults live
# under ghcr.io/kquant-dev, and `make images` pushes the same paths to REGISTRY.
MIRRORED = ("ghcr.io",)
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
CNI_BIN = pathlib.Path("/usr/lib/cni")
PROCESSES = ("kube-proxy", "kubelet", "containerd")


def unavailable_reason() -> str | None:
    """Why this machine cannot run a real node, or None when it can."""
    if os.geteuid() != 0:
        return "a real node needs root (containerd, runc, the kubelet's cgroups and mounts)"
    missing = [p for p in (CONTAINERD, CTR, "/usr/bin/runc", str(CNI_BIN / "bridge"), "/usr/sbin/iptables")
               if not pathlib.Path(p).exists()]
    if missing:
        return (f"missing {', '.join(missing)}: install Debian's docker.io, containernetworking-plugins "
                "and iptables (hack/container-runtime.sh start does)")
    if not os.access("/sys/fs/cgroup", os.W_OK):
        return "the cgroup file system /sys/fs/cgroup is not writable"
    if "overlay" not in pathlib.Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system"
    return None


class RealNodePaths:
    """The node's files under the cluster folder; sockets under /run (a socket path has 108 bytes)."""

    def __init__(self, paths: controlplane.ClusterPaths) -> None:
        self.root = paths.root / "realnode"
        digest = hashlib.sha256(str(paths.root).encode()).hexdigest()[:10]
        self.run = pathlib.Path("/run/kquant") / digest

    @property
    def containerd_config(self) -> pathlib.Path:
        return self.root / "containerd.toml"

    @property
    def containerd_socket(self) -> pathlib.Path:
        return self.run / "containerd.sock"

    @property
    def kubelet_root(self) -> pathlib.Path:
        return self.root / "kubelet"


def build_node_binaries() -> pathlib.Path:
    """Build (or find in the cache) kubelet, kube-proxy and pause; return their folder."""
    script = pathlib.Path(__file__).resolve().parents[1] / "build-node.sh"
    done = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return pathlib.Path(done.stdout.strip().splitlines()[-1])


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def ensure_network() -> None:
    """The node address on an interface of its own, forwarding for the bridge, and the fence around it."""
    # A dummy interface where the kernel has the driver; else a bridge without ports, which holds
    # a local address just the same (this VM's kernel has no dummy driver).
    if (_run("ip", "link", "show", INTERFACE, check=False).returncode != 0
            and _run("ip", "link", "add", INTERFACE, "type", "dummy", check=False).returncode != 0):
        _run("ip", "link", "add", INTERFACE, "type", "bridge")
    _run("ip", "link", "set", INTERFACE, "up")
    if NODE_IP not in _run("ip", "-4", "addr", "show", "dev", INTERFACE).stdout:
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", INTERFACE)
    # Service ClusterIPs between pods on one bridge need the bridge's frames to pass iptables.
    if shutil.which("modprobe"):
        _run("modprobe", "br_netfilter", check=False)
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        path = pathlib.Path("/proc/sys") / key
        if path.exists():
            path.write_text("1\n")
    # Pods may talk to each other, to the node and to Services; nothing they send may leave.
    rule = ["FORWARD", "-s", POD_SUBNET, "!", "-d", LOCAL_NETWORK, "-j", "REJECT"]
    if _run("iptables", "-C", *rule, check=False).returncode != 0:
        _run("iptables", "-I", *rule)


def _hosts_toml(server: str) -> str:
    return (f'server = "{server}"\n\n[host."{server}"]\n  capabilities = ["pull", "resolve"]\n'
            "  skip_verify = true\n")


def write_containerd_config(node: RealNodePaths) -> None:
    certs_d = node.root / "certs.d"
    for host in (*MIRRORED, REGISTRY):
        folder = certs_d / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(_hosts_toml(f"http://{REGISTRY}"))
    net_d = node.root / "cni"
    net_d.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "0.4.0",
        "name": "kquant",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             # Routes to this machine's networks only, no default route: a pod can reach other
             # pods, the node (the API server relay, the test hub) and Service ClusterIPs, and any
             # other destination is unreachable before the FORWARD fence is even asked.
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                      "routes": [{"dst": LOCAL_NETWORK}, {"dst": certs.SERVICE_RANGE}],
                      "dataDir": str(node.root / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (net_d / "10-kquant.conflist").write_text(json.dumps(conflist, indent=2))
    node.run.mkdir(parents=True, exist_ok=True)
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    node.containerd_config.write_text(f"""version = 2
root = "{node.root / 'containerd'}"
state = "{node.run / 'state'}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{node.containerd_socket}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{net_d}"

[{cri}.registry]
  config_path = "{certs_d}"
""")


def pause_image_archive(pause_binary: pathlib.Path) -> bytes:
    """An OCI image archive holding only /pause, named PAUSE_IMAGE for ``ctr images import``."""

    def blob(data: bytes, media_type: str) -> tuple[dict[str, object], bytes]:
        return {"mediaType": media_type, "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
                "size": len(data)}, data

    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = pause_binary.read_bytes()
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    diff_id = f"sha256:{hashlib.sha256(layer_tar.getvalue()).hexdigest()}"
    layer_desc, layer = blob(gzip.compress(layer_tar.getvalue(), mtime=0),
                             "application/vnd.oci.image.layer.v1.tar+gzip")
    config_desc, config = blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode(), "application/vnd.oci.image.config.v1+json")
    manifest_desc, manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc, "layers": [layer_desc],
    }).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": PAUSE_IMAGE,
                                    "org.opencontainers.image.ref.name": PAUSE_IMAGE.rsplit(":", 1)[1]}
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    index = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
        for desc, data in ((layer_desc, layer), (config_desc, config), (manifest_desc, manifest)):
            files[f"blobs/sha256/{str(desc['digest']).split(':', 1)[1]}"] = data
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _wait_for(check: object, what: str, log: pathlib.Path, timeout: float = 60.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; see {log}\n{tail}")


def start_relay(paths: controlplane.ClusterPaths) -> None:
    """The API server on NODE_IP (same port), relayed to loopback: the `kubernetes` Service's
    endpoint (controlplane.start advertises NODE_IP), so pods' in-cluster clients reach it."""
    port = controlplane.load_state(paths).api_port
    hack = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(hack), PYTHONSAFEPATH="1")
    controlplane.start_process(paths, "apiserver-relay", [
        sys.executable, "-P", "-m", "localcluster", "--root", str(paths.root), "relay",
        "--listen", f"{NODE_IP}:{port}", "--to", f"127.0.0.1:{port}"], env=env)

    def answers() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((NODE_IP, port), timeout=1):
            return True
        return False

    _wait_for(answers, f"the API server relay on {NODE_IP}:{port}", paths.logs / "apiserver-relay.log", timeout=20)


def _kubelet_config(paths: controlplane.ClusterPaths, node: RealNodePaths, pki: certs.Pki) -> pathlib.Path:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": controlplane.free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": controlplane.free_port(),
        "containerRuntimeEndpoint": f"unix://{node.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        # This VM mounts cgroup v1 controllers; 1.36 only warns about v1 when told not to fail.
        "failCgroupV1": False,
        "failSwapOn": False,
        # The API server authenticates with its kubelet client certificate (signed by the cluster
        # CA) and is authorised through SubjectAccessReview: logs and exec as on any cluster.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki.ca_cert)}},
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(node.root / "pod-logs"),
        # No DNS for pods: nothing outside this machine is theirs to resolve.
        "resolvConf": "",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "maxPods": 30,
        "registerNode": True,
        "shutdownGracePeriod": "0s",
    }
    path = node.root / "kubelet.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def start(paths: controlplane.ClusterPaths, node_bin: pathlib.Path) -> None:
    """Start containerd, the kubelet and kube-proxy for this cluster; return once the node is Ready."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot start a real node: {reason}")
    node = RealNodePaths(paths)
    node.root.mkdir(parents=True, exist_ok=True)
    pki = certs.ensure_pki(paths.pki)
    ensure_network()
    start_relay(paths)
    write_containerd_config(node)
    controlplane.start_process(paths, "containerd", [CONTAINERD, "--config", str(node.containerd_config)])
    ctr = [CTR, "--address", str(node.containerd_socket), "--namespace", "k8s.io"]
    _wait_for(lambda: _run(*ctr, "version", check=False).returncode == 0, "containerd",
              paths.logs / "containerd.log")
    archive = node.root / "pause.oci.tar"
    archive.write_bytes(pause_image_archive(node_bin / "pause"))
    _run(*ctr, "images", "import", "--no-unpack=false", str(archive), check=False)
    if PAUSE_IMAGE not in _run(*ctr, "images", "ls", "-q").stdout:
        _run(*ctr, "images", "import", str(archive))
    # The pause image must not be garbage collected: it was imported, it cannot be pulled again.
    _run(*ctr, "images", "label", PAUSE_IMAGE, "io.cri-containerd.pinned=pinned", check=False)

    kubeconfig = paths.root / "kubelet.kubeconfig"
    shutil.copyfile(paths.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o600)
    controlplane.start_process(paths, "kubelet", [
        str(node_bin / "kubelet"), "--config", str(_kubelet_config(paths, node, pki)),
        "--kubeconfig", str(kubeconfig), "--hostname-override", NODE_NAME, "--node-ip", NODE_IP,
        "--root-dir", str(node.kubelet_root), "--cert-dir", str(node.root / "kubelet-pki"),
        "--node-labels", f"{REAL_NODE_LABEL}=true", "--v=1",
    ])
    (node.root / "bin-dir").write_text(str(node_bin))
    controlplane.start_process(paths, "kube-proxy", [
        str(node_bin / "kube-proxy"), "--kubeconfig", str(kubeconfig), "--hostname-override", NODE_NAME,
        "--proxy-mode", "iptables", "--cluster-cidr", POD_SUBNET,
        "--metrics-bind-address", f"127.0.0.1:{controlplane.free_port()}",
        "--healthz-bind-address", f"127.0.0.1:{controlplane.free_port()}",
        # Leave the host's conntrack sysctls alone: the VM does not let us change them.
        "--conntrack-max-per-core", "0", "--v=1",
    ])


def _remove_kubelet_iptables() -> None:
    """Remove the chains the kubelet adds to the host's iptables (KUBE-FIREWALL drops traffic to
    127.0.0.0/8 from other sources; the canaries only detect flushes): this machine is shared, and
    they must not outlive the node."""
    for table, chain, parents in (("filter", "KUBE-FIREWALL", ("INPUT", "OUTPUT")),
                                  ("filter", "KUBE-KUBELET-CANARY", ()), ("nat", "KUBE-KUBELET-CANARY", ()),
                                  ("mangle", "KUBE-KUBELET-CANARY", ()), ("mangle", "KUBE-IPTABLES-HINT", ())):
        for parent in parents:
            while _run("iptables", "-t", table, "-D", parent, "-j", chain, check=False).returncode == 0:
                pass
        _run("iptables", "-t", table, "-F", chain, check=False)
        _run("iptables", "-t", table, "-X", chain, check=False)


def _drain(paths: controlplane.ClusterPaths, timeout: float) -> None:
    """Delete the node's pods through the API and wait while the kubelet removes them.

    The kubelet's own teardown is what calls CNI DEL (veth, netns, address) for each sandbox; a
    force delete (grace 0) would only remove the API objects and leave those behind.
    """
    import urllib3  # the client's transport: a refused connection is its error, not an OSError
    from kubernetes import client, config  # the control plane's client; only needed here

    if not paths.kubeconfig.exists():
        return
    try:
        core = client.CoreV1Api(config.new_client_from_config(str(paths.kubeconfig)))
        selector = f"spec.nodeName={NODE_NAME}"
        for pod in core.list_pod_for_all_namespaces(field_selector=selector).items:
            with contextlib.suppress(client.ApiException):
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1)
        deadline = time.monotonic() + timeout
        while core.list_pod_for_all_namespaces(field_selector=selector).items and time.monotonic() < deadline:
            time.sleep(0.5)
    except (OSError, urllib3.exceptions.HTTPError, client.ApiException):
        return  # the API server is gone already: the containers are killed below regardless


def stop(paths: controlplane.ClusterPaths, timeout: float = 30.0) -> None:
    """Stop the node: its pods first (the kubelet tears down their network), then the daemons."""
    node = RealNodePaths(paths)
    if not (paths.pids / "containerd.pid").exists():
        return
    ctr = [CTR, "--address", str(node.containerd_socket), "--namespace", "k8s.io"]
    _drain(paths, timeout)
    controlplane.stop_process(paths, "kube-proxy", timeout)
    # kube-proxy leaves its iptables chains behind when it stops; its own cleanup mode removes them.
    bin_dir = node.root / "bin-dir"
    if bin_dir.exists():
        _run(str(pathlib.Path(bin_dir.read_text()) / "kube-proxy"), "--cleanup", check=False)
    controlplane.stop_process(paths, "kubelet", timeout)
    _remove_kubelet_iptables()
    # What the kubelet left running: kill the tasks so no shim outlives the node.
    if node.containerd_socket.exists():
        for task in _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
            _run(*ctr, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
        deadline = time.monotonic() + timeout
        while _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.3)
        for task in _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
            _run(*ctr, "tasks", "delete", "--force", task, check=False)
        for container in _run(*ctr, "containers", "ls", "-q", check=False).stdout.split():
            _run(*ctr, "containers", "delete", container, check=False)
    controlplane.stop_process(paths, "containerd", timeout)
    controlplane.stop_process(paths, "apiserver-relay", timeout)
    # Volumes the kubelet mounted (projected tokens, emptyDirs) and the overlay mounts.
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in pathlib.Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith((str(node.root), str(node.run)))), reverse=True):
            _run("umount", "-l", mount, check=False)
    shutil.rmtree(node.run, ignore_errors=True)
