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
from kquant.operator.planner import nodes
from kquant.quantizer import report as quantizer_report
from kquant.quantizer import settings, units
from kquant.quantizer import sizing as sizing_rules


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
    return [*_result_access(qm, build.name, meta, build.spec), job(qm, build, meta, settings, sizing)]


def _result_access(qm: api.QuantizedModel, name: str, meta: dict[str, Any],
                   spec: Any) -> list[manifests.Manifest]:
    """The result ConfigMap (holding the quantizer's spec) and the account whose Role may patch it."""
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                 "data": {builds.SPEC_KEY: spec.model_dump_json(by_alias=True, exclude_none=True)}}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    # The quantizer may write its progress and report into its own ConfigMap, and nothing else.
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name],
                       "verbs": ["get", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name,
                             "namespace": qm.metadata.namespace}]}
    return [configmap, account, role, binding]


TOKEN_ENV = {"huggingface": "HF_TOKEN", "gguf": "HF_TOKEN", "modelscope": settings.MODELSCOPE_TOKEN_ENV}
"""The variable each source's hub client reads its token from (spec.source.<field>.tokenSecretRef)."""
SIZING_STEP_LABEL = "kquant.dev/step"
SIZING_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
"""The sizing Job lists a repository and reads a few kilobytes: Python and the hub client."""
SIZING_DEADLINE_SECONDS = 600
SIZING_TMP = "1Gi"


def sizing_objects(qm: api.QuantizedModel, step: builds.SizingStep,
                   settings: config.OperatorConfig = config.DEFAULTS) -> list[manifests.Manifest]:
    """ConfigMap, ServiceAccount, Role, RoleBinding and Job of the model's sizing step.

    Its pod runs the ``size`` command of the operator's own quantizer image (not
    ``spec.quantizer.image``: the listing is a contract between the operator and its own version,
    and an older image has no such command). With the hub token (the one pod besides the builds
    that gets it, as the step that reads the hub) it lists the pinned commit and reads config.json
    into /tmp; it mounts no claim (that would bind a volume to whatever node it ran on) and writes
    only its own ConfigMap. It runs where the builds may run (the spec's nodeSelector and
    tolerations: the hub is reachable from there) but needs no GPU."""
    meta = manifests.meta(qm, step.name, "build", **{SIZING_STEP_LABEL: "size"})
    quantizer = qm.spec.quantizer or api.Quantizer()
    container = {
        "name": "size", "image": settings.quantizer_image, "args": ["size"],
        "env": _env(qm, step.name), "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "resources": {k: dict(v) for k, v in SIZING_RESOURCES.items()},
        "securityContext": manifests.restricted_security(), "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": step.name, "restartPolicy": "Never", "containers": [container],
        "automountServiceAccountToken": True,  # to patch its ConfigMap, the one thing its Role allows
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": SIZING_TMP}}],
        "securityContext": manifests.pod_security(), "nodeSelector": dict(quantizer.node_selector or {}),
        "tolerations": manifests.tolerations(quantizer),
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": 2, "activeDeadlineSeconds": SIZING_DEADLINE_SECONDS,
        "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec},
        "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}}
    job_manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
    return [*_result_access(qm, step.name, meta, step.spec), job_manifest]


def _env(qm: api.QuantizedModel, name: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KQUANT_SPEC", "valueFrom": {"configMapKeyRef": {"name": name, "key": builds.SPEC_KEY}}},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    if qm.spec.source.modelscope is not None:
        # The ModelScope client draws a tqdm bar per file and one per snapshot, on stderr, which is
        # the pod's log and its termination message; progress reaches status through the ConfigMap.
        env.append({"name": "TQDM_DISABLE", "value": "1"})
    token = qm.spec.source.hub.token_secret_ref
    if token is not None:
        # Only this pod sees the token, as an env var resolved by the kubelet from the Secret, under
        # the name its hub's client reads (the quantizer takes it out of its environment at once).
        name = TOKEN_ENV[qm.spec.source.kind]
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
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


def _gpus(qm: api.QuantizedModel, sizing: quantizer_report.SizingSummary | None) -> api.Quantizer:
    """The quantizer's pod settings with the GPU count the sizing planned, unless the spec sets one
    (``spec.quantizer.gpus``; without a sizing its default of 1 stays, as before sizing existed)."""
    quantizer = qm.spec.quantizer or api.Quantizer()
    if sizing is None or "gpus" in quantizer.model_fields_set:
        return quantizer
    update: dict[str, Any] = {"gpus": sizing.gpus}
    if sizing.gpus and sizing.gpu_product and not quantizer.node_selector:
        # The planned pool: a node with that product has the GPUs the plan counted on.
        update["node_selector"] = {nodes.LabelKeys().product: sizing.gpu_product}
    return quantizer.model_copy(update=update)


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
    quantizer = _gpus(qm, sizing)
    volumes, mounts = _volumes(qm)
    node_selector = dict(quantizer.node_selector or {})
    if quantizer.gpus and not node_selector:
        node_selector = {"nvidia.com/gpu.present": "true"}
    container = {
        "name": "quantizer", "image": quantizer.image or settings.quantizer_image,
        "args": ["run"], "env": _env(qm, build.name), "volumeMounts": mounts,
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
        "podFailurePolicy": {"rules": [
            # An evicted or preempted pod, or one on a node that went away, is not the build's
            # fault: it does not count against backoffLimit, and the Job starts another pod.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            # A build the quantizer calls permanent (claim full, spec or source refused, repository
            # not found) fails the same way on every rerun: the Job fails at once, one pod per try,
            # and the user retries after fixing it. Network and hub errors exit 1 and keep the retries.
            {"action": "FailJob", "onExitCodes": {
                "containerName": "quantizer", "operator": "In",
                "values": [int(code) for code in quantizer_report.NO_RETRY_EXIT_CODES]}},
        ]}}
    deadline = quantizer.active_deadline_seconds or (sizing.deadline_seconds if sizing else None)
    if deadline:
        job_spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
