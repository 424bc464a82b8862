"""The quantizer's numeric core against real llama.cpp, on small random GGUFs made here.

The dense model has 256-multiple widths so every K- and IQ-type applies; the MoE one is
Mixtral-style (``ffn_*_exps`` with 4 experts) so the per-expert imatrix layout is exercised.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixtures import gguf_models
from kquant.quantizer import constants, imatrix, quantize, quantize_job, recipes

F = constants.FileType
T = constants.TensorType


def synthetic_imatrix(path: Path) -> imatrix.ImatrixData:
    values = gguf_models.synthetic_imatrix_values(path)
    return imatrix.ImatrixData(
        means={name: v for name, (v, _) in values.items()},
        counts={name: np.full(n, 1024, dtype=np.int64) for name, (_, n) in values.items()},
        chunk_count=2,
        chunk_size=512,
        datasets=("synthetic",),
    )


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_models.write_model(tmp_path_factory.mktemp("dense") / "f16.gguf", gguf_models.QUANTIZABLE)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = dataclasses.replace(gguf_models.QUANTIZABLE, n_expert=4, n_expert_used=2, n_layer=2)
    return gguf_models.write_model(tmp_path_factory.mktemp("moe") / "f16.gguf", spec)


@pytest.fixture(scope="module")
def dense_imatrix(dense: Path) -> imatrix.ImatrixData:
    return synthetic_imatrix(dense)


def tensor_types(path: Path) -> dict[str, T]:
    return {t.name: constants.TENSOR_TYPE_BY_CODE[int(t.tensor_type)] for t in gguf.GGUFReader(path).tensors}


def file_type_of(path: Path) -> int:
    return int(gguf.GGUFReader(path).fields["general.file_type"].contents())


def needs_imatrix(file_type: F) -> bool:
    # llama.cpp's rules put IQ1/IQ2/IQ3_XXS tensors into these mixes (Q2_K_S marks its Q2_K ones)
    return file_type.name.startswith(("IQ1", "IQ2", "IQ3_XXS", "IQ3_XS")) or file_type is F.Q2_K_S


@pytest.mark.parametrize("file_type", list(F))
def test_every_file_type_quantizes(
    file_type: F, dense: Path, moe: Path, dense_imatrix: imatrix.ImatrixData, tmp_path: Path
) -> None:
    src, data = dense, dense_imatrix if needs_imatrix(file_type) else None
    probe = "blk.1.attn_q.weight"
    if file_type is F.MXFP4_MOE:
        src, data, probe = moe, None, "blk.1.ffn_up_exps.weight"  # MXFP4 goes to expert tensors only
    dst = tmp_path / f"{file_type}.gguf"
    quantize.quantize(src, dst, quantize_job.QuantizeJob(file_type=file_type, nthread=2), data)
    assert file_type_of(dst) == constants.FILE_TYPES[file_type].code
    base = constants.FILE_TYPES[file_type].base
    types = tensor_types(dst)
    assert types[probe] in {base} | _neighbours(base), types[probe]
    assert [p.name for p in tmp_path.iterdir()] == [dst.name], "no temporary files may be left behind"


def _neighbours(base: T) -> set[T]:
    """Types llama.cpp's own mixes may give attn_q next to the base type (e.g. IQ3_XS uses IQ3_XXS)."""
    bpw = constants.TENSOR_TYPES[base].bits_per_weight
    return {t for t, info in constants.TENSOR_TYPES.items() if abs(info.bits_per_weight - bpw) <= 1.0}


def test_iq_type_without_imatrix_fails_clearly(dense: Path, tmp_path: Path) -> None:
    dst = tmp_path / "iq2.gguf"
    with pytest.raises(quantize.QuantizeError, match=r"IQ2_XXS needs an importance matrix"):
        quantize.quantize(dense, dst, quantize_job.QuantizeJob(file_type=F.IQ2_XXS, nthread=2), None)
    assert list(tmp_path.iterdir()) == []


