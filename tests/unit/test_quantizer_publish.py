"""Publishing: files appear under their final names only when complete, report.json last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import gguf_models
from kquant.quantizer import fetch, pipeline, publish, report, settings


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_models.write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", gguf_models.QUANTIZABLE)


def staged_copy(src: Path, root: Path, digest: str, name: str) -> Path:
    stage = publish.staging_dir(root, digest)
    stage.mkdir(parents=True)
    out = stage / name
    out.write_bytes(src.read_bytes())
    return out


def test_publish_moves_files_and_writes_the_report(tiny_gguf: Path, tmp_path: Path) -> None:
    staged = staged_copy(tiny_gguf, tmp_path, "d1", "v.gguf")
    base = report.VariantReport(name="v", digest="d1", type="F16", recipe="uniform")
    done = publish.publish([staged], tmp_path, base, parameters=1000)
    final = tmp_path / "d1"
    assert sorted(p.name for p in final.iterdir()) == ["report.json", "v.gguf"]
    assert done.path == str(final / "v.gguf") and done.sha256 == fetch.sha256_file(final / "v.gguf")
    assert done.facts is not None and done.facts["block_count"] == 4
    assert done.tensor_types["F16"] > 0 and done.bits_per_weight > 0
    assert json.loads((final / "report.json").read_text())["sha256"] == done.sha256
    assert publish.is_published(tmp_path, "d1")


def test_unreadable_file_is_not_published(tmp_path: Path) -> None:
    stage = publish.staging_dir(tmp_path, "d2")
    stage.mkdir(parents=True)
    (stage / "v.gguf").write_bytes(b"GGUF not really")
    base = report.VariantReport(name="v", digest="d2", type="Q4_0", recipe="uniform")
    with pytest.raises(publish.PublishError, match="not a readable GGUF"):
        publish.publish([stage / "v.gguf"], tmp_path, base, parameters=None)
    assert not publish.is_published(tmp_path, "d2") and not (tmp_path / "d2" / "v.gguf").exists()
    publish.discard_staging(tmp_path, "d2")
    assert not (tmp_path / "d2").exists()


def test_check_space_names_the_numbers(tmp_path: Path) -> None:
    pipeline.check_space(tmp_path, 1, "variant x")
    with pytest.raises(
        pipeline.DiskFullError,
        # 2^50 bytes and the 2% margin: 1048576 GiB * 1.02
        match=r"storage claim m-storage \(.*\) has .* GiB free, but variant x needs about 1069547\.52 GiB: "
        r"grow spec\.storage\.pvc\.size by at least",
    ):
        pipeline.check_space(tmp_path, 2**50, "variant x", "m-storage")


def test_staged_names_and_shards(tmp_path: Path) -> None:
    v = settings.VariantSpec.model_validate({"name": "q4", "type": "Q4_0"})
    assert pipeline._staged_name(v, tmp_path / "m-00001-of-00003.gguf", True) == "q4-00001-of-00003.gguf"
    assert pipeline._staged_name(v, tmp_path / "m-00001-of-00003.gguf", False) == "q4.gguf"
    assert pipeline._staged_name(v, tmp_path / "m.gguf", True) == "q4.gguf"
    for i in (1, 2, 3):
        (tmp_path / f"q4-0000{i}-of-00003.gguf").write_bytes(b"")
    assert [p.name for p in pipeline._shards_of(tmp_path / "q4-00001-of-00003.gguf")] == [
        f"q4-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]


def test_shards_are_hashed_in_parallel_and_in_order(tmp_path: Path) -> None:
    files = []
    for i in range(5):
        f = tmp_path / f"s-{i + 1:05d}-of-00005.gguf"
        f.write_bytes(bytes([i]) * (1 << 20) * (i + 1))
        files.append(f)
    assert publish.hash_files(files, threads=4) == [fetch.sha256_file(f) for f in files]


def test_source_key_names_the_origin() -> None:
    """A mirror's copy of a repo@revision gets its own work folder: a download from a malicious
    mirror is never reused by a build that names the public hub (or another mirror)."""

    def spec(endpoint: str | None) -> settings.BuildSpec:
        return settings.parse_spec(
            {
                "source": {"huggingface": {"repo": "a/b", "endpoint": endpoint}},
                "variants": [{"name": "v", "type": "Q4_0"}],
                "storageRoot": "/m",
            }
        )

    keys = {pipeline.source_key(spec(e)) for e in ("http://a", "http://b", None)}
    assert len(keys) == 3
    assert pipeline.source_key(spec("https://huggingface.co/")) == pipeline.source_key(spec(None))
    assert pipeline.source_key(spec("http://A/")) == pipeline.source_key(spec("http://a"))
