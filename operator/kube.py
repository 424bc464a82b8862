"""The one module that talks to the Kubernetes API.

Everything above it works on plain dicts and pydantic models; this module writes them. The
operator reads what it owns from its watches (``observed``), so a pass only writes; the CLI reads
a model here. Creation is idempotent: an object that already exists is left as it is (Jobs are
immutable and a second Job for one build must never appear) or patched to the wanted state
(Deployments, Services).

Responses are read as JSON, not turned into the client's model classes: that conversion cost more
CPU than anything else a pass did.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from typing import Any

from kquant.operator import config as operator_config
from kquant.operator import manifests
from kquant.operator.api import v1alpha1 as api
from kubernetes import client, config

log = logging.getLogger("kquant.operator")


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

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> str:
        """Merge ``status`` into the model's status; returns the model's new resourceVersion."""
        response = self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}, _preload_content=False)
        return str(_json(response)["metadata"]["resourceVersion"])

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
            self.core.create_namespaced_event(qm.metadata.namespace, body, _preload_content=False)
        except client.ApiException as exc:
            log.warning("could not post event %s on %s: %s", reason, qm.metadata.name, exc.reason)

    # -- Secrets: metadata only --------------------------------------------------------------

    METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    """Accept header that makes the API server answer with the object's metadata and no data."""

    def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """The labels of one Secret (None: it does not exist). Asked as PartialObjectMetadata, so the
        Secret's data never reaches the operator: it only needs to know whether the Secret's owner
        opted it in as a hub token (kquant.operator.policy)."""
        try:
            response = self.core.read_namespaced_secret(name, namespace, _preload_content=False,
                                                        _headers={"Accept": self.METADATA_ONLY})
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        body = _json(response)
        if body.get("kind") != "PartialObjectMetadata" or "data" in body:
            raise RuntimeError(f"the API server answered Secret {namespace}/{name} with {body.get('kind')}, "
                               "not its metadata alone; refusing to read it")
        labels: dict[str, str] = (body.get("metadata") or {}).get("labels") or {}
        return labels

    # -- generic objects -------------------------------------------------------------------

    def create(self, manifest: manifests.Manifest) -> manifests.Manifest | None:
        """Create the object and return it as the API server stored it; None if it existed
        already (it is then left untouched)."""
        try:
            return _json(self._creator(manifest)(manifest))
        except client.ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def apply(self, manifest: manifests.Manifest) -> manifests.Manifest:
        """Create, or merge-patch the spec of an existing object to the wanted state; returns the
        object as stored."""
        created = self.create(manifest)
        if created is not None:
            return created
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        patch = {"metadata": {"labels": manifest["metadata"].get("labels"),
                              "annotations": manifest["metadata"].get("annotations")},
                 "spec": manifest["spec"]}
        if manifest["kind"] == "Deployment":
            return _json(self.apps.patch_namespaced_deployment(name, namespace, patch, _preload_content=False))
        if manifest["kind"] == "Service":
            return _json(self.core.patch_namespaced_service(name, namespace, patch, _preload_content=False))
        raise ValueError(f"apply does not handle {manifest['kind']}")

    def _creator(self, manifest: manifests.Manifest) -> Any:
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
        return lambda body: create(namespace, body, _preload_content=False)


def describe_error(exc: Exception) -> str:
    """One line for the log: the API server's status and message, not the response headers that
    ``str(ApiException)`` adds."""
    if isinstance(exc, client.ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message") or ""
        except ValueError:
            message = str(exc.body or "")[:300]
        return f"API server said {exc.status} {exc.reason}: {message}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _json(response: Any) -> manifests.Manifest:
    """The body of a response requested with ``_preload_content=False``."""
    body: manifests.Manifest = json.loads(response.data)
    return body
