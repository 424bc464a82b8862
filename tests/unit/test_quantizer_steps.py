"""Resumable steps: skipped only when outputs exist and the stamp matches the inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from kquant.quantizer import steps


def make(tmp_path: Path, calls: list[str], inputs: dict[str, object], *, fail: bool = False) -> steps.Step:
    out = tmp_path / "out.txt"

    def run(progress: steps.Progress) -> None:
        calls.append("run")
        progress(0.5)
        if fail:
            out.write_text("half")
            raise RuntimeError("boom")
        out.write_text("done")

    return steps.Step("write", steps.StepKind.CONVERT, inputs, (out,), run)


def test_skip_when_fresh_rerun_when_inputs_change(tmp_path: Path) -> None:
    stamps = steps.StampStore(tmp_path / "stamps")
    calls: list[str] = []
    seen: list[float] = []
    first = steps.run_step(make(tmp_path, calls, {"a": 1}), stamps, lambda s, f: seen.append(f))
    assert not first.skipped and calls == ["run"] and seen == [0.0, 0.5, 1.0]
    again = steps.run_step(make(tmp_path, calls, {"a": 1}), stamps)
    assert again.skipped and calls == ["run"]
    steps.run_step(make(tmp_path, calls, {"a": 2}), stamps)
    assert calls == ["run", "run"]


def test_missing_output_or_failed_run_is_not_trusted(tmp_path: Path) -> None:
    stamps = steps.StampStore(tmp_path / "stamps")
    calls: list[str] = []
    step = make(tmp_path, calls, {"a": 1})
    steps.run_step(step, stamps)
    (tmp_path / "out.txt").unlink()
    steps.run_step(step, stamps)
    assert calls == ["run", "run"]
    # a step that dies after writing part of its output leaves no stamp: the next run redoes it
    with pytest.raises(RuntimeError):
        steps.run_step(make(tmp_path, calls, {"a": 3}, fail=True), stamps)
    assert stamps.read("write") is None
    assert not steps.is_fresh(make(tmp_path, calls, {"a": 3}), stamps)


def test_step_that_forgets_its_output_fails(tmp_path: Path) -> None:
    step = steps.Step("x", steps.StepKind.FETCH, {}, (tmp_path / "never",), lambda p: None)
    with pytest.raises(RuntimeError, match="did not write"):
        steps.run_step(step, steps.StampStore(tmp_path))


def test_digest_is_order_independent() -> None:
    assert steps.inputs_digest({"a": 1, "b": [1, 2]}) == steps.inputs_digest({"b": [1, 2], "a": 1})
    assert steps.inputs_digest({"a": 1}) != steps.inputs_digest({"a": 2})
