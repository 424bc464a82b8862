"""``kquant status NAME``: read a QuantizedModel from the cluster the current kubeconfig points at."""

from __future__ import annotations

from typing import Any

from kquant.operator import kube
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import common
from kubernetes import client, config


def current_namespace() -> str:
    """The namespace of the kubeconfig's current context, as kubectl picks it; ``default`` without one."""
    try:
        _, active = config.list_kube_config_contexts()
    except (config.ConfigException, OSError):
        return "default"
    namespace: Any = (active or {}).get("context", {}).get("namespace")
    return str(namespace) if namespace else "default"


def fetch(name: str, namespace: str) -> api.QuantizedModel:
    """The QuantizedModel ``namespace/name``, parsed by the API models."""
    try:
        k = kube.Kube.from_environment()
    except (config.ConfigException, OSError) as exc:
        raise common.CommandError(f"no cluster to read from: {exc}") from None
    try:
        body = k.get_model(namespace, name)
    except client.ApiException as exc:
        raise common.CommandError(f"cannot read QuantizedModel {namespace}/{name}: {exc.status} {exc.reason}") from None
    except OSError as exc:  # urllib3 wraps refused connections in OSError subclasses
        raise common.CommandError(f"cannot reach the API server: {exc}") from None
    finally:
        k.close()
    if body is None:
        raise common.CommandError(f"QuantizedModel {namespace}/{name} not found")
    try:
        return api.validate_body(body)
    except ValueError as exc:
        raise common.CommandError(str(exc)) from None


def retry(name: str, namespace: str, token: str) -> None:
    """Ask the operator to run the failed builds of ``namespace/name`` again: set the model's
    ``kquant.dev/retry`` annotation to a value it has not seen (``token``)."""
    try:
        k = kube.Kube.from_environment()
    except (config.ConfigException, OSError) as exc:
        raise common.CommandError(f"no cluster to write to: {exc}") from None
    try:
        k.annotate_model(namespace, name, {"kquant.dev/retry": token})
    except client.ApiException as exc:
        if exc.status == 404:
            raise common.CommandError(f"QuantizedModel {namespace}/{name} not found") from None
        raise common.CommandError(f"cannot annotate QuantizedModel {namespace}/{name}: {exc.status} {exc.reason}"
                                  ) from None
    except OSError as exc:
        raise common.CommandError(f"cannot reach the API server: {exc}") from None
    finally:
        k.close()
