"""The build spec: what the operator hands the quantizer Job, and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kquant.quantizer import settings

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINIMAL: dict[str, object] = {
    "source": {"huggingface": {"repo": REPO, "revision": "main"}},
    "variants": [{"name": "q4km", "type": "Q4_K_M"}],
    "storageRoot": "/models",
}


def spec(**changes: object) -> settings.BuildSpec:
    return settings.parse_spec({**MINIMAL, **changes})


def test_defaults_and_camel_case() -> None:
    s = settings.parse_spec(
        {
            **MINIMAL,
            "variants": [
                {
                    "name": "ud",
                    "type": "IQ1_S",
                    "recipe": "dynamic",
                    "targetSizeGiB": 131,
                    "overrides": [{"pattern": r"blk\.[0-2]\..*", "type": "Q6_K"}],
                    "outputTensorType": "Q6_K",
                    "tokenEmbeddingType": "Q8_0",
                }
            ],
            "evaluation": {"maxKLDivergence": 0.1, "maxPerplexityIncrease": "5%"},
            "resultConfigMap": {"name": "qm-build", "namespace": "default"},
        }
    )
    v = s.variants[0]
    assert v.recipe is settings.Recipe.DYNAMIC
    assert v.target_size_bytes == 131 * 2**30
    assert v.overrides[0].type.value == "Q6_K"
    assert s.evaluation.max_perplexity_increase == pytest.approx(0.05)
    assert s.calibration.chunks == 128 and s.calibration.context_size == 512
    assert s.result_config_map is not None and s.result_config_map.name == "qm-build"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"variants": [{"name": "q4km", "type": "Q4_K_X"}]}, "variants[0].type"),
        ({"variants": [{"name": "Q4KM", "type": "Q4_K_M"}]}, "name is 'Q4KM'"),
        ({"variants": [{"name": "a", "type": "Q4_0"}, {"name": "a", "type": "Q8_0"}]}, "appears twice"),
        ({"variants": []}, "at least one variant"),
        ({"source": {}}, "exactly one of source.huggingface, source.modelscope and source.local"),
        ({"source": {"huggingface": {"repo": "no-slash"}}}, "owner/name"),
        (
            {"variants": [{"name": "x", "type": "Q4_0", "overrides": [{"pattern": "(", "type": "Q8_0"}]}]},
            "not a valid regular expression",
        ),
        ({"variants": [{"name": "x", "type": "F16", "recipe": "dynamic"}]}, "needs a quantized base type"),
        (
            {"variants": [{"name": "x", "type": "Q4_0", "targetSizeGiB": 1, "targetBitsPerWeight": 4}]},
            "not both",
        ),
        ({"calibration": {"dataset": "file"}}, "path must be set"),
        ({"evaluation": {"maxPerplexityIncrease": "five%"}}, "not a percentage"),
        ({"storageRoot": "/m", "surprise": 1}, "surprise"),
    ],
)
def test_errors_name_the_field(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(settings.SpecError) as err:
        spec(**changes)
    assert fragment in str(err.value)


def test_errors_read_like_the_operators() -> None:
    # One formatter (kquant.quantizer.validation) for the build spec and the QuantizedModel.
    with pytest.raises(settings.SpecError) as err:
        spec(variants=[{"name": "q4km", "type": "Q4_K_M", "overrides": [{"pattern": "(", "type": "Q8_0"}]}],
             surprise=1)
    assert str(err.value).startswith("invalid build spec: variants[0].overrides[0].pattern is '(': pattern '(' is")
    assert str(err.value).endswith("; surprise: unknown field (misspelt?)")
    with pytest.raises(settings.SpecError, match=r"^invalid build spec: spec: Input should be a valid dictionary"):
        settings.parse_spec([1])


def test_load_from_yaml_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("source:\n  local: {path: /data/model}\nvariants:\n- {name: q8, type: Q8_0}\nstorageRoot: /m\n")
    assert settings.load_spec(path).variants[0].name == "q8"
    from_env = settings.load_spec(None, {settings.SPEC_ENV: json.dumps(MINIMAL)})
    assert from_env.variants[0].name == "q4km"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(settings.SpecError, match="no spec"):
        settings.load_spec(None, {})
    with pytest.raises(settings.SpecError, match="cannot read spec file"):
        settings.load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(settings.SpecError, match="must hold a mapping"):
        settings.load_spec(bad)


def test_digest_tracks_what_changes_the_file() -> None:
    base = spec()
    d = settings.variant_digest(base, base.variants[0])
    assert len(d) == 16
    # evaluation and storage do not change the file; naming the public hub is the default
    same = spec(
        evaluation={"maxKLDivergence": 0.5},
        storageRoot="/elsewhere",
        source={"huggingface": {"repo": REPO, "revision": "main", "endpoint": "https://HuggingFace.co/"}},
    )
    assert settings.variant_digest(same, same.variants[0]) == d
    for changed in (
        spec(calibration={"chunks": 64}),
        spec(variants=[{"name": "q4km", "type": "Q4_K_S"}]),
        spec(source={"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "v2"}}),
        # the same repo@revision from a mirror is another source: never the hub's build
        spec(source={"huggingface": {"repo": REPO, "revision": "main", "endpoint": "http://mirror"}}),
        spec(source={"huggingface": {"repo": REPO, "revision": "main", "allowPickles": True}}),
    ):
        assert settings.variant_digest(changed, changed.variants[0]) != d
    pinned = spec(variants=[{"name": "q4km", "type": "Q4_K_M", "digest": "abc123"}])
    assert settings.variant_digest(pinned, pinned.variants[0]) == "abc123"


def test_origin_is_normalised() -> None:
    assert settings.origin(None) is None
    assert settings.origin("https://huggingface.co") is None
    assert settings.origin("HTTPS://HuggingFace.co/") is None
    assert settings.origin("https://Mirror.Example/hub/") == "https://mirror.example/hub"


def test_hf_endpoint_from_the_environment_joins_the_spec(tmp_path: Path) -> None:
    """A process that downloads from ``HF_ENDPOINT`` names that mirror in its digests too."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(MINIMAL))
    plain = settings.load_spec(path, env={})
    mirrored = settings.load_spec(path, env={"HF_ENDPOINT": "http://mirror.example"})
    assert mirrored.source.huggingface is not None
    assert mirrored.source.huggingface.endpoint == "http://mirror.example"
    assert settings.variant_digest(plain, plain.variants[0]) != settings.variant_digest(
        mirrored, mirrored.variants[0]
    )
    explicit = settings.load_spec(path, env={"HF_ENDPOINT": "http://other"})
    assert explicit.source.huggingface is not None and explicit.source.huggingface.endpoint == "http://other"
