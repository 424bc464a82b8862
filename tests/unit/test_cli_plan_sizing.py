"""``kquant plan MANIFEST --hub-files --hub-config``: the build sizing beside the serving plan, offline."""

from __future__ import annotations

import json
import pathlib

import yaml
from kquant.operator import cli
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import plan as plan_cmd
from kquant.quantizer import sizing
from typer.testing import CliRunner

REPO = pathlib.Path(__file__).resolve().parents[2]
R1 = REPO / "examples/02-deepseek-r1-dynamic/quantizedmodel.yaml"
R1_HUB = REPO / "examples/sizing/deepseek-r1"
runner = CliRunner()


def test_plan_prints_the_build_sizing() -> None:
    args = ["plan", str(R1), "--gpu", "80GiB", "--hub-files", str(R1_HUB / "files.json"),
            "--hub-config", str(R1_HUB / "config.json")]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    qm = api.QuantizedModel.model_validate(yaml.safe_load(R1.read_text()))
    expected, gpus = plan_cmd.build_sizing(qm, R1_HUB / "files.json", R1_HUB / "config.json", 80 * 2**30)
    for line in expected.lines():
        assert line in result.output
    assert gpus.from_spec and "build GPUs          1 GPU(s), as spec.quantizer.gpus says" in result.output
    # the manifest's 16 CPUs are the threads; the serving plan follows the sizing
    assert "cpu request         16 (threads 16)" in result.output
    assert "llama-server" in result.output.split("activeDeadline")[1]


def test_plan_json_carries_the_build() -> None:
    args = ["plan", str(R1), "--gpu", "80GiB", "--json", "--hub-files", str(R1_HUB / "files.json"),
            "--hub-config", str(R1_HUB / "config.json")]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    build = json.loads(result.output)["build"]
    files = sizing.listing_from_json(json.loads((R1_HUB / "files.json").read_text()))
    # allowPatterns *.json, *.safetensors: every listed file but the repo's code (*.py)
    fetched = [f for f in files if f.name.endswith((".json", ".safetensors"))]
    assert len(fetched) < len(files)
    assert build["source_files"] == len(fetched) and build["claim"].endswith("Gi")
    assert build["threads"] == build["cpus"] == 16


def test_hub_config_without_files_is_refused() -> None:
    result = runner.invoke(cli.app, ["plan", str(R1), "--gpu", "80GiB", "--hub-config", str(R1_HUB / "config.json")])
    assert result.exit_code == 1 and "--hub-config needs --hub-files" in result.output


def test_plan_prints_the_build_gpus_the_planner_picks(tmp_path: pathlib.Path) -> None:
    """Without spec.quantizer.gpus the build pod's GPUs are planned: R1's 16-bit reference (1250 GiB)
    cannot fit 8 x 80 GiB, so all 8 for a partial offload; its Q8_0 reference neither; 70B fits 2."""
    body = yaml.safe_load(R1.read_text())
    del body["spec"]["quantizer"]["gpus"]
    manifest = tmp_path / "r1.yaml"
    manifest.write_text(yaml.safe_dump(body))
    args = ["plan", str(manifest), "--gpu", "80GiB", "--hub-files", str(R1_HUB / "files.json"),
            "--hub-config", str(R1_HUB / "config.json")]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    planned = "build GPUs          8 x GPU (80 GiB each) for calibration and evaluation: a partial offload"
    assert planned in result.output
    qm = api.QuantizedModel.model_validate(body)
    found, gpus = plan_cmd.build_sizing(qm, R1_HUB / "files.json", R1_HUB / "config.json", 80 * 2**30)
    assert found.gpus == gpus.count == 8 and not gpus.full_offload
    assert 1200 * 2**30 < gpus.reference_bytes < 1300 * 2**30
    l70 = REPO / "examples/sizing/llama-3.1-70b"
    _, gpus = plan_cmd.build_sizing(qm, l70 / "files.json", l70 / "config.json", 80 * 2**30)
    assert gpus.count == 2 and gpus.full_offload
    _, none = plan_cmd.build_sizing(qm, l70 / "files.json", l70 / "config.json", None)
    assert none.count == 0
