"""Operator-wide settings, read once at startup from the environment the chart sets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping

from kquant.operator.api import v1alpha1 as api

DEFAULT_QUANTIZER_IMAGE = "ghcr.io/kquant-dev/quantizer:0.1.0"
"""The quantizer image `make images` tags (images/build.sh, the chart's appVersion)."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the platform team allows a QuantizedModel to reach (chart values under ``policy``).

    The chart's ValidatingAdmissionPolicy refuses the same things at ``kubectl apply``; the
    operator checks again before it creates a build or a server, because an object admitted
    before the platform narrowed the policy (or before the chart installed it) is still there.
    ``None`` means "not restricted": the operator run by hand or by a test without the chart.
    """

    endpoints: tuple[str, ...] | None = None
    """Allowed hub base URLs (``spec.source.*.endpoint``); an entry allows itself and every
    path below it. http URLs are allowed only when listed."""
    quantizer_images: tuple[str, ...] | None = None
    """Allowed ``spec.quantizer.image`` values: exact references, or prefixes ending in ``*``."""
    server_images: tuple[str, ...] | None = None
    """Allowed ``spec.serving.image`` values, in the same form."""
    hub_token_label: bool = False
    """A Secret named in ``tokenSecretRef`` is used only when it carries ``kquant.dev/hub-token: "true"``."""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Policy:
        return cls(
            endpoints=_list(environ, "KQUANT_ALLOWED_ENDPOINTS"),
            quantizer_images=_list(environ, "KQUANT_ALLOWED_QUANTIZER_IMAGES"),
            server_images=_list(environ, "KQUANT_ALLOWED_SERVER_IMAGES"),
            hub_token_label=environ.get("KQUANT_HUB_TOKEN_LABEL_REQUIRED", "").lower() == "true",
        )


def _list(environ: Mapping[str, str], name: str) -> tuple[str, ...] | None:
    """A JSON list of strings from the chart; unset means unrestricted, a bad value stops the start
    (an operator that silently allowed everything would be worse than one that does not start)."""
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a JSON list of strings, got {raw!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Defaults that a QuantizedModel may override per model."""

    quantizer_image: str = DEFAULT_QUANTIZER_IMAGE
    """``spec.quantizer.image`` when unset (chart value ``quantizerImage``)."""
    server_image: str = api.DEFAULT_SERVER_IMAGE
    """``spec.serving.image`` when unset (chart value ``serverImage``)."""
    peering_priority: int = 0
    """kopf peering priority. kopf pauses every peer when priorities tie, so replicas must differ:
    the chart's ``peering.priority`` if set, else a number derived from the pod's name."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (chart value ``metrics.port``); none when unset."""
    resync_seconds: float = 300.0
    """Every model gets a pass this often even without an event: the net for a lost watch event."""
    policy: Policy = Policy()
    """Allowed hubs, images and hub-token Secrets (chart values under ``policy``)."""
    margins_configmap: str | None = None
    """The ConfigMap of margins learned per GPU product (``planner.margins``), in ``namespace``;
    None: nothing is learned (the chart creates it and sets ``KQUANT_MARGINS_CONFIGMAP``)."""
    namespace: str | None = None
    """The operator's own namespace (``POD_NAMESPACE``, from the downward API)."""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        environ = os.environ if env is None else env
        return cls(
            quantizer_image=environ.get("KQUANT_QUANTIZER_IMAGE") or DEFAULT_QUANTIZER_IMAGE,
            server_image=environ.get("KQUANT_SERVER_IMAGE") or api.DEFAULT_SERVER_IMAGE,
            peering_priority=_priority(environ),
            metrics_port=int(environ["KQUANT_METRICS_PORT"]) if environ.get("KQUANT_METRICS_PORT") else None,
            resync_seconds=float(environ.get("KQUANT_RESYNC_SECONDS") or 300.0),
            policy=Policy.from_environment(environ),
            margins_configmap=environ.get("KQUANT_MARGINS_CONFIGMAP") or None,
            namespace=environ.get("POD_NAMESPACE") or None,
        )


def _priority(environ: Mapping[str, str]) -> int:
    explicit = environ.get("KQUANT_PEERING_PRIORITY")
    if explicit:
        return int(explicit)
    pod = environ.get("POD_NAME")
    if not pod:
        return 0
    # Stable for one pod, different between replicas (a tie would pause every replica).
    return int.from_bytes(hashlib.sha256(pod.encode()).digest()[:3], "big")


DEFAULTS = OperatorConfig()
"""The built-in defaults, for callers (tests, the CLI) that run without the chart."""
