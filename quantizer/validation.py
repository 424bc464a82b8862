"""Pydantic validation errors as lines a user can act on: the one formatter kquant's models share.

Both layers validate what a person wrote: the operator a QuantizedModel, the quantizer its build
spec. Pydantic names a bad field by a location tuple that mixes field names with list indices and
with the names of validators, and words its rule after its own internals (``Value error, ...``),
so both layers render an error here, the same way: one line per error, naming the field as the
user writes it (camelCase, since the models validate by alias; ``[i]`` for list indices), then
the value when it is a scalar, then the rule. Pure, and in the quantizer because that is the
lowest layer: the operator imports it from here (its API module adds the object's name and the
fields of its cross-field rules), never the reverse.
"""

from __future__ import annotations

from collections.abc import Iterable

import pydantic
import pydantic_core

_INPUT_IS_THE_PARENT = frozenset({"missing", "model_type", "dict_type"})
"""Error types whose ``input`` is the enclosing object rather than the field's own value: a missing
field has no value, and a wrong-typed object would be printed whole."""


def field_path(loc: Iterable[int | str]) -> str:
    """``("spec", "variants", 1, "type")`` as ``spec.variants[1].type``.

    Parts such as ``function-after[_check(), str]`` name the validator that failed, not a field
    the user can find in a manifest, so they are left out.
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith("function-"):
            path += f".{part}" if path else part
    return path


def describe(error: pydantic_core.ErrorDetails, root: str = "") -> str:
    """One error as ``field.path is <value>: rule``, or ``field.path: rule`` when the value is not
    a scalar. ``root`` names the field when the error is about the whole object (an empty path).

    An unknown field is almost always a typo of a known one, which the user should look for, so
    it reads "unknown field (misspelt?)" rather than pydantic's "Extra inputs are not permitted".
    """
    path = field_path(error["loc"]) or root
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown field (misspelt?)"
    rule = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if error["type"] in _INPUT_IS_THE_PARENT or isinstance(value, dict | list):
        return f"{path}: {rule}"
    return f"{path} is {value!r}: {rule}"


def describe_all(error: pydantic.ValidationError, root: str = "") -> list[str]:
    """Every error of one validation, each as :func:`describe` writes it, in pydantic's order."""
    return [describe(item, root) for item in error.errors(include_url=False)]
