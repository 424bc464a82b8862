"""The GitOps overlays render with kustomize, serve the right variant, and the API server accepts them.

kustomize itself is not installed here; ``kubectl kustomize`` is the same code (kustomize v5).
The server-side dry run goes through the real API server with the generated CRD, so the OpenAPI
schema and every CEL rule judge the rendered objects, as they would when Argo CD or Flux applies them.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from fixtures import cluster_client
from kquant.operator import cli
from kquant.operator.api import v1alpha1 as api
from kubernetes import client
from kubernetes.client import exceptions
from typer.testing import CliRunner

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
KIT = REPO / "examples/gitops"
EXPECTED = {"staging": ("kquant-staging", "q4km", 1), "prod": ("kquant-prod", "q8", 2)}


def render(overlay: pathlib.Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) must be on PATH"
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def custom(cluster: cluster_client.Cluster, crd: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client())


@pytest.mark.parametrize("env", sorted(EXPECTED))
def test_overlay_serves_its_variant(env: str) -> None:
    (qm,) = render(KIT / "overlays" / env)
    namespace, variant, replicas = EXPECTED[env]
    model = api.QuantizedModel.model_validate(qm)
    assert model.metadata.namespace == namespace
    assert model.spec.serving is not None
    assert (model.spec.serving.variant, model.spec.serving.replicas) == (variant, replicas)
    # The overlays change serving only: what is built (and its digests) is the same everywhere.
    base = api.QuantizedModel.model_validate(yaml.safe_load((KIT / "base/quantizedmodel.yaml").read_text()))
    assert model.spec.model_dump(exclude={"serving"}) == base.spec.model_dump(exclude={"serving"})


@pytest.mark.parametrize("env", sorted(EXPECTED))
def test_api_server_accepts_the_rendered_overlay(custom: client.CustomObjectsApi, namespace: str, env: str) -> None:
    (qm,) = render(KIT / "overlays" / env)
    qm["metadata"]["namespace"] = namespace  # the test's namespace stands in for kquant-<env>
    accepted = custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, qm,
                                                      dry_run="All", field_validation="Strict")  # fmt: skip
    assert accepted["spec"]["serving"]["variant"] == EXPECTED[env][1]
    # Nothing was stored: a dry run only asks the schema and the CEL rules.
    assert custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["items"] == []


def test_rendered_overlay_pipes_into_kquant_plan() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl
    rendered = subprocess.run([kubectl, "kustomize", str(KIT / "overlays/prod")], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    result = CliRunner().invoke(cli.app, ["plan", "-", "--gpu", "24GiB", "--gpus", "1", "--json"], input=rendered)
    assert result.exit_code == 0, result.output
    assert '"variant": "q8"' in result.output and "SmolLM2" in result.output


def test_a_promotion_renders_and_a_bad_one_is_refused(custom: client.CustomObjectsApi, namespace: str,
                                                      tmp_path: pathlib.Path) -> None:  # fmt: skip
    kit = tmp_path / "gitops"
    shutil.copytree(KIT, kit)
    prod = kit / "overlays/prod/serving.yaml"
    base = kit / "base/quantizedmodel.yaml"
    result = CliRunner().invoke(cli.app, ["promote", str(prod), "--variant", "q4km", "--base", str(base)])
    assert result.exit_code == 0, result.output
    (qm,) = render(kit / "overlays/prod")
    assert qm["spec"]["serving"]["variant"] == "q4km"
    # A hand edit that skips the CLI's check is stopped by the API server's CEL rule.
    prod.write_text(prod.read_text().replace("variant: q4km", "variant: q2k"))
    (bad,) = render(kit / "overlays/prod")
    bad["metadata"]["namespace"] = namespace
    with pytest.raises(exceptions.ApiException) as refused:
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, bad, dry_run="All")
    assert refused.value.status == 422
    assert "spec.serving.variant must name one of spec.variants" in str(refused.value.body)
