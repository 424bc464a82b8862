"""The fetch step of a ``modelscope`` source, through the real ModelScope client, against a stand-in.

``tests/modelscope_server.py`` answers the ``/api/v1`` calls that ``modelscope_hub`` (the client
``modelscope`` 1.40 delegates to) makes, serving SmolLM2's Hugging Face folder. The quantizer CLI
runs as the build Job runs it: a subprocess with the token in ``MODELSCOPE_API_TOKEN``. One build
goes all the way (fetch, llama.cpp's converter, importance matrix, Q8_0, evaluation); the rest stop
at the fetch: a repository that does not exist (exit 3, a reason naming the field), a private
one (the token reaches the hub as a bearer header and nothing else), a dropped connection (the
client resumes with a Range request, in the same call and in the Job's next pod), bytes that
fail their sha256 (retryable), names that escape the folder, and the sizing listing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures import fake_tokens, smollm2
from kquant.quantizer import fetch, fetch_modelscope, settings
from kquant.quantizer.report import ExitCode
from modelscope_server import FakeModelScope

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRIVATE = "acme/smollm2-private"
HOSTILE = "attacker/escape"
TOKEN = fake_tokens.hub_token()


@pytest.fixture(scope="module")
def ms() -> Iterator[FakeModelScope]:
    folder = smollm2.hf_dir()
    with FakeModelScope() as server:
        server.add_repo(REPO, folder, revisions=("master", "v1.0"))
        server.add_repo(PRIVATE, folder, token=TOKEN)
        server.add_repo(HOSTILE, folder, extra_names=("../../outside.json",))
        yield server


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    report: dict[str, Any]


def run_cli(tmp: Path, command: str, spec: dict[str, Any], token: str | None = None) -> Run:
    """``kquant-quantize COMMAND`` as the Job runs it, the token (if any) in its environment."""
    path = tmp / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    report_path = path.with_suffix(".report.json")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "TQDM_DISABLE": "1"}
    env.pop(settings.MODELSCOPE_TOKEN_ENV, None)
    if token is not None:
        env[settings.MODELSCOPE_TOKEN_ENV] = token
    argv = [sys.executable, "-P", "-m", "kquant.quantizer.cli", command, "--spec", str(path), "--report"]
    argv.append(str(report_path))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=900)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return Run(done.returncode, done.stdout + done.stderr, report)


def spec_for(ms: FakeModelScope, root: Path, **source: Any) -> dict[str, Any]:
    return {
        "source": {"modelscope": {"repo": REPO, "endpoint": ms.url, **source}},
        "calibration": {"chunks": 0},  # Q8_0 needs no importance matrix
        "convertType": "f16",
        "variants": [{"name": "q8", "type": "Q8_0"}],
        "evaluation": {"chunks": 1, "contextSize": 64},
        "storageRoot": str(root / "store"),
        "workDir": str(root / "work"),
        "threads": 2,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_as_fixture(dest: Path, names: list[str]) -> None:
    folder = smollm2.hf_dir()
    for name in names:
        assert _sha256(dest / name) == _sha256(folder / name), name


def test_a_modelscope_source_builds_a_variant(ms: FakeModelScope, tmp_path: Path) -> None:
    """Fetched with the ModelScope client, then converted, calibrated, quantized and evaluated."""
    run = run_cli(tmp_path, "run", spec_for(ms, tmp_path))
    assert run.rc == ExitCode.OK, run.out[-3000:]
    assert run.report["status"] == "Succeeded"
    assert run.report["sourceRevision"] == "master"
    variant = run.report["variants"][0]
    assert variant["name"] == "q8" and variant["sizeBytes"] > 100 * 2**20
    downloads = [s.query["FilePath"] for s in ms.seen if s.path.endswith("/repo") and s.method == "GET"]
    assert "model.safetensors" in downloads and "config.json" in downloads
    manifest = next((tmp_path / "work").rglob(fetch.MANIFEST))  # the fetch step's folder
    _same_as_fixture(manifest.parent, ["model.safetensors", "tokenizer.json", "config.json"])


def test_a_repository_that_does_not_exist_fails_at_once_naming_the_field(ms: FakeModelScope, tmp_path: Path) -> None:
    run = run_cli(tmp_path, "run", spec_for(ms, tmp_path, repo="nobody/no-such-model"))
    assert run.rc == ExitCode.PERMANENT, run.out[-3000:]
    assert "spec.source.modelscope.repo 'nobody/no-such-model' was not found" in run.report["reason"]
    assert run.report["failedStep"] == "fetch"
    missing_revision = run_cli(tmp_path, "run", spec_for(ms, tmp_path, revision="v9.9"))
    assert missing_revision.rc == ExitCode.PERMANENT
    assert "spec.source.modelscope.revision 'v9.9' does not exist" in missing_revision.report["reason"]


def test_a_private_repository_takes_the_token_as_a_bearer_header_only(ms: FakeModelScope, tmp_path: Path) -> None:
    source = settings.ModelScopeSource(repo=PRIVATE, endpoint=ms.url, allow_patterns=("*.json",))
    with pytest.raises(fetch.FetchError) as refused:
        fetch_modelscope.fetch_source(source, tmp_path / "anonymous", env={})
    assert refused.value.permanent and "spec.source.modelscope.tokenSecretRef" in str(refused.value)

    start = len(ms.seen)
    run = run_cli(tmp_path, "size", spec_for(ms, tmp_path, repo=PRIVATE), token=TOKEN + "\n")
    assert run.rc == ExitCode.OK, run.out[-3000:]
    listed = {f["name"] for f in run.report["files"]}
    assert {"model.safetensors", "config.json"} <= listed
    assert run.report["config"]["num_hidden_layers"] == 30
    assert {s.authorization for s in ms.seen[start:] if s.path.startswith(f"/api/v1/models/{PRIVATE}")} == {
        f"Bearer {TOKEN}"
    }
    assert TOKEN not in run.out and TOKEN not in json.dumps(run.report)


def test_a_dropped_connection_is_resumed_by_the_client(ms: FakeModelScope, tmp_path: Path) -> None:
    name = "model.safetensors"
    ms.cut(name, after_bytes=40 * 2**20)
    before = len(ms.downloads(name))
    fractions: list[float] = []
    source = settings.ModelScopeSource(repo=REPO, endpoint=ms.url, allow_patterns=("*.safetensors", "config.json"))
    result = fetch_modelscope.fetch_source(source, tmp_path / "dl", env={}, progress=fractions.append)
    tries = ms.downloads(name)[before:]
    assert len(tries) == 2 and tries[0].range is None and tries[1].range == f"bytes={40 * 2**20}-"
    _same_as_fixture(tmp_path / "dl", [name, "config.json"])
    assert [f.name for f in result.files] == ["config.json", name]
    assert fractions[-1] == 1.0 and max(fractions) <= 1.0
    assert fetch.read_manifest(tmp_path / "dl") == result


FETCH_ONCE = """
import json, pathlib, sys
from kquant.quantizer import fetch, fetch_modelscope, settings
source = settings.ModelScopeSource.model_validate_json(sys.argv[1])
try:
    fetch_modelscope.fetch_source(source, pathlib.Path(sys.argv[2]), env={})
