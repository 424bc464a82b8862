"""The QuantizedModel models: valid manifests, defaults and helpers."""

from __future__ import annotations

import datetime
import pathlib
import types
from typing import Any

import pydantic
import pytest
import yaml
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import constants

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted(REPO.glob("examples/*/quantizedmodel.yaml"))


def _load(path: pathlib.Path) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(path.read_text())
    return body


def test_every_example_exists_with_a_readme() -> None:
    assert [p.parent.name for p in EXAMPLES] == [
        "01-smollm2", "02-deepseek-r1-dynamic", "03-prequantized-gguf", "04-promotion", "05-deepseek-r1-modelscope",
    ]  # fmt: skip
    for path in EXAMPLES:
        assert (path.parent / "README.md").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_examples_validate_and_round_trip(path: pathlib.Path) -> None:
    body = _load(path)
    model = api.QuantizedModel.model_validate(body)
    again = api.QuantizedModel.model_validate(model.to_body())
    assert again == model
    assert model.spec.serving is not None
    assert model.spec.variant(model.spec.serving.variant).name == model.spec.serving.variant


def test_raw_kopf_style_body_with_status() -> None:
    body = _load(EXAMPLES[0])
    body["metadata"].update(namespace="ml", uid="u-1", generation=3, managedFields=[{"manager": "kubectl"}])
    body["status"] = {
        "observedGeneration": 2,
        "phase": "Quantizing",
        "progress": "q4km 2/5 quantizing 63%",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Building",
                        "lastTransitionTime": "2026-11-25T13:00:00Z", "observedGeneration": 2}],
        "variants": [{"name": "q8", "sizeBytes": 144810848, "klDivergence": 0.014, "gatePassed": True}],
        "serving": {"variant": "q8", "predictedGPUBytes": 1, "nodeGPUBytes": 2},
        "kopf": {"progress": {"anything": {"retries": 1}}},
    }  # fmt: skip
    # kopf passes read-only Mapping views, not dicts.
    model = api.QuantizedModel.model_validate(types.MappingProxyType(body))
    assert model.ref == "ml/smollm2"
    assert model.metadata.generation == 3
    assert model.status is not None
    assert model.status.phase is api.Phase.QUANTIZING
    assert model.status.variants and model.status.variants[0].kl_divergence == pytest.approx(0.014)
    assert model.status.serving and model.status.serving.predicted_gpu_bytes == 1
    patch = model.status.to_patch()
    assert patch["serving"] == {"variant": "q8", "predictedGPUBytes": 1, "nodeGPUBytes": 2}
    assert patch["conditions"][0]["lastTransitionTime"] == "2026-11-25T13:00:00Z"


def test_kopf_body() -> None:
    # What a kopf handler receives: a Body whose nested values are read-only views.
    kopf = pytest.importorskip("kopf")
    body = _load(EXAMPLES[3])
    body["metadata"]["namespace"] = "ml"
    model = api.QuantizedModel.model_validate(kopf.Body(body))
    assert model.ref == "ml/smollm2-promo"
    assert [v.name for v in model.spec.variants] == ["q8", "q6k", "q4km", "dyn"]


def test_defaults_and_snake_case_construction() -> None:
    spec = api.QuantizedModelSpec(
        source=api.Source(huggingface=api.HuggingFaceSource(repo="a/b")),
        variants=[api.Variant(name="q4", type=api.FileType.Q4_K_M, target_size_gib=None)],
        storage=api.Storage(pvc=api.PVCStorage(size="1Gi")),
        serving=api.Serving(variant="q4"),
    )
    assert spec.source.hub.revision == "main"
    assert spec.variants[0].recipe is api.Recipe.UNIFORM
    assert spec.serving is not None
    assert spec.serving.gpu_layers == "auto"
    assert spec.serving.cache_type_k is constants.CacheType.F16
    assert spec.serving.flash_attention is api.FlashAttention.AUTO
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["serving"]["cacheTypeK"] == "f16"


