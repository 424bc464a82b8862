"""llama-server's Deployment and Service for the promoted variant. Pure code.

Rendered from what the serving decision needs: the spec, the ``artifacts.Artifact`` to serve and
the ``serving.Candidate`` chosen for it (None on CPU). The Deployment carries ``serving_hash`` of
the spec and the artifact, so that a pass can tell from the watched Deployment alone whether it
serves what the spec asks for.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from kquant.operator import artifacts, builds, config, manifests, serving
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import plan
from kquant.quantizer import units

SERVER_PORT = 8080
API_KEY_MOUNT = "/run/kquant/api-key"
"""Folder of the API key file in the server container (``spec.serving.apiKeySecretRef``)."""
API_KEY_FILE = "keys"
HASH_ANNOTATION = "kquant.dev/serving-hash"
"""On the server Deployment: ``serving_hash`` of what it was built from; a change means a rollout."""


def deployment_name(qm: api.QuantizedModel) -> str:
    return f"{qm.metadata.name}-server"


def service_name(qm: api.QuantizedModel) -> str:
    return qm.metadata.name


def endpoint(qm: api.QuantizedModel) -> str:
    """The OpenAI-compatible base URL of the Service, inside the cluster."""
    return f"http://{service_name(qm)}.{qm.metadata.namespace}.svc.cluster.local:{SERVER_PORT}/v1"


MEMORY_HEADROOM = 0.10
"""Above the plan's host bytes in the default memory request: llama.cpp's own allocations, the
HTTP server's buffers, and the page cache a memory-mapped model keeps warm."""
MEMORY_EXTRA_BYTES = 1 << 30


LOG_VERBOSITY = 4
"""llama-server's ``--log-verbosity``: 4 prints the buffer sizes and offloaded layers the operator
checks the plan against (``planner.server_log``), and nothing of the requests (prompts stay out
of the log); the default, 3, prints neither."""
_VERBOSITY_FLAGS = {"-lv", "--verbosity", "--log-verbosity", "-v", "--verbose", "--log-verbose"}


def server_threads(spec: api.Serving) -> int | None:
    """llama-server's ``--threads``: the CPU limit, else the CPU request, whole CPUs, at least one.
    Without it llama.cpp starts one thread per core of the node (64 threads for a 1-CPU request on
    a 64-core node), and the threads then fight over the CPUs the pod is given. None when the spec
    sets neither (llama.cpp's default stands)."""
    return builds.cpu_count(spec)


def memory_request(offload: plan.OffloadPlan | None) -> str | None:
    """The default memory request: what the plan puts in host memory (weights that stay on the CPU,
    such as the experts of ``--n-cpu-moe`` blocks, their KV and compute buffers) plus headroom, in
    whole GiB. None without a plan (served on CPU: the spec's own request, if any, stands)."""
    if offload is None:
        return None
    wanted = offload.host.total * (1 + MEMORY_HEADROOM) + MEMORY_EXTRA_BYTES
    return f"{math.ceil(wanted / units.GiB)}Gi"


def server_args(qm: api.QuantizedModel, model_path: str, offload: plan.OffloadPlan | None) -> list[str]:
    """llama-server's arguments: where and how to listen, then the plan's own arguments (which pin
    llama.cpp to exactly what was planned: ``--fit off``, unified KV, ubatch, split, experts)."""
    spec = qm.spec.serving
    assert spec is not None
    args = ["--model", model_path, "--alias", f"{qm.metadata.name}-{spec.variant}",
            "--host", "0.0.0.0", "--port", str(SERVER_PORT), "--metrics", "--no-webui"]
    if not _VERBOSITY_FLAGS & {a.split("=", 1)[0] for a in spec.extra_args or ()}:
        args += ["--log-verbosity", str(LOG_VERBOSITY)]
    threads = server_threads(spec)
    if threads is not None and not {"-t", "--threads"} & {a.split("=", 1)[0] for a in spec.extra_args or ()}:
        args += ["--threads", str(threads)]
    if offload is not None:
        args += list(offload.server_args())
    else:  # served on CPU: nothing to plan on a GPU
        ngl = spec.gpu_layers if isinstance(spec.gpu_layers, int) else 0
        args += ["--ctx-size", str(spec.context_size), "--parallel", str(spec.parallel),
                 "--n-gpu-layers", str(ngl), "--cache-type-k", spec.cache_type_k.value,
                 "--cache-type-v", spec.cache_type_v.value, "--flash-attn", spec.flash_attention.value]
    sampling = spec.sampling or api.Sampling()
    for flag, value in (("--temp", sampling.temperature), ("--top-p", sampling.top_p),
                        ("--top-k", sampling.top_k), ("--min-p", sampling.min_p), ("--seed", sampling.seed)):
        if value is not None:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if spec.api_key_secret_ref is not None:
        # A path, never the key: the argument list is readable by anyone who may read the pod.
        args += ["--api-key-file", f"{API_KEY_MOUNT}/{API_KEY_FILE}"]
    return args + list(spec.extra_args or [])


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 3}


