"""The objects of one build: its ConfigMap, ServiceAccount, Role, RoleBinding and Job. Pure code.

The ConfigMap carries the quantizer's build spec in and its progress and report out; the Role
lets the build's pod patch that one ConfigMap and nothing else. ``builds`` decides what to build
and names it; this module only renders it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from kquant.operator import builds, config, manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report as quantizer_report
from kquant.quantizer import sizing as sizing_rules
from kquant.quantizer import units


def objects(qm: api.QuantizedModel, build: builds.Build,
            settings: config.OperatorConfig = config.DEFAULTS,
            sizing: quantizer_report.SizingSummary | None = None) -> list[manifests.Manifest]:
    """ConfigMap, ServiceAccount, Role, RoleBinding and Job for one build, in creation order.

    ``sizing`` (what an earlier build of the model measured from the hub's listing) fills in what
    the spec leaves unset: the pod's memory and CPU requests, llama.cpp's threads and the deadline."""
    if sizing is not None and not build.spec.threads:
        build = dataclasses.replace(build, spec=build.spec.model_copy(update={"threads": sizing.cpus}))
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
    return [configmap, account, role, binding, job(qm, build, meta, settings, sizing)]


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
        # Hub client metadata and Python's temporary files; model files never go here (they go to the claim),
        # so a bound keeps a runaway writer from filling the node's disk.
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{sizing_rules.TMP_BYTES // units.GiB}Gi"}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "storage", "mountPath": builds.STORAGE_MOUNT},
                                    {"name": "tmp", "mountPath": "/tmp"}]
    for name, ref, path in (("calibration", qm.spec.calibration, builds.CALIBRATION_MOUNT),
                            ("evaluation", qm.spec.evaluation, builds.EVALUATION_MOUNT)):
        if ref is not None and ref.config_map_ref is not None:
            volumes.append({"name": name, "configMap": {"name": ref.config_map_ref.name}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def undersized(qm: api.QuantizedModel, sizing: quantizer_report.SizingSummary) -> list[str]:
    """The spec's build requests that are below what ``sizing`` says the build needs, in words."""
    quantizer = qm.spec.quantizer or api.Quantizer()
    requests = (quantizer.resources.requests if quantizer.resources else None) or {}
    found = []
    memory = units.quantity_bytes(requests.get("memory"))
    if memory is not None and memory < sizing.memory_bytes:
        found.append(f"spec.quantizer.resources.requests.memory is {requests['memory']}, but the build needs about "
                     f"{math.ceil(sizing.memory_bytes / units.GiB)}Gi")
    cpu = requests.get("cpu")
    if cpu is not None and units.parse_quantity(cpu) < sizing.cpus:
        found.append(f"spec.quantizer.resources.requests.cpu is {cpu}; {sizing.cpus} keep the build within its "
                     "estimated time")
    claim = qm.spec.storage.pvc.size
    if claim is not None and units.parse_quantity(claim) < sizing.claim_bytes:
        found.append(f"spec.storage.pvc.size is {claim}, but the builds need about "
                     f"{math.ceil(sizing.claim_bytes / units.GiB)}Gi")
    return found


def _sized_resources(quantizer: api.Quantizer, sizing: quantizer_report.SizingSummary | None) -> dict[str, Any]:
    resources = manifests.container_resources(quantizer)
    if sizing is None:
        return resources
    requests = resources.setdefault("requests", {})
    limits = resources.get("limits") or {}
    if "memory" not in requests and "memory" not in limits:
        requests["memory"] = f"{math.ceil(sizing.memory_bytes / units.GiB)}Gi"
    if "cpu" not in requests and "cpu" not in limits:
        requests["cpu"] = str(sizing.cpus)
    return resources


def job(qm: api.QuantizedModel, build: builds.Build, meta: dict[str, Any],
        settings: config.OperatorConfig, sizing: quantizer_report.SizingSummary | None = None) -> manifests.Manifest:
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
        "resources": _sized_resources(quantizer, sizing), "securityContext": manifests.restricted_security(),
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
        "metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec},
        # An evicted or preempted pod, or one on a node that went away, is not the build's fault:
        # it does not count against backoffLimit, and the Job starts another pod.
        "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}}
    deadline = quantizer.active_deadline_seconds or (sizing.deadline_seconds if sizing else None)
    if deadline:
        job_spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
