"""kquant's own validation refuses every manifest the API server refuses, naming the same field.

The table is shared with tests/integration/test_crd_admission.py, which sends the same manifests
to the real API server, so the pydantic validators and the CRD's CEL rules cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import invalid_manifests
import pytest
from kquant.operator.api import v1alpha1 as api

CASES = invalid_manifests.CASES
merge_patch = invalid_manifests.merge_patch


def test_table_is_big_and_every_case_is_distinct() -> None:
    assert len(CASES) >= 25
    ids = [c["id"] for c in CASES]
    assert len(set(ids)) == len(ids)
    # "Its own message": the field plus the distinguishing text differ between any two cases.
    keys = [(c["field"], c["apiserver"]) for c in CASES]
    assert len(set(keys)) == len(keys)


def test_base_is_valid() -> None:
    model = api.validate_body(invalid_manifests.BASE)
    # Parsed and written back, the base is unchanged: every field of it is one the model reads, so
    # each case's patch breaks a field that is validated rather than one that is dropped.
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == invalid_manifests.BASE


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_refused_naming_the_field(case: dict[str, Any]) -> None:
    body = merge_patch(invalid_manifests.BASE, case["patch"])
    with pytest.raises(ValueError) as caught:
        api.validate_body(body)
    message = str(caught.value)
    assert message.startswith("QuantizedModel default/")
    assert case["field"] in message, message


def test_merge_patch() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None, "d": 3}, "l": [2]}) == {
        "a": {"c": 2, "d": 3}, "l": [2]
    }  # fmt: skip
