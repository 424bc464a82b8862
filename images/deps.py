"""Prints the pip requirements one image installs, read from pyproject.toml so versions have one source.

    python3 images/deps.py operator|quantizer PYPROJECT

The operator never imports llama-cpp-python (it plans from GGUF headers, read with ``gguf``), torch
or safetensors, which are most of the quantizer's size; leaving them out keeps its image small. The
quantizer gets everything, minus llama-cpp-python, which its Dockerfile stage installs without
compiling llama.cpp a second time, plus the converter's and the importance matrix's own needs
(transformers and friends, kept in the ``dev`` extra for the tests).
"""

import re
import sys
import tomllib

OPERATOR_SKIPS = {"llama-cpp-python", "torch", "safetensors"}
QUANTIZER_SKIPS = {"llama-cpp-python"}
QUANTIZER_EXTRAS = {"transformers", "accelerate", "sentencepiece"}


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
    raise SystemExit(f"images/deps.py: unknown image {image!r}; expected operator or quantizer")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    with open(sys.argv[2], "rb") as f:
        print(" ".join(requirements(sys.argv[1], tomllib.load(f))))
