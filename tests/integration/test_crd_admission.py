"""The real API server admits what the QuantizedModel API allows and refuses the rest.

The CRD under test is the committed, generated file. Installing it is itself a check: the API
server refuses a schema that is not structural, a CEL rule that does not compile, or one whose
estimated cost exceeds its budget. Each invalid manifest of the shared table
(invalid_manifests.yaml) must then be refused with a message naming its field, with strict field
validation as kubectl uses it; every example must be accepted and read back into the models.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import invalid_manifests
import pytest
import yaml
from fixtures import cluster_client
from kquant.operator.api import v1alpha1 as api
from kubernetes import client
from kubernetes.client import exceptions

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "kquant.dev_quantizedmodels.yaml"
EXAMPLES = sorted(REPO.glob("examples/*/quantizedmodel.yaml"))


def _dict(value: object) -> dict[str, Any]:
    """A custom-objects call's JSON body, typed."""
    assert isinstance(value, dict), value
    return value


def install_crd(api_client: client.ApiClient, path: pathlib.Path) -> str:
    """Create or replace the CRD in ``path`` and wait until it is Established; return its name."""
    body = yaml.safe_load(path.read_text())
    name: str = body["metadata"]["name"]
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(body)
    except exceptions.ApiException as error:
        if error.status != 409:
            raise
        metadata = ext.read_custom_resource_definition(name).metadata
        assert metadata is not None
        body["metadata"]["resourceVersion"] = metadata.resource_version
        ext.replace_custom_resource_definition(name, body)

    def established() -> bool:
        status = ext.read_custom_resource_definition(name).status
        conditions = (status.conditions if status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    cluster_client.wait_for(established, timeout=60, what=f"CRD {name} Established")
    return name


@pytest.fixture(scope="module")
def objects(cluster: Any) -> Iterator[client.CustomObjectsApi]:
    api_client = cluster.api_client()
    install_crd(api_client, CRD_FILE)
    custom = client.CustomObjectsApi(api_client)
    # The CRD was just (re)established: wait until the new schema serves requests.
    cluster_client.wait_for(lambda: _listable(custom), timeout=30, what="quantizedmodels served")
    yield custom


def _listable(custom: client.CustomObjectsApi) -> bool:
    try:
        custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, limit=1)
    except exceptions.ApiException:
        return False
    return True


def _create(
    custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any], validation: str = "Strict"
) -> dict[str, Any]:
    return _dict(
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body, field_validation=validation
        )
    )


def _refusal(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any], validation: str) -> str:
    with pytest.raises(exceptions.ApiException) as caught:
        _create(custom, namespace, body, validation)
    assert caught.value.status in (400, 422), caught.value.body
    message: str = json.loads(caught.value.body or "{}")["message"]
    return message


@pytest.mark.parametrize("case", invalid_manifests.CASES, ids=[c["id"] for c in invalid_manifests.CASES])
def test_invalid_manifest_is_refused_naming_the_field(
    objects: client.CustomObjectsApi, namespace: str, case: dict[str, Any]
) -> None:
    body = invalid_manifests.merge_patch(invalid_manifests.BASE, case["patch"])
    message = _refusal(objects, namespace, body, "Strict")
    assert case["field"] in message, message
    assert case["apiserver"] in message, message


def test_base_of_the_table_is_accepted(objects: client.CustomObjectsApi, namespace: str) -> None:
    created = _create(objects, namespace, invalid_manifests.BASE)
    assert created["metadata"]["generation"] == 1


def test_a_bnb_variant_beside_the_served_gguf_one_is_accepted(
    objects: client.CustomObjectsApi, namespace: str
) -> None:
    nf4 = {"name": "nf4", "format": "bnb-nf4", "bnb": {"doubleQuant": False, "computeDtype": "float16"}}
    variants = [*invalid_manifests.BASE["spec"]["variants"], nf4, {"name": "fp4", "format": "bnb-fp4"}]
    body = invalid_manifests.merge_patch(invalid_manifests.BASE, {"spec": {"variants": variants}})
    created = _create(objects, namespace, body)
    model = api.QuantizedModel.model_validate(created)
    assert model.spec.variant("nf4").format is api.VariantFormat.BNB_NF4
    assert model.spec.variant("nf4").bnb == api.BnbSettings(double_quant=False, compute_dtype=api.ComputeDtype.FLOAT16)
    assert model.spec.variant("fp4").bnb is None and model.spec.variant("q8").format is api.VariantFormat.GGUF


