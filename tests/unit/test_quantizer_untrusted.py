"""What the converter subprocess is started with: no token, no network, the remote-code guard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures import fake_tokens
from kquant.quantizer import cli, convert, redact, untrusted


def test_converter_environment_has_no_token_and_no_network() -> None:
    base = {
        "HF_TOKEN": "hf_secret",
        "HUGGING_FACE_HUB_TOKEN": "hf_old",
        "HF_API_TOKEN": "hf_older",
        "PATH": "/usr/bin",
        "PYTHONSAFEPATH": "1",
    }
    env = convert.converter_env(base)
    assert not any(name in env for name in untrusted.TOKEN_ENV_NAMES)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"] == "/usr/bin" and "PYTHONSAFEPATH" not in env
    assert "HF_TOKEN" in base  # the caller's mapping is left as it was


def test_converter_runs_under_the_guard() -> None:
    cmd = convert.converter_command("/venv/bin/python", Path("/src/convert_hf_to_gguf.py"), ["/m", "--outtype", "f16"])
    assert cmd == ["/venv/bin/python", "-m", "kquant.quantizer.untrusted", "/src/convert_hf_to_gguf.py",
                   "/m", "--outtype", "f16"]  # fmt: skip


def test_the_cli_takes_the_token_out_of_its_environment_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any step runs, the token is gone from os.environ: only the fetch step is handed it."""
    token = fake_tokens.hub_token()
    monkeypatch.setenv("HF_TOKEN", token + "\n")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_older")
    bad = tmp_path / "spec.yaml"
    bad.write_text("- not a mapping\n")
    assert cli.main(["run", "--spec", str(bad)]) == cli.EXIT_USAGE
    assert "HF_TOKEN" not in os.environ and "HUGGING_FACE_HUB_TOKEN" not in os.environ
    assert token not in redact.redact(f"header {token}")
    redact.forget_all()
