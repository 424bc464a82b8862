"""The evaluation maths, checked against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from kquant.quantizer import evaluate, report, settings


def test_chunks_start_with_bos_and_have_context_length() -> None:
    chunks = evaluate.chunk_tokens(list(range(10)), context=4, max_chunks=10, bos=99)
    assert chunks == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert evaluate.chunk_tokens(list(range(10)), 5, 1, None) == [[0, 1, 2, 3, 4]]
    assert evaluate.chunk_tokens([1, 2, 3], 8, 4, 0) == [[0, 1, 2, 3]]  # short text: one short chunk
    assert evaluate.chunk_tokens([1], 8, 4, None) == []


def test_score_chunk_matches_definitions() -> None:
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=np.float32))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]], dtype=np.float32))
    s = evaluate.score_chunk(q, [1, 1], p)
    assert s.positions == 2
    assert s.nll == pytest.approx(-(math.log(0.5) + math.log(0.8)), rel=1e-5)
    kl_first = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert s.kl == pytest.approx(kl_first, abs=1e-6)
    assert s.agree == 1
    same = evaluate.score_chunk(p, [0, 1], p)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.agree == 2


def test_log_softmax_is_normalised() -> None:
    lp = evaluate.log_softmax(np.array([[1000.0, 1001.0, 999.0]], dtype=np.float32))
    assert np.exp(lp).sum() == pytest.approx(1.0, rel=1e-6)


def metrics(**kw: object) -> report.Metrics:
    base: dict[str, object] = {
        "tokens": 100,
        "perplexity": 10.5,
        "reference_perplexity": 10.0,
        "kl_divergence": 0.05,
        "top1_agreement": 0.9,
    }
    return report.Metrics.model_validate({**base, **kw})


def test_gate() -> None:
    ev = settings.Evaluation.model_validate(
        {"maxKLDivergence": 0.1, "maxPerplexityIncrease": "10%", "minTop1Agreement": 0.8}
    )
    assert evaluate.gate(metrics(), ev).passed
    failed = evaluate.gate(metrics(kl_divergence=0.2, perplexity=12.0, top1_agreement=0.5), ev)
    assert not failed.passed and len(failed.reasons) == 3
    assert "KL divergence 0.2000 > maxKLDivergence 0.1" in failed.reasons[0]
    no_ref = evaluate.gate(metrics(kl_divergence=None, reference_perplexity=None, top1_agreement=None), ev)
    assert not no_ref.passed and all("no 16-bit reference" in r for r in no_ref.reasons)
    assert evaluate.gate(metrics(kl_divergence=None), settings.Evaluation()).passed
    smoke = report.SmokeResult(prompt="p", text="", prompt_tokens=3, bos_count=2, passed=False)
    assert "2 BOS" in evaluate.gate(metrics(smoke=smoke), settings.Evaluation()).reasons[0]


def test_leading_bos() -> None:
    assert evaluate.leading_bos([1, 1, 5], 1) == 2
    assert evaluate.leading_bos([5, 1], 1) == 0


def test_render_chat_template() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert evaluate.render_chat(template, "hi", "<s>", "</s>") == "<s><|user|>hi<|assistant|>"


def test_builtin_texts_are_shipped() -> None:
    assert len(evaluate.builtin_text("heldout.txt").split()) > 2000
    assert len(evaluate.builtin_text("calibration.txt").split()) > 2000


def test_dataset_from_a_file(tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("some calibration text")
    assert evaluate.dataset_text(settings.DatasetKind.FILE, text, "calibration.txt") == "some calibration text"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(evaluate.EvaluateError, match="is empty"):
        evaluate.dataset_text(settings.DatasetKind.FILE, tmp_path / "empty.txt", "calibration.txt")
    with pytest.raises(evaluate.EvaluateError, match="cannot read dataset file"):
        evaluate.dataset_text(settings.DatasetKind.FILE, tmp_path / "missing.txt", "calibration.txt")
