"""Pure rules of the build steps that must not grow with the model: GPU layers for evaluation,
the reference log-probabilities' size and its free-space check, llama.cpp tool arguments, and the
calibration windows (cut as llama-imatrix cuts them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kquant.quantizer import evaluate, imatrix, llama_tools, settings, space

GiB = 2**30


def test_layers_that_fit_offload_the_output_layer_then_the_last_blocks() -> None:
    blocks = [100, 100, 100, 200]
    assert evaluate.layers_that_fit(blocks, output_bytes=50, free_bytes=2000, reserve_bytes=0) == 5  # all
    # 50 (output) + 200 (last block) + 100 fit in 400; the next 100 does not
    assert evaluate.layers_that_fit(blocks, output_bytes=50, free_bytes=400, reserve_bytes=0) == 3
    assert evaluate.layers_that_fit(blocks, output_bytes=50, free_bytes=400, reserve_bytes=200) == 1
    assert evaluate.layers_that_fit(blocks, output_bytes=50, free_bytes=100, reserve_bytes=100) == 0


def test_unset_gpu_layers_are_fitted_and_set_ones_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "_free_gpu_bytes", lambda: 0)
    scoring = evaluate.LlamaEvalSettings(context_size=512, chunks=4)
    assert evaluate.fitted_gpu_layers(Path("unused.gguf"), scoring) == 0  # no GPU: nothing offloaded
    planned = evaluate.LlamaEvalSettings(context_size=512, chunks=4, gpu_layers=7)
    assert evaluate.fitted_gpu_layers(Path("unused.gguf"), planned) == 7
    ev = settings.Evaluation(gpuLayers=12)
    assert evaluate.LlamaEvalSettings.from_spec(ev, threads=3) == evaluate.LlamaEvalSettings(512, 4, 3, 12)
    assert settings.Evaluation().gpu_layers is None


def test_reference_size_is_positions_times_vocabulary_in_float16() -> None:
    assert evaluate.reference_bytes(1000, 50_000) == 1000 * 50_000 * 2 + 1001 * 4 + evaluate.REFERENCE_HEADER_BYTES
    # the issue's arithmetic: 10,000 chunks of 512 tokens with DeepSeek-R1's 129,280-token vocabulary
    at_most = evaluate.reference_bytes_at_most(10_000, 512, 129_280)
    assert 1.3e12 < at_most < 1.4e12


def test_reference_that_does_not_fit_is_refused_before_writing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(space, "free_bytes", lambda _: 1 * GiB)
    evaluate.check_reference_space(tmp_path, GiB // 2, 10, 10)
    with pytest.raises(evaluate.EvaluateError) as err:
        evaluate.check_reference_space(tmp_path, 3 * GiB, 5110, 300_000)
    message = str(err.value)
    assert "3.00 GiB" in message and "1.00 GiB free" in message
    assert "spec.evaluation.chunks" in message and "spec.storage.pvc.size" in message


def test_reference_option_is_a_spec_field() -> None:
    assert settings.Evaluation().reference is settings.ReferenceType.F16
    assert settings.Evaluation.model_validate({"reference": "Q8_0"}).reference is settings.ReferenceType.Q8_0
    with pytest.raises(ValueError, match="reference"):
        settings.Evaluation.model_validate({"reference": "Q4_0"})


def test_calibration_gpu_layers_do_not_change_the_variant_digest() -> None:
    base = {
        "source": {"local": {"path": "/m"}},
        "variants": [{"name": "q4", "type": "Q4_K_M"}],
        "storageRoot": "/s",
    }
    plain = settings.parse_spec(base)
    placed = settings.parse_spec(base | {"calibration": {"gpuLayers": 30}})
    assert settings.variant_digest(plain, plain.variants[0]) == settings.variant_digest(placed, placed.variants[0])


def test_tool_arguments() -> None:
    assert llama_tools.gpu_args(None) == []  # llama.cpp fits the free device memory itself
    assert llama_tools.gpu_args(0) == ["-ngl", "0"]
    assert llama_tools.thread_args(0) == []
    assert llama_tools.thread_args(16) == ["-t", "16"]
    lines = ["loading", "llama_model_load: error loading model: tensor 'x' has wrong shape", "main: exiting"]
    assert "wrong shape" in llama_tools.last_words(lines)
    assert llama_tools.last_words(["a", "b"]) == "b"


def test_missing_tool_names_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(llama_tools.BIN_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(llama_tools.ToolError, match=f"{tmp_path}.*{llama_tools.BIN_ENV}"):
        llama_tools.find("llama-imatrix")


class _Tokenizer:
    """Whitespace tokens, id = position in the text + 10; BOS 1 added when asked."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, Any]:
        ids = [10 + i for i, _ in enumerate(text.split())]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_calibration_windows_are_cut_like_llama_imatrix() -> None:
    # llama-imatrix: tokenise with BOS first, slice windows of n_ctx, overwrite each window's first
    # token with BOS (so the first token of every later window is dropped, not shifted)
    text = " ".join("w" for _ in range(10))
    windows = imatrix._windows(_Tokenizer(), [text], chunks=5, context_size=4)
    assert windows == [[1, 10, 11, 12], [1, 14, 15, 16]]
    assert imatrix._windows(_Tokenizer(), [text], chunks=1, context_size=4) == [[1, 10, 11, 12]]
    assert imatrix._windows(_Tokenizer(), ["a b"], chunks=3, context_size=8) == [[1, 10, 11]]


@pytest.mark.parametrize(
    ("line", "free", "full"),
    [
        ("OSError: [Errno 28] No space left on device", 10**12, True),
        # numpy's tofile when it cannot preallocate what it will write
        ("OSError: Not enough free space to write 37748736 bytes after offset 12288", 10**12, True),
        # numpy's tofile on a volume that filled mid-write: full when the rest would not fit
        ("OSError: 37748736 requested and 1048576 written", 4096, True),
        ("OSError: 37748736 requested and 1048576 written", 10**12, False),
        ("ValueError: unknown tensor type", 0, False),
    ],
)
def test_a_writers_error_line_says_the_volume_is_full(line: str, free: int, full: bool) -> None:
    assert space.says_full(line, free) is full