except fetch.FetchError as exc:
    print(json.dumps({"permanent": exc.permanent, "reason": str(exc)}))
    sys.exit(1)
"""


def test_the_next_pod_resumes_where_a_failed_one_stopped(ms: FakeModelScope, tmp_path: Path) -> None:
    """A pod whose download broke off (here: the client told to retry nothing) leaves the client's
    ``.incomplete`` file on the claim; the Job's next pod asks only for the rest, with a Range."""
    name, cut = "model.safetensors", 96 * 2**20
    source = settings.ModelScopeSource(repo=REPO, endpoint=ms.url, allow_patterns=("*.safetensors",))
    dest = tmp_path / "dl"
    ms.cut(name, after_bytes=cut)
    env = {**os.environ, "PYTHONSAFEPATH": "1", "TQDM_DISABLE": "1", "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0"}
    first = subprocess.run([sys.executable, "-P", "-c", FETCH_ONCE, source.model_dump_json(), str(dest)],
                           capture_output=True, text=True, env=env, check=False, timeout=300)  # fmt: skip
    assert first.returncode == 1, first.stdout + first.stderr[-2000:]
    failure = json.loads(first.stdout.strip().splitlines()[-1])
    assert failure["permanent"] is False, failure  # the Job runs another pod
    assert (dest / f"{name}.incomplete").stat().st_size == cut
    assert not (dest / name).exists() and not (dest / fetch.MANIFEST).exists()

    before = len(ms.downloads(name))
    fetch_modelscope.fetch_source(source, dest, env={})
    [resumed] = ms.downloads(name)[before:]
    assert resumed.range == f"bytes={cut}-"
    _same_as_fixture(dest, [name])


def test_bytes_that_fail_their_sha256_are_not_kept_and_the_failure_is_retryable(
    ms: FakeModelScope, tmp_path: Path
) -> None:
    ms.corrupt("config.json")
    try:
        source = settings.ModelScopeSource(repo=REPO, endpoint=ms.url, allow_patterns=("config.json",))
        with pytest.raises(fetch.FetchError) as failed:
            fetch_modelscope.fetch_source(source, tmp_path / "dl", env={})
    finally:
        ms.corrupt("config.json", on=False)
    assert not failed.value.permanent, failed.value
    assert not (tmp_path / "dl" / "config.json").exists()
    assert not (tmp_path / "dl" / fetch.MANIFEST).exists()
    source = settings.ModelScopeSource(repo=REPO, endpoint=ms.url, allow_patterns=("config.json",))
    fetch_modelscope.fetch_source(source, tmp_path / "dl", env={})  # the rerun the Job makes
    _same_as_fixture(tmp_path / "dl", ["config.json"])


def test_a_listed_name_that_escapes_the_folder_stops_the_fetch_before_any_write(
    ms: FakeModelScope, tmp_path: Path
) -> None:
    start = len(ms.seen)
    source = settings.ModelScopeSource(repo=HOSTILE, endpoint=ms.url)
    with pytest.raises(fetch.FetchError, match=r"'\.\./\.\./outside\.json', which has '\.\.'") as refused:
        fetch_modelscope.fetch_source(source, tmp_path / "dl", env={})
    assert refused.value.permanent
    assert not any(s.path.endswith("/repo") for s in ms.seen[start:])  # no file was requested
    assert not (tmp_path / "outside.json").exists()
