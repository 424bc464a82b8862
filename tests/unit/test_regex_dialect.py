"""Tensor patterns are checked in the dialect llama.cpp runs (std::regex, ECMAScript), pure part.

tests/integration/test_regex_dialect_stdregex.py compiles the same tables with the real std::regex."""

from __future__ import annotations

import pytest
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import regex_dialect, settings
from regex_cases import ACCEPTED, REFUSED


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_common_subset_is_accepted(pattern: str) -> None:
    assert regex_dialect.ecmascript_error(pattern) is None


@pytest.mark.parametrize(("pattern", "why"), REFUSED.items())
def test_other_dialects_are_refused_with_the_reason(pattern: str, why: str) -> None:
    error = regex_dialect.ecmascript_error(pattern)
    assert error is not None and why in error


def test_both_validators_use_the_dialect() -> None:
    """The operator's API model and the quantizer's own spec refuse the same pattern, naming llama.cpp."""
    with pytest.raises(ValueError, match=r"for llama.cpp.s std::regex \(ECMAScript\): .\(\?i\)."):
        api.TensorOverride.model_validate({"pattern": "(?i)blk", "type": "Q8_0"})
    with pytest.raises(ValueError, match=r"valid regular expression for llama\.cpp"):
        settings.TensorOverride.model_validate({"pattern": "(?i)blk", "type": "Q8_0"})
