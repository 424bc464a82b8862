"""Prints the pip requirements one image installs, read from pyproject.toml so versions have one source.

    python3 images/deps.py operator|quantizer|quantizer-cpu PYPROJECT

The operator never imports llama-cpp-python (it plans from GGUF headers, read with ``gguf``), torch
or safetensors, which are most of the quantizer's size; leaving them out keeps its image small. It
downloads nothing either, so the ModelScope client (``modelscope``, ``modelscope-hub``) is the
quantizer's alone. The
quantizer gets everything, minus llama-cpp-python, which its Dockerfile stage installs without
compiling llama.cpp a second time, plus the converter's and the importance matrix's own needs
(transformers and friends, kept in the ``dev`` extra for the tests).

``quantizer-cpu`` is the CPU quantizer on Debian 13: torch and numpy come from Debian
(python3-torch is a CPU-only build; PyPI's x86_64 torch carries ~3 GB of CUDA libraries that its
libtorch_python links, so they cannot be left out), so pip must not install them, nor accelerate,
which requires torch and which only the tests' model fixture uses, nor bitsandbytes (it requires
torch too): bnb variants are built by the CUDA quantizer image, which has both.
"""

import re
import sys
import tomllib

OPERATOR_SKIPS = {"llama-cpp-python", "torch", "safetensors", "modelscope", "modelscope-hub"}
QUANTIZER_SKIPS = {"llama-cpp-python"}
QUANTIZER_EXTRAS = {"transformers", "accelerate", "bitsandbytes", "sentencepiece"}
QUANTIZER_CPU_SKIPS = {"llama-cpp-python", "torch", "numpy"}
QUANTIZER_CPU_EXTRAS = {"transformers", "sentencepiece"}


def name_of(requirement: str) -> str:
    """The distribution name of a requirement, normalised as pip compares them."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    if match is None:
        raise SystemExit(f"images/deps.py: cannot read the requirement {requirement!r} in pyproject.toml")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(image: str, pyproject: dict[str, object]) -> list[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    base: list[str] = list(project["dependencies"])
    dev: list[str] = list(project["optional-dependencies"]["dev"])
    if image == "operator":
        return [r for r in base if name_of(r) not in OPERATOR_SKIPS]
    if image == "quantizer":
        extras = [r for r in dev if name_of(r) in QUANTIZER_EXTRAS]
        return [r for r in base if name_of(r) not in QUANTIZER_SKIPS] + extras + ["protobuf>=4.21"]
    if image == "quantizer-cpu":
        extras = [r for r in dev if name_of(r) in QUANTIZER_CPU_EXTRAS]
        return [r for r in base if name_of(r) not in QUANTIZER_CPU_SKIPS] + extras + ["protobuf>=4.21"]
    raise SystemExit(f"images/deps.py: unknown image {image!r}; expected operator, quantizer or quantizer-cpu")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    with open(sys.argv[2], "rb") as f:
        print(" ".join(requirements(sys.argv[1], tomllib.load(f))))
