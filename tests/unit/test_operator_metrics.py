"""The operator's metrics: names and values as Prometheus scrapes them. Pure, no server."""

from __future__ import annotations

from kquant.operator import config, metrics


def test_metrics_read_live_values_and_record_passes() -> None:
    m = metrics.Metrics()
    depth = [3]
    m.track(queue_depth=lambda: depth[0], models=lambda: 200)
    m.passes.labels(result="success").inc()
    m.pass_seconds.observe(0.02)
    m.queue_wait_seconds.observe(0.3)
    depth[0] = 7
    text = m.exposition()
    assert "kquant_workqueue_depth 7.0" in text
    assert "kquant_models 200.0" in text
    assert 'kquant_reconcile_total{result="success"} 1.0' in text
    assert 'kquant_reconcile_duration_seconds_bucket{le="0.025"} 1.0' in text
    assert 'kquant_workqueue_wait_seconds_bucket{le="0.25"} 0.0' in text


def test_two_operators_in_one_process_do_not_share_a_registry() -> None:
    first, second = metrics.Metrics(), metrics.Metrics()
    first.passes.labels(result="error").inc()
    assert 'kquant_reconcile_total{result="error"}' not in second.exposition()


def test_the_metrics_port_comes_from_the_chart_environment() -> None:
    assert config.OperatorConfig.from_environment({"KQUANT_METRICS_PORT": "9090"}).metrics_port == 9090
    assert config.OperatorConfig.from_environment({}).metrics_port is None



def test_plan_checks_of_the_watched_models_are_gauges() -> None:
    """Read from the models at scrape time: a model that goes takes its series with it."""
    check = {"plannedLayers": 31, "offloadedLayers": 20, "totalLayers": 31, "gpuProduct": "NVIDIA-L4",
             "verified": False, "devices": [
                 {"device": "GPU0", "predictedBytes": 1000, "measuredBytes": 1200, "errorRatio": 0.2},
                 {"device": "Host", "predictedBytes": 500}]}
    served = {"metadata": {"namespace": "ml", "name": "a"}, "status": {"serving": {"planCheck": check}}}
    bodies = [served, {"metadata": {"namespace": "ml", "name": "b"}, "status": {}}]
    m = metrics.Metrics()
    m.track(queue_depth=lambda: 0, models=lambda: len(bodies), bodies=lambda: bodies)
    text = m.exposition()
    gpu = 'device="GPU0",gpu_product="NVIDIA-L4",model="a",namespace="ml"'
    assert f"kquant_plan_predicted_bytes{{{gpu}}} 1000.0" in text
    assert f"kquant_plan_measured_bytes{{{gpu}}} 1200.0" in text
    assert f"kquant_plan_error_ratio{{{gpu}}} 0.2" in text
    assert 'kquant_plan_layers{kind="offloaded",model="a",namespace="ml"} 20.0' in text
    assert 'kquant_plan_verified{model="a",namespace="ml"} 0.0' in text
    assert 'model="b"' not in text
    bodies.pop(0)
    assert 'model="a"' not in m.exposition()
