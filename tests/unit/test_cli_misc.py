"""``kquant`` entry point, ``kquant quantize``'s spec and progress sink, and the status view."""

from __future__ import annotations

import datetime
import io
import pathlib

import typer
import yaml
from kquant.operator import builds, cli
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import quantize, render
from kquant.quantizer import progress, report
from rich.console import Console

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOLLM2 = REPO / "examples/01-smollm2/quantizedmodel.yaml"


def _qm() -> api.QuantizedModel:
    return api.QuantizedModel.model_validate(yaml.safe_load(SMOLLM2.read_text()))


def test_main_returns_exit_codes_instead_of_raising() -> None:
    assert cli.main(["--help"]) == 0
    assert cli.main(["operator", "--no-such-flag"]) == 2
    assert cli.main(["plan", str(SMOLLM2), "--gpu", "lots"]) == 1


def test_operator_keeps_its_flags() -> None:
    # Parse only (the chart's Deployment and the e2e tests run the operator itself).
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    sub = group.get_command(group.make_context("kquant", ["operator"]), "operator")
    assert sub is not None
    params = sub.make_context("operator", ["-n", "a", "--namespace", "b", "--liveness",
                                           "http://0.0.0.0:8080/healthz", "--peering", "kquant", "-v"]).params
    assert params == {"namespace": ["a", "b"], "liveness": "http://0.0.0.0:8080/healthz", "peering": "kquant",
                      "verbose": True}  # fmt: skip


def test_local_spec_is_the_operators_spec_on_local_storage(tmp_path: pathlib.Path) -> None:
    qm = _qm()
    variant = qm.spec.variant("q4km")
    spec = quantize.local_spec(qm, variant, tmp_path)
    assert spec.storage_root == tmp_path
    operator_spec = builds.base_spec(qm, variant)
    assert spec.model_dump(exclude={"storage_root"}) == operator_spec.model_dump(exclude={"storage_root"})
    assert spec.result_config_map is None  # no cluster: progress goes to the terminal only


def test_rich_sink_draws_bars_and_the_result() -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    with quantize.RichSink(console) as sink:
        sink.progress(progress.ProgressLine("quantize", 0.5, "q4km", 1, 1))
        sink.progress(progress.ProgressLine("quantize", 1.0, "q4km", 1, 1))
        sink.report(report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="1", variants=[
            report.VariantReport(name="q4km", digest="d", type="Q4_K_M", recipe="uniform", path="/m/q4km.gguf",
                                 size_bytes=105_453_920, bits_per_weight=6.17, kl_divergence=0.187,
                                 gate_passed=True)]))  # fmt: skip
    text = out.getvalue()
    assert "build Succeeded" in text and "q4km" in text and "0.1870" in text and "passed" in text


def test_status_view_marks_the_served_variant() -> None:
    qm = _qm()
    now = datetime.datetime(2026, 11, 25, tzinfo=datetime.UTC)
    qm.status = api.QuantizedModelStatus(
        observed_generation=1, phase=api.Phase.READY, progress="2/2 variants built",
        conditions=[api.Condition(type="Ready", status=api.ConditionStatus.TRUE, reason="Serving",
                                  message="1/1 replicas ready", last_transition_time=now)],
        variants=[api.VariantStatus(name="q8", type="Q8_0", size_bytes=144_810_848, bits_per_weight=8.47,
                                    kl_divergence=0.014, perplexity=16.46, gate_passed=True),
                  api.VariantStatus(name="q4km", type="Q4_K_M", size_bytes=105_453_920, bits_per_weight=6.17,
                                    kl_divergence=0.187, perplexity=15.63, gate_passed=True)],
        serving=api.ServingStatus(variant="q4km", gpu_layers=0, endpoint="http://smollm2.ml.svc:8080/v1"),
    )  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=200).print(render.status_view(qm))
    text = out.getvalue()
    served = next(line for line in text.splitlines() if "q4km" in line and "Q4_K_M" in line)
    assert "* serving" in served and "0.1870" in served and "15.63" in served
    assert "phase: Ready" in text and "http://smollm2.ml.svc:8080/v1" in text and "1/1 replicas ready" in text
