"""docs/api-reference.md is generated from the API models and must not go stale (like the CRD)."""

from __future__ import annotations

import gen_api_docs
from kquant.operator.api import v1alpha1 as api


def test_committed_reference_is_current() -> None:
    assert gen_api_docs.main(["--check"]) == 0, "run .venv/bin/python -P hack/gen_api_docs.py"


def test_every_model_and_field_is_documented() -> None:
    text = gen_api_docs.render()
    for model in (api.QuantizedModelSpec, api.Variant, api.Serving, api.Evaluation, api.QuantizedModelStatus,
                  api.VariantStatus, api.ServingStatus):  # fmt: skip
        assert f"\n## {model.__name__}\n" in text
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, f"{model.__name__}.{name}"
    # Enums list every value, CEL rules their messages, camelCase acronyms as users write them.
    assert "`IQ1_S`" in text and "`Q4_K_M`" in text and "`Ready`" in text
    assert "spec.serving.variant must name one of spec.variants" in text
    assert "| `targetSizeGiB` |" in text and "| `maxKLDivergence` |" in text
