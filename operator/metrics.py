"""The operator's own Prometheus metrics, served at ``/metrics`` when KQUANT_METRICS_PORT is set.

Named after controller-runtime's, so dashboards made for Go operators read them with a new prefix:
how many passes ran and how long they took, how long a model waited in the queue before a worker
took it, how deep the queue is, and how many models the operator sees.

The plan check of each served model (``status.serving.planCheck``) is exported too: predicted and
measured bytes per device, their error ratio, and layers planned against offloaded. They are read
from the watched models at scrape time, so a metric never outlives its model and needs no
bookkeeping when a model goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import prometheus_client
import pydantic
from kquant.operator.api import v1alpha1 as api
from prometheus_client import core as prometheus_core

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
        self.held = prometheus_client.Gauge(
            "kquant_held_objects", "Objects the operator keeps in memory, by store (each kopf index, the "
            "work queue's bookkeeping, the status ledger, node shapes), counted at each resync: it follows "
            "the cluster's objects and must not grow with churn.", ["store"], registry=self.registry)

    def held_objects(self, counts: Mapping[str, int]) -> None:
        """How many objects each in-memory store holds, as counted by the caller's event loop."""
        for store, count in counts.items():
            self.held.labels(store=store).set(count)

    def track(self, queue_depth: Callable[[], float], models: Callable[[], float],
              bodies: Callable[[], Iterable[Mapping[str, Any]]] | None = None) -> None:
        """Read the gauges from the live objects at scrape time (``bodies``: the watched models)."""
        self.queue_depth.set_function(queue_depth)
        self.models.set_function(models)
        if bodies is not None:
            self.registry.register(PlanCheckCollector(bodies))

    def serve(self, port: int) -> None:
        prometheus_client.start_http_server(port, registry=self.registry)

    def exposition(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()


class PlanCheckCollector(prometheus_client.registry.Collector):
    """``status.serving.planCheck`` of every watched model, as gauges."""

    def __init__(self, bodies: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self.bodies = bodies

    def describe(self) -> list[prometheus_core.Metric]:
        return []  # the families are built at scrape time: nothing to register up front

    def collect(self) -> Iterator[prometheus_core.Metric]:
        device_labels = ["namespace", "model", "device", "gpu_product"]
        predicted = prometheus_core.GaugeMetricFamily(
            "kquant_plan_predicted_bytes", "Bytes the planner predicted per device (weights, KV, compute).",
            labels=device_labels)
        measured = prometheus_core.GaugeMetricFamily(
            "kquant_plan_measured_bytes", "Bytes llama-server allocated per device, from its startup log.",
            labels=device_labels)
        error = prometheus_core.GaugeMetricFamily(
            "kquant_plan_error_ratio", "(measured - predicted) / predicted per device.", labels=device_labels)
        layers = prometheus_core.GaugeMetricFamily(
            "kquant_plan_layers", "Layers the plan put on GPUs (kind=planned) and llama.cpp offloaded "
            "(kind=offloaded).", labels=["namespace", "model", "kind"])
        verified = prometheus_core.GaugeMetricFamily(
            "kquant_plan_verified", "1 when the served pod held to the plan, 0 when not.",
            labels=["namespace", "model"])
        for body in self.bodies():
            meta = body.get("metadata") or {}
            raw = ((body.get("status") or {}).get("serving") or {}).get("planCheck")
            if not raw:
                continue
            try:
                found = api.PlanCheck.model_validate(raw)
            except pydantic.ValidationError:
                continue  # a status an older operator wrote: nothing to export
            key = [str(meta.get("namespace") or ""), str(meta.get("name") or "")]
            product = found.gpu_product or ""
            for d in found.devices or []:
                labels = [*key, d.device, product]
                predicted.add_metric(labels, d.predicted_bytes)
                if d.measured_bytes is not None:
                    measured.add_metric(labels, d.measured_bytes)
                if d.error_ratio is not None:
                    error.add_metric(labels, d.error_ratio)
            if found.planned_layers is not None:
                layers.add_metric([*key, "planned"], found.planned_layers)
            if found.offloaded_layers is not None and found.verified is not None:
                layers.add_metric([*key, "offloaded"], found.offloaded_layers)
            if found.verified is not None:
                verified.add_metric(key, 1.0 if found.verified else 0.0)
        yield from (predicted, measured, error, layers, verified)
