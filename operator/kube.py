"""The one module that talks to the Kubernetes API.

Everything above it works on plain dicts and pydantic models; this module writes them. The
operator reads what it owns from its watches (``observed``), so a pass only writes; the CLI reads
a model here. Creation is idempotent: an object that already exists is left as it is (Jobs are
immutable and a second Job for one build must never appear) or applied to the wanted state
(Deployments, Services, by server-side apply under kquant's field manager, so that a setting that
leaves the wanted state leaves the live object too).

An object that exists but that the model does not own (its ownerReferences lack the model's uid)
is never used or changed: another tenant may have made it on purpose, to feed a build its own
spec or to have the operator rewrite its Service. ``NotOwnedError`` says whose it is.

Responses are read as JSON, not turned into the client's model classes: that conversion cost more
CPU than anything else a pass did.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from typing import Any

import urllib3
from kquant.operator import config as operator_config
from kquant.operator import findings, manifests
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import margins
from kubernetes import client, config

log = logging.getLogger("kquant.operator")
FIELD_MANAGER = "kquant"
"""The field manager of every server-side apply: kquant owns exactly the fields it last applied."""


NotOwnedError = findings.NotOwnedError
RefusedError = findings.RefusedError
REFUSALS = (400, 422)
"""What the API server answers to an object it will not take as written (not a transient failure)."""


def refused(exc: Exception, manifest: manifests.Manifest) -> Exception:
    """``RefusedError`` for an answer that no retry changes, naming the object; else ``exc`` itself."""
    if isinstance(exc, client.ApiException) and exc.status in REFUSALS:
        try:
            message = json.loads(exc.body or "{}").get("message") or str(exc.reason)
        except ValueError:
            message = str(exc.reason)
        return RefusedError(manifest["kind"], manifest["metadata"]["name"], message)
    return exc


def _owner_text(existing: manifests.Manifest) -> str:
    refs = (existing.get("metadata") or {}).get("ownerReferences") or []
    if refs:
        return ", ".join(f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')})" for r in refs)
    return "no QuantizedModel (it has no owner reference)"


def owned(wanted: manifests.Manifest, existing: manifests.Manifest) -> bool:
    """The live object is the model's: it carries an ownerReference with the model's uid, or, for
    an object made without one (a storage claim kept on delete), the model's labels."""
    refs = wanted["metadata"].get("ownerReferences") or []
    live = existing.get("metadata") or {}
    if refs:
        uids = {r.get("uid") for r in live.get("ownerReferences") or []}
        return all(r["uid"] in uids for r in refs)
    labels, want = live.get("labels") or {}, wanted["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in want.items())


CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0
"""The longest a single call may wait for its answer; the operator's calls are small (one
object, or a label-selected list), so half a minute means the connection is dead, not the call slow."""


def _with_deadline(api_client: client.ApiClient) -> None:
    """Give every call of ``api_client`` a deadline unless it names its own. Without one, a call
    sent on a kept-alive connection that died silently (a NAT or a load balancer that dropped the
    flow, seen in tests/faults/test_watch_cut.py) waits for ever, and the worker running that
    pass with it. (A pool-wide urllib3 timeout does not do: the client passes ``timeout=None``
    explicitly, which urllib3 reads as "no timeout".)"""
    rest = api_client.rest_client
    send = rest.request

    def request(method: str, url: str, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        deadline = _request_timeout or (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
        return send(method, url, *args, _request_timeout=deadline, **kwargs)

    rest.request = request


class Kube:
    """API clients for one operator process (opened at startup, closed at cleanup)."""

    def __init__(self, api_client: client.ApiClient,
                 settings: operator_config.OperatorConfig = operator_config.DEFAULTS) -> None:
        self.api_client = api_client
        self.settings = settings
        _with_deadline(api_client)
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

    def model_exists(self, namespace: str, name: str, uid: str) -> bool:
        body = self.get_model(namespace, name)
        return body is not None and body["metadata"].get("uid") == uid

    def annotate_model(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Set annotations on a QuantizedModel (the CLI's ``kquant retry``: the user's own write,
        with the user's rights; the operator never writes a model's metadata)."""
        self.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"metadata": {"annotations": annotations}})

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> str:
        """Merge ``status`` into the model's status; returns the model's new resourceVersion."""
        response = self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}, _preload_content=False)
        return str(_json(response)["metadata"]["resourceVersion"])

    def event(self, qm: api.QuantizedModel, kind: str, reason: str, message: str, once: str | None = None) -> None:
        """A core/v1 Event on the QuantizedModel, as ``kubectl describe qm`` shows them. With
        ``once`` the Event's name is fixed, and the API server refuses it a second time (409)."""
        now = datetime.datetime.now(datetime.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{qm.metadata.name}.{once or uuid.uuid4().hex[:12]}",
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
            if exc.status == 409 and once:
                log.info("event %s on %s was posted before (a repeated pass)", reason, qm.metadata.name)
            elif not namespace_terminating(exc):
                log.warning("could not post event %s on %s: %s", reason, qm.metadata.name, exc.reason)

    def peers(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """The ``status`` of kopf's peering object (ClusterKopfPeering when ``namespace`` is
        None): who takes part, with what priority, last seen when; None when it does not exist."""
        try:
            if namespace is None:
                body = self.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
            else:
                body = self.custom.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        found: dict[str, Any] | None = body.get("status")
        return found

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
        """Create the object and return it as the API server stored it; None if the model's own
        object existed already (it is then left untouched). Raises ``NotOwnedError`` when the object
        that exists is someone else's."""
        try:
            return _json(self._call("create", manifest)(manifest))
        except client.ApiException as exc:
            if exc.status != 409:
                raise refused(exc, manifest) from exc
        existing = self.read(manifest)
        if existing is not None and not owned(manifest, existing):
            meta = manifest["metadata"]
            raise NotOwnedError(manifest["kind"], meta["namespace"], meta["name"], _owner_text(existing))
        return None

    def read(self, manifest: manifests.Manifest) -> manifests.Manifest | None:
        """The live object of ``manifest``'s kind, namespace and name; None if there is none."""
        meta = manifest["metadata"]
        try:
            return _json(self._call("read", manifest)(meta["name"]))
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, manifest: manifests.Manifest) -> manifests.Manifest:
        """Server-side apply of the whole wanted object under kquant's field manager: what kquant
        applied before and no longer wants (a GPU limit, a nodeSelector) leaves the live object.
        Raises ``NotOwnedError`` when the object exists and is someone else's; returns it as stored."""
        existing = self.read(manifest)
        if existing is not None and not owned(manifest, existing):
            meta = manifest["metadata"]
            raise NotOwnedError(manifest["kind"], meta["namespace"], meta["name"], _owner_text(existing))
        meta = manifest["metadata"]
        patchers = {"Deployment": self.apps.patch_namespaced_deployment,
                    "Service": self.core.patch_namespaced_service}
        if manifest["kind"] not in patchers:
            raise ValueError(f"apply does not handle {manifest['kind']}")
        # force: fields another manager set (an earlier operator's merge patches, a kubectl edit)
        # become kquant's, since the model's spec is what decides them.
        try:
            response = patchers[manifest["kind"]](
                meta["name"], meta["namespace"], manifest, field_manager=FIELD_MANAGER, force=True,
                _content_type="application/apply-patch+yaml", _preload_content=False)
        except client.ApiException as exc:
            raise refused(exc, manifest) from exc
        return _json(response)

    def delete(self, manifest: manifests.Manifest) -> bool:
        """Delete the model's own object (its pods and other dependents go by garbage collection);
        False if it was gone already, or if ``manifest`` names a uid and the live object is a newer
        one of the same name (a pass that saw an older state must not delete what replaced it).
        An object that is not the model's is left alone (``NotOwnedError``)."""
        existing = self.read(manifest)
        if existing is None:
            return False
        expected = manifest["metadata"].get("uid")
        if expected and existing["metadata"].get("uid") != expected:
            return False
        if not owned(manifest, existing):
            meta = manifest["metadata"]
            raise NotOwnedError(manifest["kind"], meta["namespace"], meta["name"], _owner_text(existing))
        uid = existing["metadata"]["uid"]
        body = client.V1DeleteOptions(propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid))
        try:
            self._call("delete", manifest)(manifest["metadata"]["name"], body=body)
        except client.ApiException as exc:
            if exc.status in (404, 409):  # gone meanwhile, or replaced by another object of that name
                return False
            raise
        return True

    def _call(self, verb: str, manifest: manifests.Manifest) -> Any:
        namespace = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        apis = {
            "ConfigMap": (self.core, "config_map"),
            "ServiceAccount": (self.core, "service_account"),
            "PersistentVolumeClaim": (self.core, "persistent_volume_claim"),
            "Service": (self.core, "service"),
            "Role": (self.rbac, "role"),
            "RoleBinding": (self.rbac, "role_binding"),
            "Job": (self.batch, "job"),
            "Deployment": (self.apps, "deployment"),
        }
        group, noun = apis[kind]
        method = getattr(group, f"{verb}_namespaced_{noun}")
        if verb == "create":
            return lambda body: method(namespace, body, _preload_content=False)
        if verb == "read":
            return lambda name: method(name, namespace, _preload_content=False)
        return lambda name, body: method(name, namespace, body=body, _preload_content=False)

    LOG_LIMIT_BYTES = 4 * 1024 * 1024
    """llama-server's startup log at --log-verbosity 4 is tens of KiB; the head is all a check reads."""

    def pod_log(self, namespace: str, name: str, container: str) -> str | None:
        """The head of a container's log (pods/log); None when the node cannot serve it (no kubelet,
        the container gone): a plan check that cannot read is skipped, never a failed pass."""
        try:
            text: str = self.core.read_namespaced_pod_log(name, namespace, container=container,
                                                          limit_bytes=self.LOG_LIMIT_BYTES)
        except client.ApiException as exc:
            log.info("log of pod %s/%s not readable: %s %s", namespace, name, exc.status, exc.reason)
            return None
        except urllib3.exceptions.HTTPError as exc:
            log.info("log of pod %s/%s not readable: %s", namespace, name, type(exc).__name__)
            return None
        return text

    def plan_margins(self) -> tuple[dict[str, str], str]:
        """The learned margins per GPU product and where they live; empty when the chart set none up
        (or the ConfigMap cannot be read: planning goes on with the defaults). Read at a rollout only."""
        name, namespace = self.settings.margins_configmap, self.settings.namespace
        if not name or not namespace:
            return {}, ""
        try:
            body = _json(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))
        except client.ApiException as exc:
            log.warning("margins ConfigMap %s/%s not readable: %s %s", namespace, name, exc.status, exc.reason)
            return {}, ""
        return dict(body.get("data") or {}), f"ConfigMap {namespace}/{name}"

    def record_margin(self, product: str, excess: int) -> None:
        """Keep ``excess`` for ``product`` when it is the largest seen (read, then patch with the
        resourceVersion read, so two replicas' writes cannot lose the larger)."""
        name, namespace = self.settings.margins_configmap, self.settings.namespace
        if not name or not namespace:
            return
        try:
            body = _json(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))
            data = margins.merged(body.get("data"), product, excess)
            if data is None:
                return
            patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "data": data}
            self.core.patch_namespaced_config_map(name, namespace, patch, _preload_content=False)
            log.info("learned margin for %s: %d bytes (ConfigMap %s/%s)", product, excess, namespace, name)
        except client.ApiException as exc:
            # a conflict means another replica wrote first: the next pod's check records it again
            log.warning("margin for %s not recorded in %s/%s: %s %s", product, namespace, name, exc.status,
                        exc.reason)

    def config_map_keys(self, namespace: str, name: str) -> list[str] | None:
        """The keys of a ConfigMap the user made (calibration or evaluation data); None if it
        does not exist. Asked once when a build is about to start, not on every pass."""
        try:
            body = _json(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return sorted({*(body.get("data") or {}), *(body.get("binaryData") or {})})


def namespace_terminating(exc: Exception) -> bool:
    """The API server refused a create because the namespace is being deleted: the model goes
    with it, so there is nothing to retry and nothing to report."""
    return (isinstance(exc, client.ApiException) and exc.status == 403
            and "because it is being terminated" in str(exc.body or ""))


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
