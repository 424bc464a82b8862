"""The operator's own Prometheus metrics, served at ``/metrics`` when KQUANT_METRICS_PORT is set.

Named after controller-runtime's, so dashboards made for Go operators read them with a new prefix:
how many passes ran and how long they took, how long a model waited in the queue before a worker
took it, how deep the queue is, and how many models the operator sees.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client

PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per operator (no process-wide default registry)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.passes = prometheus_client.Counter(
            "kquant_reconcile_total", "Passes over a QuantizedModel, by result.", ["result"], registry=self.registry)
        self.pass_seconds = prometheus_client.Histogram(
            "kquant_reconcile_duration_seconds", "How long one pass over a QuantizedModel took.",
            buckets=PASS_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = prometheus_client.Histogram(
            "kquant_workqueue_wait_seconds", "From an event asking for a pass to a worker starting it.",
            buckets=PASS_BUCKETS, registry=self.registry)
        self.queue_depth = prometheus_client.Gauge(
            "kquant_workqueue_depth", "Models waiting for a worker.", registry=self.registry)
        self.models = prometheus_client.Gauge(
            "kquant_models", "QuantizedModels the operator watches.", registry=self.registry)

    def track(self, queue_depth: Callable[[], float], models: Callable[[], float]) -> None:
        """Read the gauges from the live objects at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.models.set_function(models)

    def serve(self, port: int) -> None:
        prometheus_client.start_http_server(port, registry=self.registry)

    def exposition(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()
