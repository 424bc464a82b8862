"""NetworkPolicies enforced on the real node: kube-router's firewall controller beside the kubelet.

The real node's pod network is the bridge CNI plugin, which enforces no NetworkPolicy: a policy
would be an object nothing acts on. kube-router with only its firewall on (no pod routing, no
service proxy: the bridge and kube-proxy keep those jobs) turns each policy into iptables and ipset
rules for the pods of this node, including traffic between two pods on the same bridge
(br_netfilter passes bridged frames through iptables).

It runs as the network plugin's agent does on a real cluster, with the node's own credentials
(here the admin kubeconfig the kubelet also gets), never with the operator's.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import time

from localcluster import controlplane, realnode

PROCESS = "kube-router"
SERVICE_RANGE = "10.0.0.0/24"
"""The control plane's --service-cluster-ip-range (controlplane.py)."""

REPO = pathlib.Path(__file__).resolve().parents[2]


def build_binary() -> pathlib.Path:
    """kube-router, built once from Go modules and cached by version (hack/build-netpolicy.sh)."""
    out = subprocess.run(["bash", str(REPO / "hack" / "build-netpolicy.sh")], check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    return pathlib.Path(out) / "kube-router"


def _bridged_frames_reach_iptables() -> None:
    """Pods of one node talk across the bridge at layer 2; only with this sysctl do their packets
    pass the FORWARD chain, where the policy's rules are."""
    setting = pathlib.Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if setting.exists() and setting.read_text().strip() != "1":
        setting.write_text("1\n")


def start(paths: controlplane.ClusterPaths, binary: pathlib.Path, timeout: float = 60.0) -> None:
    """Start the enforcer for the real node; return once it has written its first rules."""
    _bridged_frames_reach_iptables()
    remove_rules()  # what a run that was killed before its clean-up left behind
    controlplane.start_process(paths, PROCESS, [
        str(binary), "--kubeconfig", str(paths.kubeconfig), "--hostname-override", realnode.NODE_NAME,
        "--run-firewall=true", "--run-router=false", "--run-service-proxy=false", "--enable-cni=false",
        "--service-cluster-ip-range", SERVICE_RANGE, "--health-port=0", "--metrics-port=0",
        "--iptables-sync-period=10s", "--v=1",
    ])
    pid = int((paths.pids / f"{PROCESS}.pid").read_text())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and controlplane.alive(pid):
        if _chain_exists("KUBE-ROUTER-FORWARD"):
            return
        time.sleep(0.5)
    log = (paths.logs / f"{PROCESS}.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"kube-router exited or wrote no firewall rules within {timeout:.0f}s; its log ends:\n{log}")


def _chain_exists(chain: str) -> bool:
    return _run("iptables", "-t", "filter", "-nL", chain).returncode == 0


def stop(paths: controlplane.ClusterPaths) -> None:
    """Stop it and remove every chain and ipset it made: this machine is shared, and a rule left
    behind would keep dropping the next cluster's pod traffic."""
    controlplane.stop_process(paths, PROCESS)
    remove_rules()


CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-NWPLCY-", "KUBE-POD-FW-")
IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-", "kube-router-")


def remove_rules() -> None:
    """What ``kube-router --cleanup-config`` should do (in v2.1.0 it panics in its service proxy's
    clean-up before reaching the firewall's): the jumps from the built-in chains, then the chains,
    then the ipsets they matched on."""
    saved = _run("iptables-save", "-t", "filter").stdout.splitlines()
    chains = [line[1:].split()[0] for line in saved
              if line.startswith(":") and line[1:].startswith(CHAIN_PREFIXES)]
    for line in saved:
        parts = shlex.split(line)  # comments are quoted
        if len(parts) > 2 and parts[0] == "-A" and parts[1] in ("INPUT", "FORWARD", "OUTPUT") \
                and parts[-1].startswith(CHAIN_PREFIXES):
            _run("iptables", "-t", "filter", "-D", *parts[1:])
    for chain in chains:
        _run("iptables", "-t", "filter", "-F", chain)
    for chain in chains:
        _run("iptables", "-t", "filter", "-X", chain)
    for name in _run("ipset", "list", "-n").stdout.split():
        if name.startswith(IPSET_PREFIXES):
            _run("ipset", "destroy", name)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True)
