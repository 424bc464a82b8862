"""Operator-wide settings, read once at startup from the environment the chart sets."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from kquant.operator.api import v1alpha1 as api

DEFAULT_QUANTIZER_IMAGE = "ghcr.io/kquant-dev/quantizer:0.1.0"


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Defaults that a QuantizedModel may override per model."""

    quantizer_image: str = DEFAULT_QUANTIZER_IMAGE
    """``spec.quantizer.image`` when unset (chart value ``quantizerImage``)."""
    server_image: str = api.DEFAULT_SERVER_IMAGE
    """``spec.serving.image`` when unset (chart value ``serverImage``)."""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        environ = os.environ if env is None else env
        return cls(
            quantizer_image=environ.get("KQUANT_QUANTIZER_IMAGE") or DEFAULT_QUANTIZER_IMAGE,
            server_image=environ.get("KQUANT_SERVER_IMAGE") or api.DEFAULT_SERVER_IMAGE,
        )


DEFAULTS = OperatorConfig()
"""The built-in defaults, for callers (tests, the CLI) that run without the chart."""
