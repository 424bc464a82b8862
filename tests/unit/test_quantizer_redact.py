"""Secrets out of every message that leaves the build pod: the one redaction function and its sinks."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from fixtures import fake_tokens
from kquant.quantizer import fetch, progress, redact, report

TOKEN = fake_tokens.hub_token()


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    redact.forget_all()
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)
    redact.forget_all()


def test_token_shapes_are_masked_without_being_told() -> None:
    text = (
        f"Illegal header value b'Bearer {TOKEN}\\n'; headers={{'authorization': 'Bearer abc.def-ghi'}}; "
        "Authorization: Basic dXNlcjpwYXNz; org api_org_ABCDEFGHIJKLMNOP"
    )
    out = redact.redact(text)
    for secret in (TOKEN, "abc.def-ghi", "dXNlcjpwYXNz", "api_org_ABCDEFGHIJKLMNOP"):
        assert secret not in out
    assert "Illegal header value" in out and redact.MASK in out


def test_remembered_value_is_masked_in_every_form() -> None:
    """A token that looks like nothing in particular, from a Secret made with ``echo $T > f``."""
    redact.remember("s3cr3t-value-9\n")
    out = redact.redact("sent 's3cr3t-value-9\\n' and s3cr3t-value-9 again")
    assert "s3cr3t" not in out


def test_plain_messages_are_left_alone() -> None:
    text = "source.huggingface.repo 'a/b' was not found, or is private and HF_TOKEN has no access; the token in"
    assert redact.redact(text) == text


def test_take_token_strips_and_empties_the_environment() -> None:
    env = {"HF_TOKEN": TOKEN + "\n", "HUGGING_FACE_HUB_TOKEN": "old", "PATH": "/bin"}
    assert fetch.take_token(env) == TOKEN
    assert env == {"PATH": "/bin"}
    assert TOKEN not in redact.redact(f"header {TOKEN}\n")
    assert fetch.take_token({}) is None


def test_log_formatter_masks_messages_and_tracebacks() -> None:
    redact.remember("plain-secret-42")
    stream = io.StringIO()
    logger = logging.getLogger("test.redact")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    redact.install(logger)
    try:
        try:
            raise ValueError("header Bearer plain-secret-42 refused")
        except ValueError:
            logger.exception("fetch failed with %s", "plain-secret-42")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.startswith("ERROR fetch failed with [redacted]")  # the format string is kept
    assert "plain-secret-42" not in text and "ValueError" in text


def test_a_librarys_own_handler_that_does_not_propagate_writes_no_secret() -> None:
    """modelscope_hub and transformers add their own handler with propagate off: the root's
    formatter never sees their records, so the records are redacted where they are made."""
    redact.remember("plain-secret-42")
    redact.install(logging.getLogger("test.redact.root"))
    stream = io.StringIO()
    library = logging.getLogger("test.redact.library")
    handler = logging.StreamHandler(stream)  # added after install: no redacting formatter on it
    handler.setFormatter(logging.Formatter("%(message)s"))
    library.addHandler(handler)
    library.propagate = False
    try:
        library.warning("retrying with token %s", "plain-secret-42")
        try:
            raise ConnectionError(f"Authorization: Bearer {TOKEN} refused")
        except ConnectionError:
            library.exception("download failed")
        library.warning("%d files", "not a number")  # a broken call still reaches the handler
    finally:
        library.removeHandler(handler)
    text = stream.getvalue()
    assert "retrying with token [redacted]" in text and "ConnectionError" in text
    assert "plain-secret-42" not in text and TOKEN not in text


def test_configmap_sink_masks_what_it_writes() -> None:
    """The result ConfigMap feeds status, conditions and Events: its reason must be clean."""
    redact.remember("plain-secret-42")
    written: list[dict[str, str]] = []
    sink = progress.ConfigMapSink(written.append, interval=0)
    build = report.BuildReport(status=report.BuildStatus.FAILED, quantizer_version="0")
    build.reason = f"download failed: LocalProtocolError: Illegal header value b'Bearer {TOKEN}\\n' plain-secret-42"
    sink.report(build)
    assert written and all(TOKEN not in v and "plain-secret-42" not in v for d in written for v in d.values())
    assert written[-1]["progress"].startswith("failed: download failed")
