"""The Argo CD health check over status objects that the operator's own status code produces."""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

import yaml
from argocd_health import health
from kquant.operator import builds, findings, status
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report

REPO = pathlib.Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 11, 25, tzinfo=datetime.UTC)


def _qm(generation: int = 1) -> api.QuantizedModel:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="1", generation=generation)
    return api.QuantizedModel.model_validate(body)


def _state(variant: str, phase: findings.BuildPhase, gate: bool = True) -> findings.BuildState:
    build = builds.Build(model="smollm2", variant=variant, digest="f" * 16, spec=None)  # type: ignore[arg-type]
    rep = report.VariantReport(name=variant, digest="f" * 16, type="Q8_0", recipe="uniform",
                               path="/x", gate_passed=gate) if phase is findings.BuildPhase.SUCCEEDED else None
    return findings.BuildState(build, phase, progress="q8 quantizing 50%", reason="hub said 404", report=rep)


def _object(qm: api.QuantizedModel, st: api.QuantizedModelStatus, generation: int | None = None) -> dict[str, Any]:
    body = qm.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = st.to_patch()
    if generation is not None:
        body["metadata"]["generation"] = generation
    return body


def test_no_status_yet_is_progressing() -> None:
    body = _qm().model_dump(mode="json", by_alias=True, exclude_none=True)
    assert health(body)["status"] == "Progressing"


def test_building_is_progressing_with_the_progress_line() -> None:
    qm = _qm()
    st = status.compute(qm, [_state("q8", findings.BuildPhase.RUNNING), _state("q4km", findings.BuildPhase.QUEUED)],
                        None, NOW)
    result = health(_object(qm, st))
    assert result == {"status": "Progressing", "message": "q8 1/2 quantizing 50%"}


def test_ready_is_healthy_and_a_new_generation_is_progressing_again() -> None:
    qm = _qm()
    done = [_state("q8", findings.BuildPhase.SUCCEEDED), _state("q4km", findings.BuildPhase.SUCCEEDED)]
    st = status.compute(qm, done, findings.ServingState(True, findings.Reason.SERVING, "served at http://x"), NOW)
    assert health(_object(qm, st))["status"] == "Healthy"
    assert health(_object(qm, st, generation=2))["status"] == "Progressing"


def test_failures_that_need_a_person_are_degraded() -> None:
    qm = _qm()
    failed = status.compute(qm, [_state("q8", findings.BuildPhase.FAILED), _state("q4km", findings.BuildPhase.QUEUED)],
                            None, NOW)
    result = health(_object(qm, failed))
    assert result["status"] == "Degraded" and "BuildFailed" in result["message"] and "hub said 404" in result["message"]
    done = [_state("q8", findings.BuildPhase.SUCCEEDED), _state("q4km", findings.BuildPhase.SUCCEEDED, gate=False)]
    failed_gate = findings.ServingState(False, findings.Reason.GATE_FAILED, "q4km failed its gate")
    gated = status.compute(qm, done, failed_gate, NOW)
    assert health(_object(qm, gated))["status"] == "Degraded"
    rolling = status.compute(qm, done, findings.ServingState(False, findings.Reason.ROLLING_OUT, "rolling out"), NOW)
    assert health(_object(qm, rolling))["status"] == "Progressing"
