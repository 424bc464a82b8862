"""The objects of one build: its ConfigMap, ServiceAccount, Role, RoleBinding and Job. Pure code.

The ConfigMap carries the quantizer's build spec in and its progress and report out; the Role
lets the build's pod patch that one ConfigMap and nothing else. ``builds`` decides what to build
and names it; this module only renders it.
"""

from __future__ import annotations

from typing import Any

from kquant.operator import builds, config, manifests
from kquant.operator.api import v1alpha1 as api


def objects(qm: api.QuantizedModel, build: builds.Build,
            settings: config.OperatorConfig = config.DEFAULTS) -> list[manifests.Manifest]:
    """ConfigMap, ServiceAccount, Role, RoleBinding and Job for one build, in creation order."""
    labels = {manifests.VARIANT_LABEL: build.variant, manifests.DIGEST_LABEL: build.digest[:16]}
    meta = manifests.meta(qm, build.name, "build", **labels)
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
    return [configmap, account, role, binding, job(qm, build, meta, settings)]


def _env(qm: api.QuantizedModel, build: builds.Build) -> list[dict[str, Any]]:
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


def _volumes(qm: api.QuantizedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": manifests.storage_claim_name(qm)}},
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


def job(qm: api.QuantizedModel, build: builds.Build, meta: dict[str, Any],
        settings: config.OperatorConfig) -> manifests.Manifest:
    """The Job that runs the quantizer, with the build's labels on its pod template: the build
    pods' watch finds the model by them."""
    quantizer = qm.spec.quantizer or api.Quantizer()
    volumes, mounts = _volumes(qm)
    node_selector = dict(quantizer.node_selector or {})
    if quantizer.gpus and not node_selector:
        node_selector = {"nvidia.com/gpu.present": "true"}
    container = {
        "name": "quantizer", "image": quantizer.image or settings.quantizer_image,
        "args": ["run"], "env": _env(qm, build), "volumeMounts": mounts,
        "resources": manifests.container_resources(quantizer), "securityContext": manifests.restricted_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": build.name, "restartPolicy": "Never", "containers": [container],
        # The one pod kquant gives a token: the quantizer patches its progress and report into its
        # ConfigMap through the API, as the build's own ServiceAccount, whose Role allows that alone.
        "automountServiceAccountToken": True,
        "volumes": volumes, "securityContext": manifests.pod_security(), "nodeSelector": node_selector,
        "tolerations": manifests.tolerations(quantizer),
    }
    job_spec: dict[str, Any] = {"backoffLimit": quantizer.backoff_limit, "template": {
        "metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec}}
    if quantizer.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = quantizer.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
