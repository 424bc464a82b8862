"""``read_facts`` on real GGUF files written by gguf-py (tiny shapes), and its pure header logic."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pydantic
import pytest
from kquant.quantizer import gguf_facts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures import gguf_models

SMALL = gguf_models.Shape(n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1024)


def test_dense_gqa_facts(tmp_path: Path) -> None:
    path = gguf_models.write_model(tmp_path / "dense.gguf", SMALL)
    facts = gguf_facts.read_facts(path)
    assert facts.architecture == "llama"
    assert facts.block_count == 3
    assert facts.embedding_length == 256
    assert facts.vocab_size == 1024
    assert facts.head_count == (4, 4, 4)
    assert facts.head_count_kv == (2, 2, 2)
    assert facts.key_length == facts.value_length == 64
    assert facts.layer_bytes == (gguf_models.expected_layer_bytes(SMALL),) * 3
    assert facts.layer_expert_bytes == (0, 0, 0)
    assert facts.token_embd_bytes == 1024 * 256 * 2
    assert facts.output_bytes == 1024 * 256 * 2 + 256 * 4  # output.weight and output_norm
    assert not facts.tied_embeddings
    assert facts.output_device_bytes == facts.output_bytes
    assert facts.total_bytes == sum(facts.layer_bytes) + facts.output_bytes + facts.token_embd_bytes
    assert facts.file_bytes == path.stat().st_size > facts.total_bytes
    assert facts.tensor_types == {"F16": 2 + 3 * 7, "F32": 1 + 3 * 2}
    assert not facts.is_moe
    assert facts.swa_layers == (False, False, False)


def test_tied_embeddings_copy_token_embd_to_the_output_device(tmp_path: Path) -> None:
    shape = gguf_models.Shape(**{**SMALL.__dict__, "tied": True})
    facts = gguf_facts.read_facts(gguf_models.write_model(tmp_path / "tied.gguf", shape))
    assert facts.tied_embeddings
    assert facts.output_bytes == 256 * 4  # only output_norm
    assert facts.output_device_bytes == facts.output_bytes + facts.token_embd_bytes


def test_moe_expert_bytes(tmp_path: Path) -> None:
    shape = gguf_models.Shape(**{**SMALL.__dict__, "n_expert": 4, "n_expert_used": 2})
    facts = gguf_facts.read_facts(gguf_models.write_model(tmp_path / "moe.gguf", shape))
    assert facts.is_moe
    assert facts.expert_count == 4 and facts.expert_used_count == 2
    assert facts.layer_bytes == (gguf_models.expected_layer_bytes(shape),) * 3
    assert facts.layer_expert_bytes == (4 * 3 * 512 * 256 * 2,) * 3
    assert facts.layer_max_tensor_bytes == (4 * 512 * 256 * 2,) * 3


def test_olmo2_sliding_window_pattern(tmp_path: Path) -> None:
    shape = gguf_models.Shape(**{**SMALL.__dict__, "arch": "olmo2", "n_layer": 8, "sliding_window": 1024})
    facts = gguf_facts.read_facts(gguf_models.write_model(tmp_path / "swa.gguf", shape))
    assert facts.sliding_window == 1024
    # llama.cpp's olmo2: pattern 4, dense last -> layers 3 and 7 use full attention
    assert facts.swa_layers == (True, True, True, False, True, True, True, False)


def test_facts_round_trip_through_json(tmp_path: Path) -> None:
    facts = gguf_facts.read_facts(gguf_models.write_model(tmp_path / "m.gguf", SMALL))
    again = gguf_facts.ModelFacts.model_validate_json(facts.model_dump_json())
    assert again == facts
    with pytest.raises(pydantic.ValidationError):
        facts.block_count = 4  # type: ignore[misc]  # frozen


def test_split_shards_are_summed(tmp_path: Path) -> None:
    one = gguf_facts.read_facts(gguf_models.write_model(tmp_path / "whole.gguf", SMALL))
    # Split the same tensors over two shards the way gguf-split does: metadata in the first.
    reader = gguf.GGUFReader(tmp_path / "whole.gguf")
    names = [t.name for t in reader.tensors]
    half = len(names) // 2
    for index, part in enumerate((names[:half], names[half:]), start=1):
        writer = gguf.GGUFWriter(str(tmp_path / f"m-{index:05d}-of-00002.gguf"), "llama")
        if index == 1:
            for field in reader.fields.values():
                if field.name.startswith("GGUF.") or field.name == "general.architecture":
                    continue
                value_type = field.types[0]
                sub = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub)
        for t in reader.tensors:
            if t.name in part:
                writer.add_tensor(t.name, t.data, raw_shape=tuple(reversed(t.shape.tolist())),
                                  raw_dtype=t.tensor_type)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    split = gguf_facts.read_facts(tmp_path / "m-00002-of-00002.gguf")
    assert split.shards == 2
    assert split.layer_bytes == one.layer_bytes
    assert split.total_bytes == one.total_bytes
    assert split.vocab_size == one.vocab_size
    (tmp_path / "m-00001-of-00002.gguf").unlink()
    with pytest.raises(FileNotFoundError, match=r"m-00001-of-00002\.gguf"):
        gguf_facts.read_facts(tmp_path / "m-00002-of-00002.gguf")


def _header(**extra: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "general.architecture": "deepseek2",
        "deepseek2.block_count": 2,
        "deepseek2.embedding_length": 1024,
        "deepseek2.attention.head_count": 16,
        "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.key_length": 576,
        "deepseek2.attention.value_length": 512,
        "deepseek2.attention.key_length_mla": 192,
        "deepseek2.attention.value_length_mla": 128,
        "deepseek2.attention.kv_lora_rank": 512,
        "deepseek2.vocab_size": 2000,
    }
    meta.update(extra)
    return meta


def test_mla_header_is_k_only() -> None:
    facts = gguf_facts.facts_from_header(_header(), [], file_bytes=1)
    assert facts.is_mla
    assert facts.key_length == 576 and facts.head_count_kv == (1, 1)
    assert facts.tied_embeddings  # no output.weight among (no) tensors


def test_per_layer_head_counts_must_match_the_block_count() -> None:
    key = "deepseek2.attention.head_count_kv"
    with pytest.raises(ValueError, match=r"head_count_kv has 3 entries, but the model has 2"):
        gguf_facts.facts_from_header(_header(**{key: [1, 1, 1]}), [], file_bytes=1)
    facts = gguf_facts.facts_from_header(_header(**{key: [0, 1]}), [], file_bytes=1)
    assert facts.head_count_kv == (0, 1)


def test_missing_block_count_names_the_key() -> None:
    meta = _header()
    del meta["deepseek2.block_count"]
    with pytest.raises(ValueError, match=r"deepseek2\.block_count is missing"):
        gguf_facts.facts_from_header(meta, [], file_bytes=1)


def test_swa_pattern_matches_llama_cpp() -> None:
    assert gguf_facts.swa_pattern(6, 2, dense_first=False) == (True, False) * 3
    assert gguf_facts.swa_pattern(5, 4, dense_first=True) == (False, True, True, True, False)
    assert gguf_facts.swa_pattern(3, 0, dense_first=False) == (True, True, True)


@pytest.mark.parametrize(
    "shape",
    [
        SMALL,
        gguf_models.Shape(**{**SMALL.__dict__, "tied": True}),
        gguf_models.Shape(**{**SMALL.__dict__, "n_expert": 4, "n_expert_used": 2}),
        gguf_models.Shape(**{**SMALL.__dict__, "arch": "olmo2", "n_layer": 4, "sliding_window": 512}),
        gguf_models.Shape(**{**SMALL.__dict__, "weight_type": gguf.GGMLQuantizationType.Q8_0}),
    ],
    ids=["dense", "tied", "moe", "swa", "q8_0"],
)
def test_shape_facts_match_the_file(tmp_path: Path, shape: gguf_models.Shape) -> None:
    """The analytic facts that pure planner tests use are what reading the file gives."""
    read = gguf_facts.read_facts(gguf_models.write_model(tmp_path / "m.gguf", shape))
    made = gguf_models.shape_facts(shape, file_bytes=read.file_bytes, tensor_types=read.tensor_types)
    assert made == read
