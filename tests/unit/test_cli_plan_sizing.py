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
    expected = plan_cmd.build_sizing(qm, R1_HUB / "files.json", R1_HUB / "config.json")
    for line in expected.lines():
        assert line in result.output
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
