"""bnb variants, the pure parts: the spec rules, the BitsAndBytesConfig arguments, the architecture
rule, the digest, sizing and the safetensors header read. The real quantization (transformers and
bitsandbytes on SmolLM2) is tests/integration/test_bnb_smollm2.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from kquant.quantizer import bnb, pipeline, publish, settings, sizing

KNOWN_TYPES = {"llama", "qwen2"}
CAUSAL = {"LlamaForCausalLM", "Qwen2ForCausalLM"}


def spec(*variants: dict[str, Any]) -> settings.BuildSpec:
    source = {"huggingface": {"repo": "a/b", "revision": "main"}}
    return settings.parse_spec({"source": source, "variants": list(variants), "storageRoot": "/x"})


def test_a_bnb_variant_needs_no_type_and_defaults_to_double_quant_bfloat16() -> None:
    v = spec({"name": "nf4", "format": "bnb-nf4"}).variants[0]
    assert v.type is None and v.format.is_bnb
    assert bnb.config_kwargs(v) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    fp4 = spec({"name": "fp4", "format": "bnb-fp4", "bnb": {"doubleQuant": False, "computeDtype": "float16"}})
    kwargs = bnb.config_kwargs(fp4.variants[0])
    assert (kwargs["bnb_4bit_quant_type"], kwargs["bnb_4bit_use_double_quant"]) == ("fp4", False)
    assert kwargs["bnb_4bit_compute_dtype"] == "float16"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"type": "Q4_0"}, "type"),
        ({"recipe": "dynamic"}, "recipe"),
        ({"overrides": [{"pattern": "blk", "type": "Q8_0"}]}, "overrides"),
        ({"tokenEmbeddingType": "Q8_0"}, "tokenEmbeddingType"),
        ({"keepSplit": True}, "keepSplit"),
    ],
)
def test_a_bnb_variant_refuses_each_gguf_only_field_by_name(extra: dict[str, Any], named: str) -> None:
    with pytest.raises(settings.SpecError, match=f"takes no GGUF settings; remove {named}"):
        spec({"name": "nf4", "format": "bnb-nf4", **extra})


def test_a_gguf_variant_still_needs_its_type_and_takes_no_bnb_settings() -> None:
    with pytest.raises(settings.SpecError, match="type is required for format gguf"):
        spec({"name": "q4"})
    with pytest.raises(settings.SpecError, match="bnb settings need format bnb-nf4 or bnb-fp4"):
        spec({"name": "q4", "type": "Q4_0", "bnb": {"doubleQuant": False}})


def test_the_digest_follows_the_bnb_settings_and_a_gguf_digest_ignores_the_new_fields() -> None:
    digests = {
        settings.variant_digest(s, s.variants[0])
        for s in (
            spec({"name": "v", "format": "bnb-nf4"}),
            spec({"name": "v", "format": "bnb-fp4"}),
            spec({"name": "v", "format": "bnb-nf4", "bnb": {"doubleQuant": False}}),
            spec({"name": "v", "format": "bnb-nf4", "bnb": {"computeDtype": "float32"}}),
        )
    }
    assert len(digests) == 4
    gguf = spec({"name": "v", "type": "Q4_0"})
    dumped = gguf.variants[0].model_dump(mode="json", by_alias=True)
    assert dumped["format"] == "gguf"  # present on the model, yet not hashed:
    explicit = spec({"name": "v", "type": "Q4_0", "format": "gguf"})
    assert settings.variant_digest(gguf, gguf.variants[0]) == settings.variant_digest(explicit, explicit.variants[0])


def test_the_architecture_rule_refuses_what_transformers_would_need_remote_code_for() -> None:
    ok = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert bnb.unsupported_reason(ok, KNOWN_TYPES, CAUSAL) is None
    assert bnb.unsupported_reason({"model_type": "qwen2"}, KNOWN_TYPES, CAUSAL) is None
    custom = {"model_type": "deepseek_v9", "architectures": ["DeepseekV9ForCausalLM"], "auto_map": {}}
    assert "unknown to transformers" in (bnb.unsupported_reason(custom, KNOWN_TYPES, CAUSAL) or "")
    encoder = {"model_type": "llama", "architectures": ["LlamaModel"]}
    assert "no causal-LM class" in (bnb.unsupported_reason(encoder, KNOWN_TYPES, CAUSAL) or "")
    assert "no model_type" in (bnb.unsupported_reason({}, KNOWN_TYPES, CAUSAL) or "")


def test_an_unknown_architecture_fails_the_build_permanently_naming_the_format_field(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    config = {"model_type": "not-a-real-arch", "architectures": ["XForCausalLM"]}
    (source / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file({"w": np.zeros((2, 2), dtype=np.float16)}, str(source / "model.safetensors"))
    variants = [{"name": "nf4", "format": "bnb-nf4"}]
    build = settings.parse_spec(
        {"source": {"local": {"path": str(source)}}, "variants": variants, "storageRoot": str(tmp_path / "store")}
    )
    runner = pipeline.BuildRunner(build, _NullSink())
    result = runner.run()
    assert result.status == "Failed" and runner.permanent
    assert result.reason is not None
    assert result.reason.startswith("spec.variants[0].format asks for a bitsandbytes variant")
    assert "'not-a-real-arch' is unknown to transformers" in result.reason and "use format gguf" in result.reason


def test_a_source_without_tokenizer_files_fails_permanently_naming_allow_patterns(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    safetensors.numpy.save_file({"w": np.zeros((2, 2), dtype=np.float16)}, str(source / "model.safetensors"))
    variants = [{"name": "nf4", "format": "bnb-nf4"}]
    build = settings.parse_spec(
        {"source": {"local": {"path": str(source)}}, "variants": variants, "storageRoot": str(tmp_path / "store")}
    )
    runner = pipeline.BuildRunner(build, _NullSink())
    result = runner.run()
    assert result.status == "Failed" and runner.permanent and result.failed_step == "reference-hf"
    assert "source.huggingface.allowPatterns" in (result.reason or ""), result.reason


def test_a_bnb_variant_is_sized_at_four_and_a_half_bits_and_its_build_holds_the_16_bit_model() -> None:
    v = spec({"name": "nf4", "format": "bnb-nf4"}).variants[0]
    assert sizing.variant_bytes(v, 8_000_000_000) == 4_500_000_000
    assert not sizing.is_slow_type(v)
    files = [sizing.HubFile("model.safetensors", 16_000_000_000), sizing.HubFile("config.json", 1000)]
    config = {"model_type": "llama", "torch_dtype": "bfloat16"}
    gguf_only = sizing.size_build(files, config, [spec({"name": "q4", "type": "Q4_0"}).variants[0]])
    with_bnb = sizing.size_build(files, config, [v])
    assert "bnb" not in gguf_only.memory_peaks
    assert with_bnb.memory_peaks["bnb"] == sizing.bnb_memory_bytes(with_bnb.parameters, 2.0)
    assert with_bnb.largest_step == "bnb" and with_bnb.memory_bytes > gguf_only.memory_bytes


def test_the_dtypes_of_a_safetensors_file_come_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {"a": np.zeros(4, np.uint8), "b": np.zeros(2, np.uint8), "c": np.zeros(3, np.float16)}
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
    assert publish.safetensors_dtypes(path) == {"U8": 2, "F16": 1}
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert "__metadata__" in json.loads(path.read_bytes()[8 : 8 + length])


class _NullSink:
    def progress(self, line: Any) -> None:
        pass

    def report(self, build_report: Any) -> None:
        pass
