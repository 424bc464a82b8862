"""What every object the operator owns shares, and the storage claim they all mount. Pure code.

Every object carries the labels below and an ownerReference to its QuantizedModel, so deleting
the QuantizedModel lets the garbage collector remove it all (the storage claim only when asked).
Pods run under the same restricted security contexts. The build's objects are rendered in
``build_manifests``, the server's in ``server_manifests``; both use the helpers here.
"""

from __future__ import annotations

from typing import Any

from kquant.operator.api import v1alpha1 as api

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


def meta(qm: api.QuantizedModel, name: str, role: str, **labels: str) -> dict[str, Any]:
    """Name, namespace, the labels the watches select on, and the owner reference."""
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
    metadata = meta(qm, storage_claim_name(qm), "storage")
    if pvc.keep_on_delete:
        del metadata["ownerReferences"]
    spec: dict[str, Any] = {"accessModes": [(pvc.access_mode or api.AccessMode.READ_WRITE_ONCE).value],
                            "resources": {"requests": {"storage": pvc.size}}}
    if pvc.storage_class_name:
        spec["storageClassName"] = pvc.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}


def restricted_security() -> dict[str, Any]:
    """A container's security context: the restricted Pod Security Standard, read-only root."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def pod_security() -> dict[str, Any]:
    """A pod's security context: non-root with a fixed UID, so files on the shared claim match."""
    return {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def container_resources(pod: api.PodSettings) -> dict[str, Any]:
    """The container's requests and limits as the spec gives them, plus its GPUs as a limit
    (extended resources take the limit as the request)."""
    resources: dict[str, Any] = {k: dict(v) for k, v in (pod.resources.model_dump(exclude_none=True)
                                                         if pod.resources else {}).items()}
    if pod.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(pod.gpus)
    return resources


def tolerations(pod: api.PodSettings) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in pod.tolerations or []]
