"""A bitsandbytes 4-bit variant: the 16-bit safetensors model quantized by transformers on load.

Unsloth's ``-bnb-4bit`` repositories are such folders: ``from_pretrained`` with a
``BitsAndBytesConfig`` quantizes every ``nn.Linear`` of the decoder to NF4 or FP4 blocks of 64
weights (embeddings, norms and the head stay in 16 bits), ``save_pretrained`` writes the packed
weights with their ``quantization_config`` in ``config.json``, and a later ``from_pretrained`` of
that folder needs no config at all. People load it straight into QLoRA fine-tuning (peft).

What this costs: transformers quantizes tensor by tensor while it loads, but the finished 4-bit
model stays in memory until it is saved (about 4.5 bits per weight), and scoring the 16-bit
reference (``hf_evaluate``) holds the whole 16-bit model: ``sizing.bnb_memory_bytes``. The
weights go to the build pod's GPUs when it has any (``device_map="auto"``: GPUs first, then host
memory), else to the CPU, where bitsandbytes >= 0.48 has its own 4-bit kernels.

The source is untrusted: ``trust_remote_code`` is never set, so a repository whose architecture
transformers does not know is refused (``unsupported_reason``) rather than run, and only
safetensors are read. Pure parts (the config, the architecture rule) are separate from the loads.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from kquant.quantizer import settings, sizing

log = logging.getLogger(__name__)

QUANT_TYPES = {settings.VariantFormat.BNB_NF4: "nf4", settings.VariantFormat.BNB_FP4: "fp4"}
"""``bnb_4bit_quant_type`` of each bnb format."""


class BnbError(Exception):
    """The model cannot be quantized by bitsandbytes; the message names the field and the fix."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


# ---------------------------------------------------------------- pure


def config_kwargs(variant: settings.VariantSpec) -> dict[str, Any]:
    """The ``BitsAndBytesConfig`` arguments of a bnb variant (the compute dtype by name)."""
    bnb = variant.bnb_settings
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": QUANT_TYPES[variant.format],
        "bnb_4bit_use_double_quant": bnb.double_quant,
        "bnb_4bit_compute_dtype": bnb.compute_dtype.value,
    }


def unsupported_reason(
    config: Mapping[str, Any], model_types: Collection[str], causal_lm_classes: Collection[str]
) -> str | None:
    """Why transformers cannot load ``config`` (a ``config.json``) as a causal LM without running
    the repository's own code; None when it can. ``model_types`` are transformers' known
    ``model_type`` values, ``causal_lm_classes`` its ``*ForCausalLM`` class names."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return "config.json has no model_type"
    if model_type not in model_types:
        return f"model_type {model_type!r} is unknown to transformers (it would need trust_remote_code)"
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        return None  # transformers picks the causal-LM class from model_type
    unknown = [a for a in architectures if a not in causal_lm_classes]
    if len(unknown) == len(architectures):
        return f"architectures {architectures} name no causal-LM class transformers has"
    return None


def planned_bytes(source_bytes: int) -> int:
    """The folder's size from the 16-bit safetensors' bytes (two bytes per weight)."""
    return int(source_bytes / 2 * sizing.BNB_BITS_PER_WEIGHT / 8)


# ---------------------------------------------------------------- transformers


def tool_versions() -> str:
    """What decides the bytes written: part of the quantize step's stamp."""
    import importlib.metadata

    return " ".join(f"{p} {importlib.metadata.version(p)}" for p in ("bitsandbytes", "transformers", "torch"))


RUNTIME_PACKAGES = ("bitsandbytes", "accelerate", "transformers")
"""What a bnb build imports: the CUDA quantizer image has them, the CPU image (Debian's torch) not."""


def check_runtime(field: str) -> None:
    """Refuse, permanently, a bnb build in an image without bitsandbytes (the CPU quantizer image)."""
    import importlib.util

    missing = [p for p in RUNTIME_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise BnbError(
            f"{field} asks for a bitsandbytes variant, but this quantizer image lacks {', '.join(missing)}; "
            "build it with the CUDA quantizer image (spec.quantizer.image), or use format gguf"
        )


def check_architecture(source_dir: Path, field: str) -> None:
    """Refuse, permanently, a source transformers cannot load as a causal LM by itself."""
    check_runtime(field)
    import transformers
    from transformers.models.auto import modeling_auto

    try:
        config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BnbError(f"{field}: the source's config.json cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise BnbError(f"{field}: the source's config.json is not a JSON object")
    classes = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    reason = unsupported_reason(config, set(transformers.CONFIG_MAPPING.keys()), classes)
    if reason is not None:
        raise BnbError(
            f"{field} asks for a bitsandbytes variant, but transformers "
            f"{transformers.__version__} cannot load this model: {reason}; use format gguf"
        )


def device_map() -> str:
    """``auto`` (GPUs first, then host memory) when torch sees a GPU, else ``cpu``."""
    import torch

    return "auto" if torch.cuda.is_available() else "cpu"


def load_causal_lm(folder: Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM`` from local safetensors only; never the repository's code."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=False, use_safetensors=True, local_files_only=True, device_map=device_map(), **kwargs
    )


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer; its absence is the user's to fix (the fetch's ``allowPatterns``)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        said = " ".join(str(exc).split())[:160]
        raise BnbError(
            f"transformers cannot load a tokenizer from {folder.name} ({type(exc).__name__}: {said}); "
            "a bnb variant needs the repository's tokenizer files: fetch them (source.huggingface.allowPatterns "
            "'*.json', and '*.model' for a SentencePiece tokenizer)"
        ) from None


def quantize(
    source_dir: Path, out_dir: Path, variant: settings.VariantSpec, progress: Callable[[float], None] | None = None
) -> None:
    """Quantize ``source_dir`` to ``out_dir`` (written beside it, renamed into place at the end):
    the 4-bit safetensors, ``config.json`` with its ``quantization_config``, and the tokenizer."""
    import torch
    import transformers

    kwargs = config_kwargs(variant)
    kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        quantization: Any = transformers.BitsAndBytesConfig(**kwargs)  # type: ignore[no-untyped-call]
        model = load_causal_lm(source_dir, quantization_config=quantization)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        raise BnbError(f"bitsandbytes could not quantize the model: {type(exc).__name__}: {str(exc)[:300]}",
                       permanent=False) from None
    if progress is not None:
        progress(0.8)
    model.save_pretrained(partial, safe_serialization=True)
    del model
    load_tokenizer(source_dir).save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.replace(out_dir)
    log.info("quantized %s to %s (%s)", source_dir, out_dir, ", ".join(f"{k}={v}" for k, v in kwargs.items()))