def test_token_is_refused_even_without_strict_validation(objects: client.CustomObjectsApi, namespace: str) -> None:
    # Clients that do not ask for strict validation get unknown fields silently dropped; a
    # token must not be one of them, so the schema declares the field in order to refuse it.
    token = {"spec": {"source": {"huggingface": {"token": "hf_secret"}}}}
    body = invalid_manifests.merge_patch(invalid_manifests.BASE, token)
    message = _refusal(objects, namespace, body, "Ignore")
    assert "spec.source.huggingface.token" in message and "never write a token" in message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_is_accepted_and_reads_back(
    objects: client.CustomObjectsApi, namespace: str, path: pathlib.Path
) -> None:
    body = yaml.safe_load(path.read_text())
    created = _create(objects, namespace, body)
    model = api.QuantizedModel.model_validate(created)
    assert model.spec == api.QuantizedModel.model_validate(body).spec
    assert model.metadata.namespace == namespace


def _full_status(generation: int) -> api.QuantizedModelStatus:
    now = datetime.datetime(2026, 11, 25, 13, 0, tzinfo=datetime.UTC)
    return api.QuantizedModelStatus(
        observed_generation=generation,
        phase=api.Phase.READY,
        progress="2/2 variants built",
        conditions=[
            api.Condition(type="Ready", status=api.ConditionStatus.TRUE, reason="Serving",
                          message="q4km serves", last_transition_time=now, observed_generation=generation),
            api.Condition(type="Quantized", status=api.ConditionStatus.TRUE, reason="Built",
                          last_transition_time=now, observed_generation=generation),
        ],
        variants=[
            api.VariantStatus(name="q8", digest="sha256:" + "a" * 16, type="Q8_0", size_bytes=144810848,
                              sha256="b" * 64, bits_per_weight=8.5, kl_divergence=0.014, perplexity=16.46,
                              top1_agreement=0.956, gate_passed=True, path="/models/smollm2/q8.gguf"),
            api.VariantStatus(name="q4km", type="Q4_K_M", size_bytes=105453920, gate_passed=True),
            api.VariantStatus(name="nf4", type="bnb-nf4", format=api.VariantFormat.BNB_NF4, size_bytes=115404514,
                              kl_divergence=0.2566, gate_passed=True, path="/var/lib/kquant/698d280430d801ac/nf4"),
        ],
        serving=api.ServingStatus(variant="q4km", size="100.6MiB", gpu_layers=31, total_layers=31,
                                  predicted_gpu_bytes=1 << 30, node_gpu_bytes=80 << 30,
                                  endpoint="http://smollm2.ns.svc:8080/v1", explanation="all layers fit",
                                  ready_replicas=1),
    )  # fmt: skip


def test_status_written_by_the_models_survives_the_server(objects: client.CustomObjectsApi, namespace: str) -> None:
    created = _create(objects, namespace, yaml.safe_load(EXAMPLES[0].read_text()))
    status = _full_status(created["metadata"]["generation"])
    stored = _dict(
        objects.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "smollm2", {"status": status.to_patch()}
        )
    )
    # Nothing was pruned: every field the models write is in the schema.
    assert api.QuantizedModel.model_validate(stored).status == status
    # Status is a subresource: a spec update cannot change it, a status patch cannot change spec.
    assert stored["metadata"]["generation"] == created["metadata"]["generation"]


def test_printer_columns_and_field_selectors(objects: client.CustomObjectsApi, namespace: str) -> None:
    created = _create(objects, namespace, yaml.safe_load(EXAMPLES[0].read_text()))
    objects.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "smollm2",
        {"status": _full_status(created["metadata"]["generation"]).to_patch()},
    )  # fmt: skip
    # What `kubectl get qm` shows: the server renders the printer columns as a Table.
    table = _dict(objects.list_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL,
        _headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    ))  # fmt: skip
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names == ["Name", "Phase", "Variant", "Size", "Ready", "Progress", "Endpoint", "Age"]
    row = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert (row["Phase"], row["Variant"], row["Size"], row["Ready"]) == ("Ready", "q4km", "100.6MiB", "True")
    ready, failed = (
        _dict(objects.list_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, field_selector=f"status.phase={phase}"
        ))
        for phase in ("Ready", "Failed")
    )  # fmt: skip
    assert [o["metadata"]["name"] for o in ready["items"]] == ["smollm2"]
    assert failed["items"] == []


def test_short_name_and_categories(cluster: Any, objects: client.CustomObjectsApi) -> None:
    resources = client.CustomObjectsApi(cluster.api_client()).get_api_resources(api.GROUP, api.VERSION)
    found = {r.name: r for r in resources.resources}
    assert found[api.PLURAL].short_names == ["qm"]
    assert set(found[api.PLURAL].categories or ()) == set(api.CATEGORIES)
    assert f"{api.PLURAL}/status" in found
