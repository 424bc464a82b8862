"""Kubernetes objects the operator owns, as plain dicts built from the spec. Pure code.

Every object carries the labels below and an ownerReference to its QuantizedModel, so deleting
the QuantizedModel lets the garbage collector remove it all (the storage claim only when asked).
"""

from __future__ import annotations

from typing import Any

from kquant.operator import builds, config
from kquant.operator.api import v1alpha1 as api

SERVER_PORT = 8080
NON_ROOT_UID = 1000
MODEL_LABEL = "kquant.dev/model"
ROLE_LABEL = "kquant.dev/role"
VARIANT_LABEL = "kquant.dev/variant"
DIGEST_LABEL = "kquant.dev/digest"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kquant"}

Manifest = dict[str, Any]


def owner_reference(qm: api.QuantizedModel) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": qm.metadata.name,
            "uid": qm.metadata.uid, "controller": True, "blockOwnerDeletion": True}


def _meta(qm: api.QuantizedModel, name: str, role: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": qm.metadata.namespace,
            "labels": {MODEL_LABEL: qm.metadata.name, ROLE_LABEL: role, **MANAGED_BY, **labels},
            "ownerReferences": [owner_reference(qm)]}


def storage_claim_name(qm: api.QuantizedModel) -> str:
    return qm.spec.storage.pvc.claim_name or f"{qm.metadata.name}-storage"


def storage_claim(qm: api.QuantizedModel) -> Manifest | None:
    """The claim to create, or None when the spec names an existing one."""
    pvc = qm.spec.storage.pvc
    if pvc.claim_name:
        return None
    meta = _meta(qm, storage_claim_name(qm), "storage")
    if pvc.keep_on_delete:
        del meta["ownerReferences"]
    spec: dict[str, Any] = {"accessModes": [(pvc.access_mode or api.AccessMode.READ_WRITE_ONCE).value],
                            "resources": {"requests": {"storage": pvc.size}}}
    if pvc.storage_class_name:
        spec["storageClassName"] = pvc.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def _restricted_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def build_objects(qm: api.QuantizedModel, build: builds.Build,
                  settings: config.OperatorConfig = config.DEFAULTS) -> list[Manifest]:
    """ConfigMap, ServiceAccount, Role, RoleBinding and Job for one build, in creation order."""
    labels = {VARIANT_LABEL: build.variant, DIGEST_LABEL: build.digest[:16]}
    meta = _meta(qm, build.name, "build", **labels)
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                 "data": {builds.SPEC_KEY: build.spec.model_dump_json(by_alias=True, exclude_none=True)}}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    # The quantizer may write its progress and report into its own ConfigMap, and nothing else.
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [build.name],
                       "verbs": ["get", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": build.name},
               "subjects": [{"kind": "ServiceAccount", "name": build.name,
                             "namespace": qm.metadata.namespace}]}
    return [configmap, account, role, binding, build_job(qm, build, meta, settings)]


def _build_env(qm: api.QuantizedModel, build: builds.Build) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KQUANT_SPEC", "valueFrom": {"configMapKeyRef": {"name": build.name, "key": builds.SPEC_KEY}}},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    token = qm.spec.source.hub.token_secret_ref
    if token is not None:
        # Only this pod sees the token, as an env var resolved by the kubelet from the Secret.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    return env


def _build_volumes(qm: api.QuantizedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": storage_claim_name(qm)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "storage", "mountPath": builds.STORAGE_MOUNT},
                                    {"name": "tmp", "mountPath": "/tmp"}]
    for name, ref, path in (("calibration", qm.spec.calibration, builds.CALIBRATION_MOUNT),
                            ("evaluation", qm.spec.evaluation, builds.EVALUATION_MOUNT)):
        if ref is not None and ref.config_map_ref is not None:
            volumes.append({"name": name, "configMap": {"name": ref.config_map_ref.name}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def build_job(qm: api.QuantizedModel, build: builds.Build, meta: dict[str, Any],
              settings: config.OperatorConfig) -> Manifest:
    quantizer = qm.spec.quantizer or api.Quantizer()
    volumes, mounts = _build_volumes(qm)
    resources: dict[str, Any] = {k: dict(v) for k, v in (quantizer.resources.model_dump(
        exclude_none=True) if quantizer.resources else {}).items()}
    if quantizer.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(quantizer.gpus)
    node_selector = dict(quantizer.node_selector or {})
    if quantizer.gpus and not node_selector:
        node_selector = {"nvidia.com/gpu.present": "true"}
    container = {
        "name": "quantizer", "image": quantizer.image or settings.quantizer_image,
        "args": ["run"], "env": _build_env(qm, build), "volumeMounts": mounts,
        "resources": resources, "securityContext": _restricted_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": build.name, "restartPolicy": "Never", "containers": [container],
        "volumes": volumes, "securityContext": _pod_security(), "nodeSelector": node_selector,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in quantizer.tolerations or []],
    }
    job_spec: dict[str, Any] = {"backoffLimit": quantizer.backoff_limit, "template": {
        "metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec}}
    if quantizer.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = quantizer.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
