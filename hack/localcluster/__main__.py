"""``hack/cluster up|down|env|status|agent``: the local control plane as a command."""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import threading
import time

from localcluster import agent, cluster, controlplane, relay

DEFAULT_ROOT = cluster.CACHE / "cluster"


def up(paths: controlplane.ClusterPaths, real_node: bool = False) -> None:
    if controlplane.running(paths):
        print(f"already running: export KUBECONFIG={paths.kubeconfig}")
        return
    started = time.monotonic()
    state = cluster.up(paths, real_node=real_node)
    print(f"cluster up in {time.monotonic() - started:.1f}s at {state.server}")
    print(f"export KUBECONFIG={paths.kubeconfig}")


def run_agent(paths: controlplane.ClusterPaths) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state = controlplane.load_state(paths)
    node_agent = agent.serve(cluster.api_client(paths), paths.workloads, state.server, paths.pki / "ca.crt")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    node_agent.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__)
    parser.add_argument("--root", type=pathlib.Path, default=DEFAULT_ROOT,
                        help="folder that holds the cluster's state (default: %(default)s)")
    parser.add_argument("--real-node", action="store_true",
                        help="up: also start a real node (containerd, runc, kubelet, kube-proxy) that pulls "
                             "kquant's images from the local registry (make images)")
    parser.add_argument("--listen", help="relay: HOST:PORT to listen on (the real node's address)")
    parser.add_argument("--to", help="relay: HOST:PORT to forward to (the API server on loopback)")
    parser.add_argument("command", choices=["up", "down", "env", "status", "agent", "bin-dir", "relay"])
    args = parser.parse_args()
    paths = controlplane.ClusterPaths(args.root.resolve())
    if args.command == "up":
        up(paths, real_node=args.real_node)
    elif args.command == "down":
        cluster.down(paths)
        print("cluster stopped")
    elif args.command == "env":
        print(f"export KUBECONFIG={paths.kubeconfig}")
    elif args.command == "status":
        print("running" if controlplane.running(paths) else "stopped")
    elif args.command == "bin-dir":
        print(cluster.build_binaries())
    elif args.command == "relay":
        if not (args.listen and args.to):
            parser.error("relay needs --listen HOST:PORT and --to HOST:PORT")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        relay.run(args.listen, args.to)
    else:
        run_agent(paths)


if __name__ == "__main__":
    main()
