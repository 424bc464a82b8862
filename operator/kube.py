"""The one module that talks to the Kubernetes API.

Everything above it works on plain dicts and pydantic models; this module reads and writes them.
Creation is idempotent: an object that already exists is left as it is (Jobs are immutable and a
second Job for one build must never appear) or patched to the wanted state (Deployments,
Services).
"""

from __future__ import annotations

import datetime
import logging
import uuid
from typing import Any

from kquant.operator import config as operator_config
from kquant.operator.api import v1alpha1 as api
from kubernetes import client, config

log = logging.getLogger("kquant.operator")
Manifest = dict[str, Any]


class Kube:
    """API clients for one operator process (opened at startup, closed at cleanup)."""

    def __init__(self, api_client: client.ApiClient,
                 settings: operator_config.OperatorConfig = operator_config.DEFAULTS) -> None:
        self.api_client = api_client
        self.settings = settings
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            config.load_incluster_config()
            api_client = client.ApiClient()
        except config.ConfigException:
            api_client = config.new_client_from_config()
        return cls(api_client, operator_config.OperatorConfig.from_environment())

    def close(self) -> None:
        self.api_client.close()

    # -- QuantizedModels -------------------------------------------------------------------

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return body

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status})

    def event(self, qm: api.QuantizedModel, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the QuantizedModel, as ``kubectl describe qm`` shows them."""
        now = datetime.datetime.now(datetime.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{qm.metadata.name}.{uuid.uuid4().hex[:12]}",
                                         namespace=qm.metadata.namespace),
            involved_object=client.V1ObjectReference(
                api_version=api.API_VERSION, kind=api.KIND, name=qm.metadata.name,
                namespace=qm.metadata.namespace, uid=qm.metadata.uid),
            type=kind, reason=reason, message=message[:1024], first_timestamp=now, last_timestamp=now,
            count=1, source=client.V1EventSource(component="kquant-operator"),
        )
        try:
            self.core.create_namespaced_event(qm.metadata.namespace, body)
        except client.ApiException as exc:
            log.warning("could not post event %s on %s: %s", reason, qm.metadata.name, exc.reason)

    # -- generic objects -------------------------------------------------------------------

    def create(self, manifest: Manifest) -> bool:
        """Create the object; False if it existed already (it is then left untouched)."""
        try:
            self._creator(manifest)(manifest)
        except client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def apply(self, manifest: Manifest) -> None:
        """Create, or merge-patch the spec of an existing object to the wanted state."""
        if self.create(manifest):
            return
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        patch = {"metadata": {"labels": manifest["metadata"].get("labels"),
                              "annotations": manifest["metadata"].get("annotations")},
                 "spec": manifest["spec"]}
        if manifest["kind"] == "Deployment":
            self.apps.patch_namespaced_deployment(name, namespace, patch)
        elif manifest["kind"] == "Service":
            self.core.patch_namespaced_service(name, namespace, patch)
        else:
            raise ValueError(f"apply does not handle {manifest['kind']}")

    def _creator(self, manifest: Manifest) -> Any:
        namespace = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        creators = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "Service": self.core.create_namespaced_service,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
            "Deployment": self.apps.create_namespaced_deployment,
        }
        create = creators[kind]
        return lambda body: create(namespace, body)

    # -- reads -----------------------------------------------------------------------------

    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def job(self, namespace: str, name: str) -> client.V1Job | None:
        try:
            return self.batch.read_namespaced_job(name, namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def failed_pod_message(self, namespace: str, job_name: str) -> str:
        """The last failed pod's termination message: the quantizer's own last words."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
        for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp, reverse=True):
            for status in pod.status.container_statuses or []:
                terminated = status.state.terminated if status.state else None
                if terminated and terminated.exit_code:
                    return (terminated.message or terminated.reason or "").strip()[-800:]
        return ""

    def build_pod_waiting(self, namespace: str, job_name: str) -> tuple[str, str] | None:
        """Why a build's pod cannot start, as the kubelet says it (reason, message), if it waits.

        The operator never reads Secrets: a missing token Secret shows here, in the kubelet's
        CreateContainerConfigError, so the operator needs no permission on Secrets at all."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
        for pod in pods:
            for status in (pod.status.container_statuses or []) if pod.status else []:
                waiting = status.state.waiting if status.state else None
                if waiting is not None and waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
                    return str(waiting.reason), str(waiting.message or "")
        return None

    def deployment(self, namespace: str, name: str) -> client.V1Deployment | None:
        try:
            return self.apps.read_namespaced_deployment(name, namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def nodes_and_pods(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Nodes and the pods that hold resources, as plain dicts for the planner."""
        sanitize = self.api_client.sanitize_for_serialization
        node_list = [sanitize(n) for n in self.core.list_node().items]
        pods = self.core.list_pod_for_all_namespaces(
            field_selector="status.phase!=Succeeded,status.phase!=Failed").items
        return node_list, [sanitize(p) for p in pods]
