"""The one helper for llama.cpp's shard names (``<stem>-0000N-of-0000M.gguf``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kquant.quantizer import shards


def test_parse_and_format_round_trip() -> None:
    shard = shards.parse("DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf")
    assert shard == shards.ShardName("DeepSeek-R1-UD-IQ1_S", 2, 3)
    assert shard.name == "DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf"
    assert not shard.is_first
    assert shard.all_names()[0] == "DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf"
    assert shards.format_name("q4", 1, 12) == "q4-00001-of-00012.gguf"


@pytest.mark.parametrize(
    "name",
    [
        "model.gguf",
        "model-00001-of-00003.safetensors",  # a safetensors shard is no GGUF shard
        "-00001-of-00003.gguf",  # no stem
        "m-00000-of-00003.gguf",  # llama.cpp counts from 1
        "m-00004-of-00003.gguf",
        "m-0001-of-0003.gguf",  # four digits: not llama.cpp's %05d
    ],
)
def test_names_that_are_not_shards(name: str) -> None:
    assert shards.parse(name) is None and not shards.is_shard(name)


def test_stem_and_first_name() -> None:
    assert shards.stem_of("q4-00002-of-00003.gguf") == "q4"
    assert shards.stem_of("q4.gguf") == "q4"
    assert shards.first_name("q4-00003-of-00003.gguf") == "q4-00001-of-00003.gguf"
    assert shards.first_name("q4.gguf") == "q4.gguf"
    assert shards.names_like("m", 1) == ["m.gguf"]
    assert shards.names_like("m", 2) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]


def test_shard_name_refuses_an_impossible_index() -> None:
    with pytest.raises(ValueError, match="out of range"):
        shards.ShardName("m", 3, 2)
    with pytest.raises(ValueError, match="non-empty stem"):
        shards.ShardName("", 1, 2)


def test_group_separates_singles_and_splits() -> None:
    singles, splits = shards.group(
        ["b-00002-of-00002.gguf", "a.gguf", "README.md", "b-00001-of-00002.gguf", "c-00001-of-00003.gguf"]
    )
    assert singles == ["a.gguf"]
    assert splits == {
        ("b", 2): {1: "b-00001-of-00002.gguf", 2: "b-00002-of-00002.gguf"},
        ("c", 3): {1: "c-00001-of-00003.gguf"},
    }


def test_siblings_from_any_shard_and_missing_ones(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        (tmp_path / f"m-{i:05d}-of-00003.gguf").write_bytes(b"")
    names = [p.name for p in shards.siblings(tmp_path / "m-00002-of-00003.gguf")]
    assert names == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    assert shards.siblings(tmp_path / "single.gguf") == [tmp_path / "single.gguf"]
    (tmp_path / "m-00003-of-00003.gguf").unlink()
    assert shards.missing(tmp_path / "m-00001-of-00003.gguf") == ["m-00003-of-00003.gguf"]
    with pytest.raises(FileNotFoundError, match=r"m-00003-of-00003\.gguf"):
        shards.siblings(tmp_path / "m-00001-of-00003.gguf")


def test_first_is_the_file_llama_cpp_loads(tmp_path: Path) -> None:
    paths = [tmp_path / f"m-{i:05d}-of-00003.gguf" for i in (3, 1, 2)]
    assert shards.first(paths).name == "m-00001-of-00003.gguf"
    assert shards.first([tmp_path / "one.gguf"]).name == "one.gguf"
    with pytest.raises(ValueError, match="no GGUF"):
        shards.first([])
