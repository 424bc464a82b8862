"""Pure parts of the fetch step: pattern selection, GGUF shard grouping, format detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from kquant.quantizer import fetch, settings


def test_select_files() -> None:
    names = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "README.md",
    ]
    assert fetch.select_files(names, None) == sorted(names)
    assert fetch.select_files(names, ["*.safetensors", "config.json"]) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert fetch.select_files(names, ["*.gguf"]) == []


def test_shards_grouped_and_missing_shard_named(tmp_path: Path) -> None:
    files = [
        tmp_path / n
        for n in (
            "a.gguf",
            "big-00002-of-00003.gguf",
            "big-00001-of-00003.gguf",
            "big-00003-of-00003.gguf",
            "notes.txt",
        )
    ]
    models = fetch.find_gguf_models(files)
    assert [m.first.name for m in models] == ["a.gguf", "big-00001-of-00003.gguf"]
    assert [p.name for p in models[1].shards] == [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with pytest.raises(fetch.FetchError, match=r"big-00002-of-00003\.gguf"):
        fetch.find_gguf_models([tmp_path / "big-00001-of-00003.gguf", tmp_path / "big-00003-of-00003.gguf"])


def test_detect_format(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    assert fetch.detect_format(hf) is fetch.SourceFormat.SAFETENSORS
    g = tmp_path / "g"
    g.mkdir()
    (g / "m-00001-of-00002.gguf").write_bytes(b"x")
    (g / "m-00002-of-00002.gguf").write_bytes(b"x")
    assert fetch.detect_format(g) is fetch.SourceFormat.GGUF
    assert fetch.single_gguf_model(g / "m-00001-of-00002.gguf").shards[1].name == "m-00002-of-00002.gguf"
    (g / "other.gguf").write_bytes(b"x")
    with pytest.raises(fetch.FetchError, match="narrow"):
        fetch.single_gguf_model(g)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "README.md").write_text("")
    with pytest.raises(fetch.FetchError, match=r"neither config\.json"):
        fetch.detect_format(empty)


def test_endpoint_precedence() -> None:
    src = settings.HuggingFaceSource(repo="a/b")
    assert fetch.endpoint_for(src, {}) == fetch.DEFAULT_ENDPOINT
    assert fetch.endpoint_for(src, {"HF_ENDPOINT": "http://mirror/"}) == "http://mirror"
    own = settings.HuggingFaceSource(repo="a/b", endpoint="http://own")
    assert fetch.endpoint_for(own, {"HF_ENDPOINT": "http://mirror"}) == "http://own"


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "C:/x.json",
        "../outside.json",
        "sub/../../outside.json",
        "./config.json",
        "a//b.json",
        "a\\b.json",
        "*.json",
        "x\nINFO fake log line",
        ".kquant-fetch.json",
        ".kquant-partial/model.safetensors.part",
        ".cache/huggingface/download/x.metadata",
    ],
)
def test_unsafe_hub_names_are_refused(name: str) -> None:
    with pytest.raises(fetch.FetchError, match="refusing to fetch this repository"):
        fetch.check_name(name)


def test_names_through_a_symlink_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    dest = tmp_path / "source"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "sub").symlink_to(tmp_path / "elsewhere")
    fetch.check_name("config.json", dest)
    fetch.check_name("onnx/model.json", dest)
    with pytest.raises(fetch.FetchError, match="outside"):
        fetch.check_name("sub/model.safetensors", dest)


def _hub(**switches: bool) -> settings.HuggingFaceSource:
    return settings.HuggingFaceSource(repo="a/b", **switches)


def test_code_and_pickles_need_their_switch() -> None:
    for name in ("tokenization_evil.py", "lib/x.SO", "run.sh"):
        assert fetch.refused_kind(name, _hub()) == "code"
        assert fetch.refused_kind(name, _hub(allow_code_files=True)) is None
    for name in ("pytorch_model.bin", "training_args.bin", "model.pt", "m.pth", "x.pkl", "last.ckpt"):
        assert fetch.refused_kind(name, _hub()) == "pickle"
        assert fetch.refused_kind(name, _hub(allow_pickles=True)) is None
    for name in ("config.json", "model.safetensors", "tokenizer.model", "m.gguf", "chat_template.jinja"):
        assert fetch.refused_kind(name, _hub()) is None


def test_a_repo_with_only_pickled_weights_names_the_switch() -> None:
    listing = [fetch.RemoteFile(n, 1, None) for n in ("config.json", "pytorch_model.bin", "modeling_x.py")]
    names = [f.name for f in listing]
    refused = {n: k for n in names if (k := fetch.refused_kind(n, _hub()))}
    with pytest.raises(fetch.FetchError, match=r"only as pickles \(pytorch_model.bin\).*allowPickles is true"):
        fetch._check_selection(_hub(), "https://huggingface.co", listing, names, refused)
    with pytest.raises(fetch.FetchError, match="allowCodeFiles"):
        fetch._check_selection(_hub(), "e", listing, ["modeling_x.py"], {"modeling_x.py": "code"})
