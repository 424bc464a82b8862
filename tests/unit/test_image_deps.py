"""What pip installs into each image, read from pyproject.toml by images/deps.py.

The CPU quantizer takes torch and numpy from Debian 13 (a CPU-only torch); if pip were asked for
torch there, or for a package that requires it (accelerate), it would fetch PyPI's torch and its
CUDA libraries, gigabytes the CPU image must not carry.
"""

from __future__ import annotations

import importlib.util
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("image_deps", REPO / "images/deps.py")
assert _spec and _spec.loader
deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deps)


def names(image: str) -> set[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return {deps.name_of(r) for r in deps.requirements(image, tomllib.load(f))}


def test_cpu_quantizer_leaves_torch_to_debian() -> None:
    cpu = names("quantizer-cpu")
    assert not cpu & {"torch", "numpy", "accelerate", "bitsandbytes", "llama-cpp-python"}, cpu
    # What the converter and the pipeline import besides torch: the rest of the quantizer's list.
    assert {"transformers", "sentencepiece", "safetensors", "gguf", "huggingface-hub"} <= cpu
    assert names("quantizer") - cpu == {"torch", "numpy", "accelerate", "bitsandbytes"}


def test_operator_image_has_no_torch() -> None:
    assert not names("operator") & {"torch", "safetensors", "llama-cpp-python"}


def test_only_the_quantizer_images_carry_the_modelscope_client() -> None:
    """The fetch step of a modelscope source runs in the quantizer; the operator downloads nothing."""
    for image in ("quantizer", "quantizer-cpu"):
        assert {"modelscope", "modelscope-hub"} <= names(image), image
    assert not names("operator") & {"modelscope", "modelscope-hub"}
