"""The node agent: registers the local nodes, keeps them Ready, and runs their pods.

It plays the kubelet for every node of ``nodes.DEFAULT_NODES`` at once: node status and Lease
heartbeats keep the node-lifecycle controller content, and every pod the real scheduler binds to
one of these nodes is run by a ``PodRunner``. Pod deletion follows the kubelet's contract: the
processes get SIGTERM and the grace period, then the agent removes the pod object.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import pathlib
import subprocess
import threading
from typing import Any

from kubernetes import client, watch

from localcluster import images, kubeletlogs, nodes, podrunner, sandbox

log = logging.getLogger("localcluster.agent")
LEASE_NAMESPACE = "kube-node-lease"
STORAGE_CLASS = "local"
SIZED_STORAGE_CLASS = "local-sized"
"""Volumes that hold exactly what their claim asks (a tmpfs of that size, so needs root): a write
past it fails with ENOSPC, as on a real disk. ``local`` volumes are folders on the host's disk."""
PROVISIONER = "kquant.dev/local-agent"


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(quantity: str) -> int:
    """A storage quantity (``512Mi``, ``2Gi``, ``1G``, ``1000``) in bytes."""
    for suffix, factor in _SUFFIXES.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


class PodAddresses:
    """Hands out one loopback address per pod: 127.N.0.1, 127.N.0.2, ...

    N comes from the cluster's folder, so two local clusters on one machine (a demo and a test
    run) do not give their pods the same address and port."""

    def __init__(self, cluster_root: pathlib.Path) -> None:
        octet = 2 + int(hashlib.sha256(str(cluster_root).encode()).hexdigest(), 16) % 250
        self._next = itertools.count(int(ipaddress.IPv4Address(f"127.{octet}.0.1")))
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            return str(ipaddress.IPv4Address(next(self._next)))


