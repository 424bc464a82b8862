"""The numeric core on a real model: SmolLM2-135M-Instruct (part A's Hugging Face fixture).

Its 576-wide rows are not a multiple of 256, so K- and IQ-types fall back for most tensors; the
plans must predict exactly what llama.cpp writes anyway, and the torch imatrix must name every
tensor llama.cpp quantizes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from fixtures import hf_models, smollm2
from kquant.quantizer import constants, evaluate, imatrix, quantize, quantize_job, recipes

F = constants.FileType
T = constants.TensorType


@pytest.fixture(scope="module")
def hf() -> Path:
    return smollm2.hf_dir()


@pytest.fixture(scope="module")
def f16(hf: Path) -> Path:
    return hf_models.cached_f16_gguf(hf, "smollm2")


@pytest.fixture(scope="module")
def calibrated(hf: Path) -> imatrix.ImatrixData:
    text = evaluate.builtin_text("calibration.txt")
    seen: list[float] = []
    data = imatrix.compute_imatrix(hf, [text], chunks=2, context_size=256, device="cpu", progress=seen.append)
    assert seen[-1] == 1.0
    return data


def tensor_types(path: Path) -> dict[str, constants.TensorType]:
    return {t.name: constants.TENSOR_TYPE_BY_CODE[int(t.tensor_type)] for t in gguf.GGUFReader(path).tensors}


def test_imatrix_names_every_quantized_tensor(f16: Path, calibrated: imatrix.ImatrixData) -> None:
    tensors = recipes.read_tensors(f16)
    roles = recipes.roles_for(tensors)
    wanted = {t.name for t in tensors if roles[t.name] is not recipes.Role.KEPT and t.name != "token_embd.weight"}
    assert wanted <= set(calibrated), sorted(wanted - set(calibrated))[:5]
    by_name = {t.name: t for t in tensors}
    for name in wanted:
        assert calibrated[name].size == by_name[name].row_length, name
        assert calibrated.counts[name].tolist() == [2 * 256]
    assert calibrated.chunk_count == 2


def test_uniform_and_dynamic_plans_are_what_llama_cpp_writes(
    f16: Path, calibrated: imatrix.ImatrixData, tmp_path: Path
) -> None:
    uniform = quantize.plan(f16, recipes.VariantRecipe(name="q4km", type=F.Q4_K_M), calibrated)
    # 576-wide rows: Q4_K falls back to Q5_0 and Q6_K to Q8_0; only the 1536-wide ffn_down keeps K-types
    types = {row.tensor: row.type for row in uniform.rows}
    assert types["blk.5.attn_q.weight"] is T.Q5_0
    assert types["blk.0.ffn_down.weight"] in {T.Q4_K, T.Q6_K}
    dynamic = quantize.plan(f16, recipes.VariantRecipe(name="dyn", type=F.Q4_K_M, recipe="dynamic"), calibrated)
    assert dynamic.total_bytes <= uniform.total_bytes
    assert all(
        row.type in {T.F32, T.F16} or 576 % constants.TENSOR_TYPES[row.type].block_size == 0
        for row in dynamic.rows
        if not row.tensor.endswith("ffn_down.weight")
    )
    for plan in (uniform, dynamic):
        out = tmp_path / f"{plan.variant}.gguf"
        quantize.quantize(f16, out, plan.job, calibrated)
        assert tensor_types(out) == {row.tensor: row.type for row in plan.rows}


def test_imatrix_file_feeds_the_quantizer(f16: Path, calibrated: imatrix.ImatrixData, tmp_path: Path) -> None:
    path = tmp_path / "imatrix.gguf"
    imatrix.write_gguf(calibrated, path)
    job = quantize_job.QuantizeJob(file_type=F.IQ2_XS, nthread=2)
    quantize.quantize(f16, tmp_path / "a.gguf", job, calibrated)
    quantize.quantize(f16, tmp_path / "b.gguf", job, imatrix.read_gguf(path))
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_gguf_only_source_is_refused_with_the_reason(tmp_path: Path, f16: Path) -> None:
    (tmp_path / f16.name).symlink_to(f16)
    with pytest.raises(imatrix.ImatrixUnavailableError, match="without 16-bit weights"):
        imatrix.compute_imatrix(tmp_path, ["text"], chunks=1, context_size=64)