def test_imatrix_changes_the_result(dense: Path, dense_imatrix: imatrix.ImatrixData, tmp_path: Path) -> None:
    job = quantize_job.QuantizeJob(file_type=F.Q4_K_M, nthread=2)
    quantize.quantize(dense, tmp_path / "plain.gguf", job, None)
    quantize.quantize(dense, tmp_path / "imatrix.gguf", job, dense_imatrix)
    plain, weighted = (tmp_path / "plain.gguf").read_bytes(), (tmp_path / "imatrix.gguf").read_bytes()
    assert len(plain) == len(weighted)
    assert hashlib.sha256(plain).digest() != hashlib.sha256(weighted).digest()


def test_overrides_and_tensor_settings_take_effect(dense: Path, tmp_path: Path) -> None:
    job = quantize_job.QuantizeJob(
        file_type=F.Q4_K_M,
        overrides=((r"attn_v", T.Q8_0), (r"blk\.[01]\.ffn_down", T.Q2_K), (r"ffn_down", T.Q5_K)),
        token_embedding_type=T.Q8_0,
        output_tensor_type=T.Q5_K,
        nthread=2,
    )
    dst = tmp_path / "o.gguf"
    seen: list[float] = []
    quantize.quantize(dense, dst, job, None, progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    types = tensor_types(dst)
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(4)} == {T.Q8_0}
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [T.Q2_K, T.Q2_K, T.Q5_K, T.Q5_K]
    assert types["token_embd.weight"] is T.Q8_0
    assert types["output.weight"] is T.Q5_K
    assert quantize.dry_run(dense, job) == types


