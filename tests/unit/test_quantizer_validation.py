"""The one formatter of pydantic errors: fields as the user writes them, the value, the rule."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
import pydantic.alias_generators
import pytest
from kquant.quantizer import validation


def _no_minus(value: str) -> str:
    if value.startswith("-"):
        raise ValueError(f"{value!r} is negative")
    return value


def _auto(value: str) -> str:
    if value != "auto":
        raise ValueError("must be 'auto' or a number")
    return value


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid", alias_generator=pydantic.alias_generators.to_camel, populate_by_name=True
    )


class _Item(_Model):
    gpu_layers: Annotated[str, pydantic.AfterValidator(_no_minus)] = "0"
    size_bytes: int = 0
    layers: int | Annotated[str, pydantic.AfterValidator(_auto)] = 0


class _Top(_Model):
    items: list[_Item]
    child: _Item | None = None


def _lines(data: Any, root: str = "") -> list[str]:
    with pytest.raises(pydantic.ValidationError) as caught:
        _Top.model_validate(data)
    return validation.describe_all(caught.value, root)


def test_fields_are_camel_case_with_list_indices_and_a_scalar_value() -> None:
    assert _lines({"items": [{}, {"gpuLayers": "-1"}]}) == ["items[1].gpuLayers is '-1': '-1' is negative"]


def test_an_unknown_field_is_called_a_likely_typo() -> None:
    assert _lines({"items": [{"sizeByte": 3}]}) == ["items[0].sizeByte: unknown field (misspelt?)"]


def test_no_value_is_shown_for_a_missing_field_or_a_wrong_typed_object() -> None:
    assert _lines({"child": 5}) == [
        "items: Field required", "child: Input should be a valid dictionary or instance of _Item"
    ]  # fmt: skip


def test_a_value_that_is_a_list_or_mapping_is_not_printed() -> None:
    assert _lines({"items": [{"sizeBytes": [1, 2]}]}) == ["items[0].sizeBytes: Input should be a valid integer"]


def test_root_names_an_error_of_the_whole_object() -> None:
    assert _lines([1], root="spec") == ["spec: Input should be a valid dictionary or instance of _Top"]


def test_the_validator_that_failed_is_not_named_as_a_field() -> None:
    lines = _lines({"items": [{"layers": "all"}]})
    assert "items[0].layers is 'all': must be 'auto' or a number" in lines
    assert not any("function-" in line for line in lines)


def test_field_path_leaves_out_validator_names() -> None:
    assert validation.field_path(("spec", "gpuLayers", "function-after[_no_minus(), str]")) == "spec.gpuLayers"
    assert validation.field_path(("variants", 0, "overrides", 2, "pattern")) == "variants[0].overrides[2].pattern"
    assert validation.field_path(()) == ""
