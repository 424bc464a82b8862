"""Which failures end the build Job at once (exit ``PERMANENT``) and which keep its retries.

The build Job's podFailurePolicy fails the Job on ``report.NO_RETRY_EXIT_CODES``; a wrong mapping
here either burns backoffLimit pods on a full claim or gives up on a hub that blinked."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import httpx2  # huggingface_hub 2.x builds its errors on httpx2 responses
import pytest
from huggingface_hub import errors
from kquant.quantizer import cli, fetch, pipeline, recipes, report, settings, space


def _hub_error(status: int) -> errors.HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("GET", "http://hub.invalid/api/models/a/b"))
    return errors.HfHubHTTPError(f"HTTP {status}", response=response)


HUB = settings.HuggingFaceSource(repo="a/b", revision="main")


@pytest.mark.parametrize(("exc", "permanent"), [
    (space.NoSpaceError("storage claim x is full"), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (settings.SpecError("variants[0].type is Q9"), True),
    (recipes.RecipeError("no such tensor"), True),
    (pipeline.BuildError("source.local.path /m does not exist"), True),
    (pipeline.BuildError("calibration failed: llama-imatrix exited -9", permanent=False), False),
    (fetch.FetchError("allowPatterns match none of the files"), True),
    (fetch.FetchError("x.safetensors is missing after the download", permanent=False), False),
    (OSError(errno.EIO, "Input/output error"), False),
    (RuntimeError("a bug"), False),
])  # fmt: skip
def test_only_what_a_rerun_meets_again_is_permanent(exc: BaseException, permanent: bool) -> None:
    assert pipeline.is_permanent(exc) is permanent


@pytest.mark.parametrize(("status", "permanent"), [(404, True), (401, True), (403, True), (408, False),
                                                   (429, False), (500, False), (502, False), (503, False)])
def test_a_hub_5xx_or_throttling_keeps_the_retries_a_4xx_does_not(status: int, permanent: bool) -> None:
    translated = fetch._translate(_hub_error(status), HUB, "http://hub.invalid")
    assert f"HTTP {status}" in str(translated)
    assert translated.permanent is permanent and pipeline.is_permanent(translated) is permanent


def test_a_repository_that_does_not_exist_is_permanent_a_broken_connection_is_not() -> None:
    response = httpx2.Response(404, request=httpx2.Request("GET", "http://hub.invalid/api/models/a/b"))
    missing = fetch._translate(errors.RepositoryNotFoundError("404", response=response), HUB, "http://hub.invalid")
    assert "was not found" in str(missing) and missing.permanent
    cut = fetch._translate(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), HUB, "http://hub.invalid")
    assert "failed: ConnectionRefusedError" in str(cut) and not cut.permanent
    # What hf_hub_download raises when the hub cannot be reached and nothing is cached: an
    # EntryNotFoundError by class, the network by meaning.
    offline = fetch._translate(errors.LocalEntryNotFoundError("check your connection"), HUB, "http://hub.invalid")
    assert not offline.permanent and not pipeline.is_permanent(offline)


def _spec(tmp_path: Path, source: dict[str, object]) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"source": source, "variants": [{"name": "q8", "type": "Q8_0"}],
                                "storageRoot": str(tmp_path / "models")}))
    return path


def test_the_cli_exits_permanent_for_a_source_that_is_not_there(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"local": {"path": str(tmp_path / "nowhere")}})
    out = tmp_path / "report.json"
    assert cli.main(["run", "--spec", str(spec), "--report", str(out)]) == report.ExitCode.PERMANENT
    assert "does not exist" in (report.BuildReport.model_validate_json(out.read_text()).reason or "")


def test_the_cli_exits_failed_and_keeps_the_retries_when_the_hub_cannot_be_reached(tmp_path: Path) -> None:
    """A port nothing listens on: connection refused, as when the hub or a proxy is down."""
    spec = _spec(tmp_path, {"huggingface": {"repo": "a/b", "revision": "main", "endpoint": "http://127.0.0.1:9"}})
    out = tmp_path / "report.json"
    assert cli.main(["run", "--spec", str(spec), "--report", str(out)]) == report.ExitCode.FAILED
    assert report.BuildReport.model_validate_json(out.read_text()).status is report.BuildStatus.FAILED


def test_usage_and_permanent_are_the_codes_the_job_does_not_retry() -> None:
    assert set(report.NO_RETRY_EXIT_CODES) == {cli.EXIT_USAGE, cli.EXIT_PERMANENT}
    assert cli.EXIT_FAILED not in report.NO_RETRY_EXIT_CODES
