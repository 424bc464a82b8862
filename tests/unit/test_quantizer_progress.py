"""Progress lines, throttling and the ConfigMap sink (with a recording patcher: pure logic)."""

from __future__ import annotations

import logging

import pytest
from kquant.quantizer import progress, report


def test_render() -> None:
    assert progress.ProgressLine("quantizing", 0.634, "q4km", 2, 5).render() == "q4km 2/5 quantizing 63%"
    assert progress.ProgressLine("fetching", 1.0).render() == "fetching 100%"


def test_throttle() -> None:
    now = [0.0]
    t = progress.Throttle(2.0, lambda: now[0])
    assert t.allow()
    now[0] = 1.0
    assert not t.allow()
    assert t.allow(force=True)
    now[0] = 3.5
    assert t.allow()


def test_configmap_sink_throttles_progress_but_always_writes_the_report() -> None:
    now = [0.0]
    sent: list[dict[str, str]] = []
    sink = progress.ConfigMapSink(sent.append, interval=2.0, clock=lambda: now[0])
    for i in range(10):
        now[0] = i * 0.1
        sink.progress(progress.ProgressLine("quantizing", i / 10, "q4km", 1, 1))
    assert [d["progress"] for d in sent] == ["q4km 1/1 quantizing 0%"]
    sink.progress(progress.ProgressLine("quantizing", 1.0, "q4km", 1, 1))
    assert sent[-1] == {"progress": "q4km 1/1 quantizing 100%"}
    build = report.BuildReport(status=report.BuildStatus.FAILED, reason="disk full", quantizer_version="0")
    sink.report(build)
    assert sent[-1]["progress"] == "failed: disk full"
    assert '"status": "Failed"' in sent[-1]["report"]


def test_configmap_sink_lets_a_new_step_through_inside_the_throttle_interval() -> None:
    now = [0.0]
    sent: list[dict[str, str]] = []
    sink = progress.ConfigMapSink(sent.append, interval=2.0, clock=lambda: now[0])
    sink.progress(progress.ProgressLine("downloading", 0.5, "q8", 1, 2))
    now[0] = 0.5
    sink.progress(progress.ProgressLine("downloading", 0.7, "q8", 1, 2))  # throttled
    now[0] = 0.6
    sink.progress(progress.ProgressLine("converting", 0.0, "q8", 1, 2))  # a new step: sent at once
    assert [d["progress"] for d in sent] == ["q8 1/2 downloading 50%", "q8 1/2 converting 0%"]


def test_configmap_errors_do_not_stop_the_build(caplog: pytest.LogCaptureFixture) -> None:
    tried: list[dict[str, str]] = []

    def broken(data: dict[str, str]) -> None:
        tried.append(data)
        raise ConnectionError("api server down")

    slept: list[float] = []
    sink = progress.ConfigMapSink(broken, sleep=slept.append)
    with caplog.at_level(logging.WARNING):
        sink.progress(progress.ProgressLine("fetching", 0.0))
        sink.progress(progress.ProgressLine("converting", 0.0))
        sink.report(report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0"))
    # No exception reached the build, a failed write did not stop the next ones, and each failure was logged;
    # progress is tried once, the report (the build's result) with a bounded backoff.
    attempts = progress.ConfigMapSink.REPORT_ATTEMPTS
    assert [d["progress"] for d in tried] == ["fetching 0%", "converting 0%", *["done"] * attempts]
    assert '"status": "Succeeded"' in tried[-1]["report"]
    assert slept == [1.0, 2.0, 4.0, 8.0, 16.0]
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert failures[:2] == ["could not update the result ConfigMap: api server down"] * 2
    assert failures[-1] == "could not update the result ConfigMap: api server down"
    assert any(r.levelno == logging.ERROR and "ReportMissing" in r.getMessage() for r in caplog.records)


def test_the_report_survives_a_refused_write() -> None:
    """One refused write (an API server restarting) must not lose the build's result."""
    sent: list[dict[str, str]] = []
    refusals = [ConnectionError("connection refused")]

    def flaky(data: dict[str, str]) -> None:
        if "report" in data and refusals:
            raise refusals.pop()
        sent.append(data)

    slept: list[float] = []
    sink = progress.ConfigMapSink(flaky, sleep=slept.append)
    sink.report(report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0"))
    assert len(sent) == 1 and '"status": "Succeeded"' in sent[0]["report"]
    assert slept == [1.0]