def _labels(qm: api.QuantizedModel) -> dict[str, str]:
    """What the Service and the Deployment select the server pods by (not the variant: a rollout
    to another variant keeps the same selector)."""
    return {manifests.MODEL_LABEL: qm.metadata.name, manifests.ROLE_LABEL: "server"}


def deployment(qm: api.QuantizedModel, artifact: artifacts.Artifact, candidate: serving.Candidate | None,
               surge: bool, settings: config.OperatorConfig = config.DEFAULTS) -> manifests.Manifest:
    """The server Deployment: ``artifact`` on ``candidate``'s GPU pool (None: on CPU), rolling
    (``surge``) where a second pod fits next to the old one, else recreated."""
    spec = qm.spec.serving
    assert spec is not None and artifact.path and artifact.digest
    labels = _labels(qm)
    pod_labels = {**labels, manifests.VARIANT_LABEL: artifact.variant,
                  manifests.DIGEST_LABEL: artifact.digest[:16]}
    node_selector = dict(spec.node_selector or {})
    if spec.gpus and candidate and candidate.pool.product:
        node_selector.setdefault("nvidia.com/gpu.product", candidate.pool.product)
    mounts: list[dict[str, Any]] = [{"name": "storage", "mountPath": builds.STORAGE_MOUNT, "readOnly": True}]
    container = {
        "name": "llama-server", "image": spec.image or settings.server_image,
        "args": server_args(qm, artifact.path, candidate.offload if candidate else None),
        "ports": [{"name": "http", "containerPort": SERVER_PORT}],
        "volumeMounts": mounts,
        "resources": _resources(spec, candidate.offload if candidate else None),
        "startupProbe": _probe("/health", 2, 600),  # loading a large GGUF takes minutes
        "readinessProbe": _probe("/health", 5, 3),
        "livenessProbe": _probe("/health", 10, 6),
        "securityContext": manifests.restricted_security(),
    }
    volumes: list[dict[str, Any]] = [{"name": "storage", "persistentVolumeClaim": {
        "claimName": manifests.storage_claim_name(qm), "readOnly": True}}]
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        # Readable by the pod's group only (fsGroup); the kubelet keeps it in memory (tmpfs).
        volumes.append({"name": "api-key", "secret": {"secretName": ref.name, "defaultMode": 0o440,
                                                      "items": [{"key": ref.key, "path": API_KEY_FILE}]}})
        mounts.append({"name": "api-key", "mountPath": API_KEY_MOUNT, "readOnly": True})
    pod_spec = {
        "containers": [container], "nodeSelector": node_selector,
        "tolerations": manifests.tolerations(spec),
        "volumes": volumes,
        "securityContext": manifests.pod_security(),
        "enableServiceLinks": False,
        # llama-server never calls the Kubernetes API: a token in the pod would only serve someone
        # who broke into it.
        "automountServiceAccountToken": False,
    }
    strategy = ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
                if surge else {"type": "Recreate"})
    meta = manifests.meta(qm, deployment_name(qm), "server")
    meta["annotations"] = {HASH_ANNOTATION: serving_hash(qm, artifact)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
        "replicas": spec.replicas, "selector": {"matchLabels": labels}, "strategy": strategy,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec}}}


def _resources(spec: api.Serving, offload: plan.OffloadPlan | None) -> dict[str, Any]:
    """The spec's resources, with the memory request defaulted from the plan when the spec has none."""
    resources = manifests.container_resources(spec)
    default = memory_request(offload)
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    if default is not None and "memory" not in requests and "memory" not in limits:
        resources.setdefault("requests", {})["memory"] = default
    return resources


def service(qm: api.QuantizedModel) -> manifests.Manifest:
    """The Service in front of the server pods, whatever variant they serve."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": manifests.meta(qm, service_name(qm), "server"),
            "spec": {"selector": _labels(qm), "ports": [{"name": "http", "port": SERVER_PORT,
                                                         "targetPort": "http"}]}}


def serving_hash(qm: api.QuantizedModel, artifact: artifacts.Artifact) -> str:
    """What decides the Deployment: the serving spec and the exact artifact."""
    assert qm.spec.serving is not None
    payload = {"serving": qm.spec.serving.model_dump(mode="json", by_alias=True), "digest": artifact.digest,
               "path": artifact.path}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