class NodeAgent:
    def __init__(self, api: client.ApiClient, workloads: pathlib.Path, server: str,
                 ca_file: pathlib.Path, node_specs: tuple[nodes.NodeSpec, ...] = nodes.DEFAULT_NODES,
                 table: images.ImageTable | None = None) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self.workloads = workloads
        self.server = server
        self.ca_file = ca_file
        self.node_specs = node_specs
        self.node_names = {n.name for n in node_specs}
        self.table = table or images.ImageTable.load()
        self.addresses = PodAddresses(workloads)
        self.runners: dict[str, podrunner.PodRunner] = {}
        self.stopping = threading.Event()
        self.logs: kubeletlogs.LogServer | None = None
        """The nodes' container-log endpoint (pods/log); None where this machine has no address
        but loopback, which the API server refuses to proxy to."""

    def serve_logs(self) -> None:
        address = kubeletlogs.host_address()
        if address is None:
            log.warning("no non-loopback address: pods/log will not work on the simulated nodes")
            return
        try:
            server = kubeletlogs.LogServer(address, self.ca_file.parent, self.log_path)
            server.start()
        except (OSError, RuntimeError) as exc:  # openssl or the bind failed: logs stay unavailable
            log.warning("container-log endpoint not started: %s", exc)
            return
        self.logs = server

    def log_path(self, namespace: str, pod: str, container: str) -> pathlib.Path | None:
        """The log file of a container of a pod this agent runs (the newest runner of that name)."""
        for runner in reversed(list(self.runners.values())):
            meta = runner.pod["metadata"]
            if meta["namespace"] == namespace and meta["name"] == pod:
                path: pathlib.Path = runner.box.root / "logs" / f"{container}.log"
                return path
        return None

    # -- nodes -----------------------------------------------------------------------------

    def register_nodes(self) -> None:
        for spec in self.node_specs:
            try:
                self.core.create_node(spec.manifest())
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(spec.name, {"metadata": {"labels": spec.labels()}})
            self._post_status(spec)
            self._renew_lease(spec.name)

    def _post_status(self, spec: nodes.NodeSpec) -> None:
        now = podrunner.now_rfc3339()

        def condition(kind: str, status: str, reason: str) -> dict[str, str]:
            return {"type": kind, "status": status, "reason": reason, "message": reason,
                    "lastHeartbeatTime": now, "lastTransitionTime": now}

        status = {
            "capacity": spec.resources(), "allocatable": spec.resources(),
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.logs.address if self.logs else "127.0.0.1"},
                          {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.logs.port if self.logs else 0}},
            "nodeInfo": {"kubeletVersion": "v0.0.0-kquant-local-agent", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "local://processes",
                         "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        }
        self.core.patch_node_status(spec.name, {"status": status})

    def _renew_lease(self, node: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now}
        try:
            self.leases.patch_namespaced_lease(node, LEASE_NAMESPACE, {"spec": spec})
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": node, "namespace": LEASE_NAMESPACE}, "spec": spec}
            self.leases.create_namespaced_lease(LEASE_NAMESPACE, body)

    def heartbeat_forever(self) -> None:
        beat = 0
        while not self.stopping.wait(10.0):
            beat += 1
            for spec in self.node_specs:
                try:
                    self._renew_lease(spec.name)
                    if beat % 3 == 0:
                        self._post_status(spec)
                except client.ApiException as exc:
                    log.warning("heartbeat for %s failed: %s", spec.name, exc.reason)
                except Exception as exc:  # the API server is down or restarting: beat again, as a kubelet does
                    log.warning("heartbeat for %s failed: %s", spec.name, type(exc).__name__)

    # -- storage ---------------------------------------------------------------------------

    def ensure_storage_class(self) -> None:
        storage = client.StorageV1Api(self.api)
        for name, default in ((STORAGE_CLASS, "true"), (SIZED_STORAGE_CLASS, "false")):
            body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                    "metadata": {"name": name, "annotations": {"storageclass.kubernetes.io/is-default-class": default}},
                    "provisioner": PROVISIONER, "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete"}
            try:
                storage.create_storage_class(body)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise

    def provision_forever(self) -> None:
        """A local-path provisioner: each pending claim of our class gets a PV on a local folder."""
        while not self.stopping.wait(1.0):
            try:
                for claim in self.core.list_persistent_volume_claim_for_all_namespaces().items:
                    if claim.status.phase == "Pending" and not claim.spec.volume_name \
                            and claim.spec.storage_class_name in (STORAGE_CLASS, SIZED_STORAGE_CLASS):
                        self._provision(claim)
                self._reclaim()
            except client.ApiException as exc:
                log.warning("provisioning failed: %s", exc.reason)
            except Exception as exc:  # the API server is down or restarting: try again next second
                log.warning("provisioning failed: %s", type(exc).__name__)

    def _provision(self, claim: client.V1PersistentVolumeClaim) -> None:
        meta = claim.metadata
        folder = self.workloads / "volumes" / meta.namespace / meta.name
        folder.mkdir(parents=True, exist_ok=True)
        sized = claim.spec.storage_class_name == SIZED_STORAGE_CLASS
        if sized and not os.path.ismount(folder):
            size = str(claim.spec.resources.requests["storage"])
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={quantity_bytes(size)}", "tmpfs",
                            str(folder)], check=True, capture_output=True, timeout=30)
        # World-writable like a local-path provisioner's folders (after any mount, so it is the
        # mounted folder that opens up): a hostPath volume gets no fsGroup ownership change, and the
        # real node's pods run as a non-root user (the images' 65532).
        folder.chmod(0o777)
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"pvc-{meta.uid}",
                             "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {"capacity": {"storage": claim.spec.resources.requests["storage"]},
                         "accessModes": claim.spec.access_modes, "storageClassName": claim.spec.storage_class_name,
                         "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": str(folder)},
                         "claimRef": {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid}}}
        try:
            self.core.create_persistent_volume(body)
            log.info("provisioned %s for claim %s/%s", body["metadata"]["name"], meta.namespace, meta.name)
        except client.ApiException as exc:
            if exc.status != 409:
                raise

    def _reclaim(self) -> None:
        """The Delete reclaim policy for sized volumes: a released one is unmounted (its memory
        freed) and removed. Plain folders stay, as before, for a look after a test."""
        for volume in self.core.list_persistent_volume().items:
            if volume.spec.storage_class_name != SIZED_STORAGE_CLASS or volume.status.phase != "Released":
                continue
            folder = volume.spec.host_path.path
            if os.path.ismount(folder):
                subprocess.run(["umount", "-l", folder], check=False, capture_output=True, timeout=30)
            try:
                self.core.delete_persistent_volume(volume.metadata.name)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise

    # -- pods ------------------------------------------------------------------------------

    def _ours(self, pod: dict[str, Any]) -> bool:
        return pod["spec"].get("nodeName") in self.node_names

    def _admit(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.runners or pod["status"].get("phase") in ("Succeeded", "Failed"):
            return
        meta = pod["metadata"]
        root = self.workloads / "pods" / meta["namespace"] / f"{meta['name']}-{uid[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        box = sandbox.Sandbox(root=root, pvc_root=self.workloads / "volumes", pod=pod,
                              pod_ip=self.addresses.take(), core=self.core, server=self.server,
                              ca_file=self.ca_file)
        runner = podrunner.PodRunner(pod, self.core, self.table, box)
        self.runners[uid] = runner
        runner.start()

    def _delete(self, pod: dict[str, Any]) -> None:
        """Graceful deletion: stop the processes, then remove the object (grace period 0)."""
        meta = pod["metadata"]
        runner = self.runners.get(meta["uid"])
        grace = meta.get("deletionGracePeriodSeconds")

        def finish() -> None:
            if runner is not None:
                runner.stop(float(grace) if grace is not None else None)
                runner.finished.wait()
            elif pod["status"].get("phase") not in ("Succeeded", "Failed"):
                # Not ours to stop (the agent restarted): still end it in a terminal phase first.
                try:
                    self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"],
                                                          {"status": {"phase": "Failed"}})
                except client.ApiException as exc:
                    log.info("pod %s: final status not written: %s", meta["name"], exc.reason)
            try:
                # The grace period goes in the body: a body's DeleteOptions replace the query's.
                self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])))
            except client.ApiException as exc:
                if exc.status not in (404, 409):
                    log.warning("deleting pod %s failed: %s", meta["name"], exc.reason)

        threading.Thread(target=finish, daemon=True, name=f"delete-{meta['name']}").start()

    def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        if not self._ours(pod):
            return
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            runner = self.runners.pop(uid, None)
            if runner:
                runner.stop(0.0)
            return
        self._admit(pod)

    def watch_pods_forever(self) -> None:
        """List, then watch from the list's version; on any end of the stream, list again.

        The list is inside the ``try`` as much as the watch: an API server that is down refuses
        the re-list with a connection error (not an ``ApiException``), and a list outside the
        ``try`` ended this thread, so no pod was run again for the rest of the cluster's life
        while the heartbeat kept every node Ready."""
        deleting: set[str] = set()
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=30)
                data = json.loads(listing.data)
                for pod in data["items"]:
                    self._dispatch("ADDED", pod, deleting)
                self._forget_missing({pod["metadata"]["uid"] for pod in data["items"]})
                version = data["metadata"]["resourceVersion"]
                stream = watch.Watch()
                # The read timeout ends a watch whose server vanished without closing the socket
                # (a cut connection): bookmarks arrive about once a minute, so 90 s of silence
                # means the stream is dead, not idle.
                for event in stream.stream(self.core.list_pod_for_all_namespaces,
                                           resource_version=version, timeout_seconds=300,
                                           allow_watch_bookmarks=True, _preload_content=False,
                                           _request_timeout=(10, 90)):
                    if self.stopping.is_set():
                        break
                    if event["type"] in ("BOOKMARK", "ERROR"):
                        if event["type"] == "ERROR":
                            break
                        continue
                    self._dispatch(event["type"], event["raw_object"], deleting)
            except client.ApiException as exc:
                log.info("pod watch restarts: %s", exc.reason)
                self.stopping.wait(1.0)
            except Exception as exc:  # refused, reset or timed out: the API server is down or restarting
                log.warning("pod watch failed (%s); listing again", type(exc).__name__)
                self.stopping.wait(1.0)

    def _forget_missing(self, listed: set[str]) -> None:
        """Stop the runners of pods the list no longer has: a pod deleted while the watch was
        down (the API server restarting, the connection cut) sends no DELETED event, and its
        processes would run on unseen, as a kubelet's orphans would without its own resync."""
        for uid in [uid for uid in self.runners if uid not in listed]:
            runner = self.runners.pop(uid)
            log.info("pod %s: gone from the API server while the watch was down; stopping it", runner.key)
            runner.stop(0.0)

    def _dispatch(self, kind: str, pod: dict[str, Any], deleting: set[str]) -> None:
        uid = pod["metadata"]["uid"]
        if pod["metadata"].get("deletionTimestamp") and kind != "DELETED":
            if uid in deleting or not self._ours(pod):
                return
            deleting.add(uid)
            self._delete(pod)
            return
        if kind == "DELETED":
            deleting.discard(uid)
        self._handle(kind, pod)

    def shutdown(self) -> None:
        self.stopping.set()
        if self.logs is not None:
            self.logs.stop()
        for runner in list(self.runners.values()):
            runner.stop(5.0)
        for runner in list(self.runners.values()):
            runner.finished.wait(timeout=10)


def serve(api: client.ApiClient, workloads: pathlib.Path, server: str, ca_file: pathlib.Path) -> NodeAgent:
    agent = NodeAgent(api, workloads, server, ca_file)
    agent.serve_logs()
    agent.register_nodes()
    agent.ensure_storage_class()
    threading.Thread(target=agent.provision_forever, daemon=True, name="provisioner").start()
    threading.Thread(target=agent.heartbeat_forever, daemon=True, name="heartbeat").start()
    threading.Thread(target=agent.watch_pods_forever, daemon=True, name="pod-watch").start()
    return agent
