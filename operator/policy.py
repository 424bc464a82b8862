"""The platform's rules for what a QuantizedModel may reach: hubs, images, hub-token Secrets. Pure code.

A team that may create QuantizedModels is not trusted with the operator's reach: without these
rules it could send any Secret of its namespace as a bearer token to a host of its choice, over
cleartext http, or run any image as a build or a server. The chart renders the same rules twice:
as a ValidatingAdmissionPolicy (``kubectl apply`` refuses them, with the message below) and as
the operator's environment (``config.Policy``), because an object admitted before the platform
narrowed the rules, or before the chart installed the policy, still exists and must not build.

The label rule cannot be checked at admission (a ValidatingAdmissionPolicy cannot read Secrets),
so the operator reads the named Secret's metadata, never its data (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from kquant.operator import config
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import settings

HUB_TOKEN_LABEL = "kquant.dev/hub-token"
"""The label by which the owner of a Secret opts it in as a hub token (value ``"true"``)."""


def endpoint_allowed(endpoint: str, allowed: tuple[str, ...]) -> bool:
    """``endpoint`` is an allowed hub or a path below one. The comparison is on the whole host
    (``https://huggingface.co.evil.example`` is not below ``https://huggingface.co``)."""
    url = endpoint.rstrip("/")
    return any(url == base.rstrip("/") or url.startswith(base.rstrip("/") + "/") for base in allowed)


def image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    """An exact reference, or a prefix when the entry ends in ``*`` (``ghcr.io/acme/llama-server:*``)."""
    return any(image.startswith(entry[:-1]) if entry.endswith("*") else image == entry for entry in allowed)


def _hub(qm: api.QuantizedModel) -> tuple[str, api.HuggingFaceSource | api.ModelScopeSource | api.GGUFSource]:
    """The source and its field name as the user writes it."""
    source = qm.spec.source
    return source.kind, source.hub


def default_endpoint(field: str) -> str:
    """The hub a source that names no endpoint is fetched from."""
    return settings.MODELSCOPE_ENDPOINT if field == "modelscope" else settings.DEFAULT_ENDPOINT


def _who(qm: api.QuantizedModel) -> str:
    return f"QuantizedModel {qm.metadata.namespace}/{qm.metadata.name}"


def build_refusals(qm: api.QuantizedModel, policy: config.Policy) -> list[str]:
    """Why the platform refuses to build this model (empty: it may build)."""
    refusals: list[str] = []
    field, hub = _hub(qm)
    endpoint = hub.endpoint or default_endpoint(field)  # what the quantizer fetches from then
    if policy.endpoints is not None and not endpoint_allowed(endpoint, policy.endpoints):
        refusals.append(f"{_who(qm)}: spec.source.{field}.endpoint is {endpoint!r}, which is not an allowed hub "
                        f"(allowed: {', '.join(policy.endpoints) or 'none'}); use one of them, or ask the "
                        "platform team to add it to the chart value policy.allowedEndpoints")
    image = qm.spec.quantizer.image if qm.spec.quantizer else None
    if image and policy.quantizer_images is not None and not image_allowed(image, policy.quantizer_images):
        refusals.append(f"{_who(qm)}: spec.quantizer.image is {image!r}, which is not an allowed quantizer image "
                        f"(allowed: {', '.join(policy.quantizer_images) or 'none'}); remove it to use the "
                        "default, or ask the platform team to add it to policy.allowedQuantizerImages")
    return refusals


def token_refusal(qm: api.QuantizedModel, policy: config.Policy, labels: Mapping[str, str] | None) -> str | None:
    """Why the named hub-token Secret may not be used; ``labels`` are the Secret's labels (None:
    it does not exist). Only a Secret whose owner labelled it is ever sent to a hub."""
    field, hub = _hub(qm)
    ref = hub.token_secret_ref
    if ref is None or not policy.hub_token_label:
        return None
    if labels is None:
        return (f"{_who(qm)}: spec.source.{field}.tokenSecretRef names Secret {ref.name!r}, which does not exist "
                f"in namespace {qm.metadata.namespace}: create it with the label {HUB_TOKEN_LABEL}=true")
    if labels.get(HUB_TOKEN_LABEL) != "true":
        return (f"{_who(qm)}: spec.source.{field}.tokenSecretRef names Secret {ref.name!r}, which is not labelled "
                f"{HUB_TOKEN_LABEL}=true; only a Secret its owner opted in is sent to a hub: "
                f"kubectl label secret {ref.name} {HUB_TOKEN_LABEL}=true, if it really is a hub token")
    return None


def serving_refusals(qm: api.QuantizedModel, policy: config.Policy) -> list[str]:
    """Why the platform refuses to serve this model with the image it names."""
    spec = qm.spec.serving
    image = spec.image if spec else None
    if image and policy.server_images is not None and not image_allowed(image, policy.server_images):
        return [f"{_who(qm)}: spec.serving.image is {image!r}, which is not an allowed server image "
                f"(allowed: {', '.join(policy.server_images) or 'none'}); remove it to use the default, "
                "or ask the platform team to add it to policy.allowedServerImages"]
    return []
