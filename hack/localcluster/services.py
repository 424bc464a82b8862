"""Reach a Service on the local cluster.

There is no kube-proxy here, and the EndpointSlice controller cannot list our pods: their
addresses are loopback addresses (127.N.x.y), which the API server refuses in an EndpointSlice.
A client therefore does what kube-proxy would: take the Service's selector, pick a Ready pod that
matches it, and connect to that pod's address on the Service's target port.
"""

from __future__ import annotations

from kubernetes import client


def ready_address(core: client.CoreV1Api, namespace: str, service: str, port: str | int = "http") -> str:
    """``host:port`` of a Ready pod behind ``service``; raise LookupError if none is Ready."""
    svc = core.read_namespaced_service(service, namespace)
    selector = ",".join(f"{k}={v}" for k, v in (svc.spec.selector or {}).items())
    svc_port = next(p for p in svc.spec.ports if port in (p.name, p.port))
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        if pod.metadata.deletion_timestamp or not pod.status.pod_ip:
            continue
        if not any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
            continue
        target = svc_port.target_port
        if isinstance(target, str):
            target = next(p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name == target)
        return f"{pod.status.pod_ip}:{target}"
    raise LookupError(f"no Ready pod behind Service {namespace}/{service}")
