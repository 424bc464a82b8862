"""kquant's lists of llama-server flags against llama.cpp's own argument table (common/arg.cpp of
the pinned source that hack/build-llama.sh unpacks): a flag that llama.cpp renamed or dropped, or
a spelling of a refused option that the list misses, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import convert

ARG_CPP = convert.converter_src() / "common" / "arg.cpp"


def _options() -> list[tuple[str, ...]]:
    """Every option's spellings (positive and negative lists), as declared in common_arg(...)."""
    if not ARG_CPP.is_file():
        pytest.skip(f"{ARG_CPP} is missing: run hack/build-llama.sh")
    source = ARG_CPP.read_text()
    options = []
    for m in re.finditer(r"common_arg\(\s*((?:\{[^}]*\}\s*,\s*)+)", source):
        for group in re.findall(r"\{([^}]*)\}", m[1]):
            names = tuple(re.findall(r'"(-[^"]+)"', group))
            if names:
                options.append(names)
    return options


def test_every_listed_flag_is_a_llama_server_flag() -> None:
    known = {name for names in _options() for name in names}
    unknown = sorted(set(api.REFUSED_SERVER_FLAGS + api.MANAGED_SERVER_FLAGS) - known)
    assert not unknown, f"not in {ARG_CPP}: {unknown}"


def test_every_spelling_of_a_refused_option_is_refused() -> None:
    """Refusing ``-ts`` but not ``--tensor-split`` would be no refusal at all."""
    listed = set(api.REFUSED_SERVER_FLAGS + api.MANAGED_SERVER_FLAGS)
    partial = [names for names in _options() if listed & set(names) and not set(names) <= listed]
    assert not partial, partial


@pytest.mark.parametrize(
    "option",
    ["--ubatch-size", "--fit", "--tensor-split", "--override-tensor", "--n-cpu-moe", "--cpu-moe", "--kv-unified",
     "--hf-repo", "--hf-file", "--model-url", "--lora", "--rpc", "--mmproj", "--control-vector", "--docker-repo",
     "--main-gpu", "--split-mode", "--batch-size", "--device"],
)  # fmt: skip
def test_the_issue_s_flags_are_refused_in_all_spellings(option: str) -> None:
    spellings = next(names for names in _options() if option in names)
    for flag in spellings:
        assert flag in api.REFUSED_SERVER_FLAGS, (option, flag)
    assert Path(ARG_CPP).is_file()
