"""``kquant quantize`` builds a manifest's variant on this machine, as the operator's Job would.

The example manifest's SmolLM2 source is served by the fake hub (``HF_ENDPOINT`` semantics through
``spec.source.huggingface.endpoint``); conversion, calibration, quantization and evaluation run for
real in the CLI's process. The published file must land in the same digest folder that the
operator's build of the same manifest would use, so a workstation build and a cluster build of
one spec are interchangeable.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from fixtures import smollm2
from hub_server import FakeHub
from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
KQUANT = pathlib.Path(sys.executable).with_name("kquant")
HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKEN = "hf_workstation_token_never_printed"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, smollm2.hf_dir(), token=TOKEN)
        yield fake


def _manifest(tmp_path: pathlib.Path, hub: FakeHub) -> pathlib.Path:
    body = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    source = body["spec"]["source"]["huggingface"]
    source["endpoint"] = hub.url
    source["allowPatterns"] = ["*.json", "*.safetensors", "*.jinja"]
    body["spec"]["calibration"] = {"chunks": 2, "contextSize": 256}
    body["spec"]["evaluation"] |= {"chunks": 2, "contextSize": 256}
    path = tmp_path / "quantizedmodel.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _run(*args: str, token: str | None = TOKEN, home: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "COLUMNS": "200", "HF_HOME": str(home)}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([str(KQUANT), "quantize", *args], capture_output=True, text=True, env=env,
                          timeout=900, check=False)  # fmt: skip


def test_quantize_builds_into_the_operators_digest_folder(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    manifest = _manifest(tmp_path, hub)
    storage = tmp_path / "models"
    done = _run(str(manifest), "--variant", "q8", "--storage", str(storage), home=tmp_path / "hf")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "build Succeeded" in done.stdout and "q8" in done.stdout and "passed" in done.stdout
    assert TOKEN not in done.stdout + done.stderr

    qm = api.QuantizedModel.model_validate(yaml.safe_load(manifest.read_text()))
    (build,) = [b for b in builds.plan_builds(qm, "ml") if b.variant == "q8"]
    folder = storage / build.digest
    report = json.loads((folder / "report.json").read_text())
    assert report["name"] == "q8" and report["type"] == "Q8_0" and report["gatePassed"] is True
    assert (folder / pathlib.Path(report["path"]).name).is_file()


def test_quantize_refuses_an_unknown_variant(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    manifest = _manifest(tmp_path, hub)
    done = _run(str(manifest), "--variant", "q2", "--storage", str(tmp_path / "m"), home=tmp_path / "hf")
    assert done.returncode == 1
    assert "--variant is 'q2', but spec.variants has only q8, q4km" in done.stderr


def test_a_failed_build_exits_1_with_the_reason(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    manifest = _manifest(tmp_path, hub)
    done = _run(str(manifest), "--variant", "q8", "--storage", str(tmp_path / "m"), token=None, home=tmp_path / "hf")
    assert done.returncode == 1
    assert "build Failed" in done.stdout