def test_acronym_aliases() -> None:
    fields: dict[type[pydantic.BaseModel], dict[str, str]] = {
        api.Variant: {"target_size_gib": "targetSizeGiB"},
        api.Evaluation: {"max_kl_divergence": "maxKLDivergence", "min_top1_agreement": "minTop1Agreement"},
        api.ServingStatus: {"predicted_gpu_bytes": "predictedGPUBytes", "node_gpu_bytes": "nodeGPUBytes"},
        api.Serving: {"cache_type_k": "cacheTypeK", "gpu_layers": "gpuLayers"},
    }
    for model, aliases in fields.items():
        for name, alias in aliases.items():
            assert model.model_fields[name].alias == alias


def test_types_come_from_the_one_table() -> None:
    assert api.FileType is constants.FileType
    assert api.TensorType is constants.TensorType
    assert set(api.FileType) == set(constants.FILE_TYPES)


def test_token_is_never_serialised() -> None:
    with pytest.raises(pydantic.ValidationError, match="never write a token"):
        api.HuggingFaceSource.model_validate({"repo": "a/b", "token": "hf_x"})
    source = api.HuggingFaceSource.model_validate({"repo": "a/b", "tokenSecretRef": {"name": "hf"}})
    assert "token" not in source.model_dump(by_alias=True)
    assert source.token_secret_ref is not None and source.token_secret_ref.key == "token"


def _condition(status: str, minute: int) -> api.Condition:
    return api.Condition(
        type="Ready",
        status=api.ConditionStatus(status),
        reason="Test",
        last_transition_time=datetime.datetime(2026, 11, 25, 13, minute, 0, 123456, tzinfo=datetime.UTC),
    )


def test_set_condition_keeps_transition_time_when_status_holds() -> None:
    first = api.set_condition([], _condition("False", 0))
    assert first[0].last_transition_time.microsecond == 0
    same = api.set_condition(first, _condition("False", 5).model_copy(update={"message": "still"}))
    assert same[0].last_transition_time.minute == 0 and same[0].message == "still"
    flipped = api.set_condition(same, _condition("True", 9))
    assert len(flipped) == 1 and flipped[0].last_transition_time.minute == 9
    other = api.Condition(
        type="Stalled",
        status=api.ConditionStatus.FALSE,
        reason="Fine",
        last_transition_time=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    )
    assert [c.type for c in api.set_condition(flipped, other)] == ["Ready", "Stalled"]


def test_describe_errors_names_object_and_camel_case_fields() -> None:
    body = _load(EXAMPLES[0])
    body["metadata"]["namespace"] = "ml"
    body["spec"]["serving"]["gpuLayers"] = -2
    body["spec"]["variants"][1]["tokenEmbeddingType"] = "Q4_K_M"
    with pytest.raises(ValueError) as caught:
        api.validate_body(body)
    text = str(caught.value)
    assert "QuantizedModel ml/smollm2: spec.serving.gpuLayers is -2" in text
    assert "spec.variants[1].tokenEmbeddingType is 'Q4_K_M'" in text


def test_describe_errors_names_the_field_a_cross_field_rule_blames_and_unknown_fields() -> None:
    body = _load(EXAMPLES[0])
    body["spec"]["storage"]["pvc"]["claimName"] = "shared"
    body["spec"]["variants"][0]["typeX"] = "Q4_K_M"
    with pytest.raises(pydantic.ValidationError) as caught:
        api.QuantizedModel.model_validate(body)
    # Without a body there is no object prefix: the operator's InvalidSpec condition sits on the object.
    assert sorted(api.describe_errors(caught.value)) == [
        "spec.storage.pvc.size: spec.storage.pvc sets both claimName and size: an existing claim has its own size",
        "spec.variants[0].typeX: unknown field (misspelt?)",
    ]