def test_pure_and_leave_output_tensor(dense: Path, tmp_path: Path) -> None:
    dst = tmp_path / "p.gguf"
    job = quantize_job.QuantizeJob(file_type=F.Q4_K_M, pure=True, leave_output_tensor=True)
    quantize.quantize(dense, dst, job, None)
    types = tensor_types(dst)
    assert types["output.weight"] is T.F16
    assert {t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")} == {T.Q4_K}


def test_requantizing_needs_allow_requantize(dense: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "q8.gguf"
    quantize.quantize(dense, q8, quantize_job.QuantizeJob(file_type=F.Q8_0), None)
    with pytest.raises(quantize.QuantizeError, match="requantizing from type q8_0 is disabled"):
        quantize.quantize(q8, tmp_path / "q4.gguf", quantize_job.QuantizeJob(file_type=F.Q4_0), None)
    assert not (tmp_path / "q4.gguf").exists()
    quantize.quantize(q8, tmp_path / "q4.gguf", quantize_job.QuantizeJob(file_type=F.Q4_0, allow_requantize=True), None)
    assert tensor_types(tmp_path / "q4.gguf")["blk.0.ffn_up.weight"] is T.Q4_0


def test_corrupt_source_fails_and_writes_nothing(dense: Path, tmp_path: Path) -> None:
    broken = tmp_path / "src" / "broken.gguf"
    broken.parent.mkdir()
    broken.write_bytes(dense.read_bytes()[: dense.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(quantize.QuantizeError, match="could not quantize"):
        quantize.quantize(broken, out / "q.gguf", quantize_job.QuantizeJob(file_type=F.Q8_0), None)
    assert list(out.iterdir()) == []


def test_keep_split_keeps_the_shards(dense: Path, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(dense)
    writer = gguf.GGUFWriter(tmp_path / "split.gguf", "llama", split_max_tensors=20)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) > 1
    out = tmp_path / "out"
    job = quantize_job.QuantizeJob(file_type=F.Q8_0, keep_split=True)
    quantize.quantize(shards[0], out / f"q8-00001-of-{len(shards):05d}.gguf", job, None)
    assert sorted(p.name for p in out.iterdir()) == [
        f"q8-{i:05d}-of-{len(shards):05d}.gguf" for i in range(1, len(shards) + 1)
    ]


def test_moe_imatrix_layout_is_what_llama_cpp_expects(moe: Path, tmp_path: Path) -> None:
    data = synthetic_imatrix(moe)
    assert data["blk.0.ffn_down_exps.weight"].size == 512 * 4
    dst = tmp_path / "iq2.gguf"
    quantize.quantize(moe, dst, quantize_job.QuantizeJob(file_type=F.IQ2_XXS, nthread=2), data)
    assert tensor_types(dst)["blk.0.ffn_up_exps.weight"] in {T.IQ2_XXS, T.IQ2_XS, T.IQ3_XXS, T.Q2_K}
    wrong = imatrix.ImatrixData(
        means=dict(data.means) | {"blk.0.ffn_up_exps.weight": np.ones(256, dtype=np.float32)},
        counts=dict(data.counts) | {"blk.0.ffn_up_exps.weight": np.ones(1, dtype=np.int64)},
        chunk_count=1,
        chunk_size=512,
    )
    with pytest.raises(quantize.QuantizeError, match=r"imatrix size 256 is different from tensor size 1024"):
        quantize.quantize(moe, tmp_path / "bad.gguf", quantize_job.QuantizeJob(file_type=F.IQ2_XXS), wrong)


def test_imatrix_gguf_round_trip(moe: Path, tmp_path: Path) -> None:
    data = synthetic_imatrix(moe)
    path = tmp_path / "imatrix.gguf"
    imatrix.write_gguf(data, path)
    back = imatrix.read_gguf(path)
    assert set(back) == set(data)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (2, 512, ("synthetic",))
    for name in data:
        np.testing.assert_allclose(back[name], data[name], rtol=1e-6)
        np.testing.assert_array_equal(back.counts[name], data.counts[name])
    fields = gguf.GGUFReader(path).fields
    assert fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in fields
    shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(path).tensors}
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == [512, 4]
    assert shapes["blk.0.ffn_down_exps.weight.counts"] == [1, 4]


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_plans_are_what_llama_cpp_does(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src: Path = request.getfixturevalue(model)
    data = synthetic_imatrix(src)
    uniform = quantize.plan(src, recipes.VariantRecipe(name="u", type=F.Q4_K_M), data)
    dynamic = quantize.plan(src, recipes.VariantRecipe(name="d", type=F.Q4_K_M, recipe="dynamic"), data)
    assert dynamic.total_bytes <= uniform.total_bytes
    assert dynamic.predicted_loss < uniform.predicted_loss
    for plan in (uniform, dynamic):
        dst = tmp_path / f"{plan.variant}.gguf"
        quantize.quantize(src, dst, plan.job, data)
        written = tensor_types(dst)
        assert {row.tensor: row.type for row in plan.rows} == written
        on_disk = sum(int(t.n_bytes) for t in gguf.GGUFReader(dst).tensors)
        assert on_disk == plan.total_bytes


def test_dynamic_with_a_budget_and_an_impossible_one(moe: Path) -> None:
    data = synthetic_imatrix(moe)
    n_weights = sum(t.n_elements for t in recipes.read_tensors(moe))
    variant = recipes.VariantRecipe(name="ud", type=F.IQ1_S, recipe="dynamic", target_bits_per_weight=2.5)
    plan = quantize.plan(moe, variant, data)
    assert plan.total_bytes <= 2.5 * n_weights / 8
    types = {row.tensor: row.type for row in plan.rows}
    assert constants.TENSOR_TYPES[types["blk.0.attn_v.weight"]].bits_per_weight >= 4
    assert constants.TENSOR_TYPES[types["blk.0.ffn_up_exps.weight"]].bits_per_weight < 4
    impossible = variant.model_copy(update={"target_bits_per_weight": 1.0})
    with pytest.raises(recipes.RecipeError, match=r"targetBitsPerWeight 1.0 is .* smallest mix"):
        quantize.plan(moe, impossible, data)
    print(plan.render())
