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
import pathlib
import threading
from typing import Any

from kubernetes import client, watch

from localcluster import images, nodes, podrunner, sandbox

log = logging.getLogger("localcluster.agent")
LEASE_NAMESPACE = "kube-node-lease"
STORAGE_CLASS = "local"
PROVISIONER = "kquant.dev/local-agent"


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
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
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
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS,
                             "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
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
                            and claim.spec.storage_class_name == STORAGE_CLASS:
                        self._provision(claim)
            except client.ApiException as exc:
                log.warning("provisioning failed: %s", exc.reason)
            except Exception as exc:  # the API server is down or restarting: try again next second
                log.warning("provisioning failed: %s", type(exc).__name__)

    def _provision(self, claim: client.V1PersistentVolumeClaim) -> None:
        meta = claim.metadata
        folder = self.workloads / "volumes" / meta.namespace / meta.name
        folder.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"pvc-{meta.uid}",
                             "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {"capacity": {"storage": claim.spec.resources.requests["storage"]},
                         "accessModes": claim.spec.access_modes, "storageClassName": STORAGE_CLASS,
                         "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": str(folder)},
                         "claimRef": {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid}}}
        try:
            self.core.create_persistent_volume(body)
            log.info("provisioned %s for claim %s/%s", body["metadata"]["name"], meta.namespace, meta.name)
        except client.ApiException as exc:
            if exc.status != 409:
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
        deleting: set[str] = set()
        while not self.stopping.is_set():
            listing = self.core.list_pod_for_all_namespaces(_preload_content=False)
            data = json.loads(listing.data)
            for pod in data["items"]:
                self._dispatch("ADDED", pod, deleting)
            version = data["metadata"]["resourceVersion"]
            stream = watch.Watch()
            try:
                for event in stream.stream(self.core.list_pod_for_all_namespaces,
                                           resource_version=version, timeout_seconds=300,
                                           allow_watch_bookmarks=True, _preload_content=False):
                    if self.stopping.is_set():
                        break
                    if event["type"] in ("BOOKMARK", "ERROR"):
                        if event["type"] == "ERROR":
                            break
                        continue
                    self._dispatch(event["type"], event["raw_object"], deleting)
            except client.ApiException as exc:
                log.info("pod watch restarts: %s", exc.reason)
            except Exception:
                log.exception("pod watch failed; re-listing")
                self.stopping.wait(1.0)

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
        for runner in list(self.runners.values()):
            runner.stop(5.0)
        for runner in list(self.runners.values()):
            runner.finished.wait(timeout=10)


def serve(api: client.ApiClient, workloads: pathlib.Path, server: str, ca_file: pathlib.Path) -> NodeAgent:
    agent = NodeAgent(api, workloads, server, ca_file)
    agent.register_nodes()
    agent.ensure_storage_class()
    threading.Thread(target=agent.provision_forever, daemon=True, name="provisioner").start()
    threading.Thread(target=agent.heartbeat_forever, daemon=True, name="heartbeat").start()
    threading.Thread(target=agent.watch_pods_forever, daemon=True, name="pod-watch").start()
    return agent
