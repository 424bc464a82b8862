"""Operator-wide settings, read once at startup from the environment the chart sets."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

from kquant.operator.api import v1alpha1 as api

DEFAULT_QUANTIZER_IMAGE = "ghcr.io/kquant-dev/quantizer:0.1.0"
"""The quantizer image `make images` tags (images/build.sh, the chart's appVersion)."""


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

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        environ = os.environ if env is None else env
        return cls(
            quantizer_image=environ.get("KQUANT_QUANTIZER_IMAGE") or DEFAULT_QUANTIZER_IMAGE,
            server_image=environ.get("KQUANT_SERVER_IMAGE") or api.DEFAULT_SERVER_IMAGE,
            peering_priority=_priority(environ),
            metrics_port=int(environ["KQUANT_METRICS_PORT"]) if environ.get("KQUANT_METRICS_PORT") else None,
            resync_seconds=float(environ.get("KQUANT_RESYNC_SECONDS") or 300.0),
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
