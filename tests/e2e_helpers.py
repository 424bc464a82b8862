"""Helpers for reading QuantizedModel status in tests."""

from __future__ import annotations

from typing import Any

from kube import Cluster
from kubernetes import client


def qm_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(cluster.api_client())
    body = custom.get_namespaced_custom_object("kquant.dev", "v1alpha1", namespace, "quantizedmodels", name)
    status: dict[str, Any] = body.get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)
