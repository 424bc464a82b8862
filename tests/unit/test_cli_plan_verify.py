"""``kquant plan --verify``'s pure parts (llama-fit-params' rows, the table) and the margin it reports."""

from __future__ import annotations

import json
import pathlib

import yaml
from kquant.operator import cli
from kquant.operator.commands import verify
from kquant.operator.planner import memory
from typer.testing import CliRunner

MiB = memory.MiB
FACTS = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "server_logs" / "smollm2-facts.json"
# --fit-print on's stdout of the pinned llama-fit-params: SmolLM2-135M, -ngl 31, one RPC device
FIT_PRINT = "RPC0 92 45 97 \nHost 28 0 4 \n"


def test_fit_print_rows_by_device() -> None:
    assert verify.parse_rows(FIT_PRINT) == {"RPC0": (92, 45, 97), "Host": (28, 0, 4)}
    assert verify.parse_rows("llama_fit_params: printing estimated memory\n") == {}


def test_the_table_pairs_devices_and_says_which_are_missing() -> None:
    rows = (verify.Row("GPU0 (RPC0)", memory.DeviceBytes(92 * MiB, 45 * MiB, 97 * MiB), (92, 45, 97)),
            verify.Row("GPU1 (not found)", memory.DeviceBytes(10 * MiB), None),
            verify.Row("Host", memory.DeviceBytes(30 * MiB, 0, 4 * MiB), (28, 0, 4)))
    text = "\n".join(verify.lines(verify.Verification(rows, ("--n-gpu-layers", "31"))))
    assert "+0.0%" in text and "+6.2%" in text
    assert "no device for GPU1" in text
    assert "llama-fit-params --n-gpu-layers 31" in text
    assert rows[1].error_ratio is None


def test_kquant_plan_says_which_margin_it_used_and_where_from(tmp_path: pathlib.Path) -> None:
    manifest = tmp_path / "qm.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "kquant.dev/v1alpha1", "kind": "QuantizedModel", "metadata": {"name": "smollm2"},
        "spec": {"source": {"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
                 "variants": [{"name": "q4", "type": "Q4_1"}], "storage": {"pvc": {"size": "1Gi"}},
                 "serving": {"variant": "q4", "contextSize": 2048, "gpus": 1}}}))
    learned = tmp_path / "margins.yaml"
    learned.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"},
                                       "data": {"NVIDIA-L4": str(300 * MiB)}}))
    base = ["plan", str(manifest), "--gpu", "8GiB", "--facts", str(FACTS), "--json"]
    plain = CliRunner().invoke(cli.app, base)
    assert plain.exit_code == 0, plain.output
    assert "no learned margin" in json.loads(plain.output)["margin"]
    used = CliRunner().invoke(cli.app, [*base, "--margins", str(learned), "--gpu-product", "NVIDIA-L4"])
    assert used.exit_code == 0, used.output
    out = json.loads(used.output)
    assert out["margin"].endswith(f"learned margin 0.29 GiB for NVIDIA-L4 from {learned}")
    assert "learned margin 0.29 GiB" in out["kquant"]["explanation"]
    alone = CliRunner().invoke(cli.app, [*base, "--margins", str(learned)])
    assert alone.exit_code == 1 and "go together" in alone.output
