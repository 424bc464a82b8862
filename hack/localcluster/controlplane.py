"""Start and stop etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

Every process is started detached, with its pid and log in the cluster folder, so ``up`` returns
while the cluster keeps running and ``down`` (from another process) can stop it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import time
import urllib.request

from localcluster import certs

ADMIN_TOKEN_FILE = "admin.token"


@dataclasses.dataclass(frozen=True)
class ClusterPaths:
    """Where one cluster keeps its state; nothing lives outside this folder."""

    root: pathlib.Path

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.root / "kubeconfig"

    @property
    def pki(self) -> pathlib.Path:
        return self.root / "pki"

    @property
    def logs(self) -> pathlib.Path:
        return self.root / "logs"

    @property
    def pids(self) -> pathlib.Path:
        return self.root / "pids"

    @property
    def etcd_data(self) -> pathlib.Path:
        return self.root / "etcd"

    @property
    def state(self) -> pathlib.Path:
        return self.root / "state.json"

    @property
    def workloads(self) -> pathlib.Path:
        """Pods' working folders and volumes, as the node agent lays them out."""
        return self.root / "workloads"


@dataclasses.dataclass(frozen=True)
class ClusterState:
    api_port: int
    etcd_port: int
    token: str

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process(paths: ClusterPaths, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    """Start one detached process of the cluster, its log and pid file named after it."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.pids.mkdir(parents=True, exist_ok=True)
    log = (paths.logs / f"{name}.log").open("ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    (paths.pids / f"{name}.pid").write_text(str(proc.pid))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); its /proc status says Z.
    with contextlib.suppress(OSError):
        status = pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]
        return status != "Z"
    return True


def stop_process(paths: ClusterPaths, name: str, timeout: float = 15.0) -> None:
    """Stop one process started by start_process (its whole process group), if it runs."""
    pidfile = paths.pids / f"{name}.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def stop_all(paths: ClusterPaths, timeout: float = 15.0) -> None:
    """Stop every process of the cluster: the nodes first, etcd last.

    A real node's own teardown (its pods, mounts) is realnode.stop, which cluster.down runs first;
    the names here also catch its daemons when that was skipped.
    """
    order = ["agent", "kube-proxy", "kubelet", "containerd", "apiserver-relay", "kube-scheduler",
             "kube-controller-manager", "kube-apiserver", "etcd"]
    for name in order:
        stop_process(paths, name, timeout)


def write_kubeconfig(path: pathlib.Path, server: str, ca_file: pathlib.Path, token: str,
                     user: str = "admin") -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kquant-local",
                      "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kquant-local", "context": {"cluster": "kquant-local", "user": user}}],
        "current-context": "kquant-local",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


def _wait_ready(state: ClusterState, ca_file: pathlib.Path, paths: ClusterPaths, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request(f"{state.server}/readyz",
                                     headers={"Authorization": f"Bearer {state.token}"})
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.3)
    log_tail = (paths.logs / "kube-apiserver.log").read_text()[-3000:]
    raise RuntimeError(f"kube-apiserver not ready after {timeout:.0f}s: {last_error}\n{log_tail}")


def start(paths: ClusterPaths, bin_dir: pathlib.Path, timeout: float = 90.0,
          advertise_address: str = "127.0.0.1") -> ClusterState:
    """Start the control plane and wait until the API server answers /readyz.

    The API server listens on loopback only. ``advertise_address`` is what the ``kubernetes``
    Service's endpoint says: loopback for simulated nodes (their pods are host processes), the real
    node's address when one runs (its pods reach the API server there, through realnode's relay).
    """
    pki = certs.ensure_pki(paths.pki, server_ips=("127.0.0.1", certs.SERVICE_IP, advertise_address))
    token = os.urandom(16).hex()
    (paths.pki / ADMIN_TOKEN_FILE).write_text(f'{token},admin,admin,"system:masters"\n')
    state = ClusterState(api_port=free_port(), etcd_port=free_port(), token=token)
    paths.state.write_text(json.dumps(dataclasses.asdict(state)))
    etcd_url = f"http://127.0.0.1:{state.etcd_port}"
    start_process(paths, "etcd", [
        str(bin_dir / "etcd"), "--data-dir", str(paths.etcd_data), "--name", "local",
        "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
        "--listen-peer-urls", f"http://127.0.0.1:{free_port()}",
        "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
        "--unsafe-no-fsync", "--quota-backend-bytes", str(4 << 30), "--log-level", "warn",
    ])
    start_process(paths, "kube-apiserver", [
        str(bin_dir / "kube-apiserver"),
        "--etcd-servers", etcd_url, "--bind-address", "127.0.0.1",
        "--secure-port", str(state.api_port), "--advertise-address", advertise_address,
        "--tls-cert-file", str(pki.server_cert), "--tls-private-key-file", str(pki.server_key),
        "--client-ca-file", str(pki.ca_cert),
        "--token-auth-file", str(paths.pki / ADMIN_TOKEN_FILE),
        "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
        "--service-account-key-file", str(pki.sa_pub),
        "--service-account-signing-key-file", str(pki.sa_key),
        "--service-cluster-ip-range", certs.SERVICE_RANGE,
        # A real node (realnode.py) is reached at its InternalIP for logs, exec and port-forward,
        # with a client certificate its kubelet trusts; simulated nodes have no address at all.
        "--kubelet-preferred-address-types", "InternalIP",
        "--kubelet-client-certificate", str(pki.kubelet_client_cert),
        "--kubelet-client-key", str(pki.kubelet_client_key),
        "--authorization-mode", "Node,RBAC", "--allow-privileged=true",
        "--cert-dir", str(paths.pki / "apiserver-generated"),
        "--profiling=false", "--v=1",
    ])
    _wait_ready(state, pki.ca_cert, paths, timeout)
    write_kubeconfig(paths.kubeconfig, state.server, pki.ca_cert, token)
    start_process(paths, "kube-controller-manager", [
        str(bin_dir / "kube-controller-manager"),
        "--kubeconfig", str(paths.kubeconfig),
        "--service-account-private-key-file", str(pki.sa_key),
        "--root-ca-file", str(pki.ca_cert), "--use-service-account-credentials=true",
        "--leader-elect=false", "--secure-port=0", "--allocate-node-cidrs=false",
        "--cluster-signing-cert-file", str(pki.ca_cert), "--cluster-signing-key-file", str(pki.ca_key),
        # KQUANT_CONTROLLER_MANAGER_V raises the log level (4: the garbage collector's monitor
        # resyncs after discovery; bench/fault_convergence.py reads them).
        "--concurrent-gc-syncs=5", f"--v={os.environ.get('KQUANT_CONTROLLER_MANAGER_V', '1')}",
    ])
    start_process(paths, "kube-scheduler", [
        str(bin_dir / "kube-scheduler"), "--kubeconfig", str(paths.kubeconfig),
        "--leader-elect=false", "--secure-port=0", "--v=1",
    ])
    return state


def load_state(paths: ClusterPaths) -> ClusterState:
    return ClusterState(**json.loads(paths.state.read_text()))


def running(paths: ClusterPaths) -> bool:
    pidfile = paths.pids / "kube-apiserver.pid"
    return pidfile.exists() and alive(int(pidfile.read_text()))
