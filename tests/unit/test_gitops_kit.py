"""The GitOps kit's static parts: the embedded Argo CD check is the chart's, and the tools point at real paths."""

from __future__ import annotations

import pathlib
from typing import Any

import gen_gitops
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
KIT = REPO / "examples/gitops"


def _docs(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_embedded_health_check_is_the_charts() -> None:
    (patch,) = _docs(KIT / "argocd/argocd-cm-patch.yaml")
    assert patch["kind"] == "ConfigMap" and patch["metadata"] == {"name": "argocd-cm", "namespace": "argocd"}
    embedded = patch["data"]["resource.customizations.health.kquant.dev_QuantizedModel"]
    assert embedded == (REPO / "charts/kquant/files/argocd-health.lua").read_text(), (
        "stale copy: run .venv/bin/python -P hack/gen_gitops.py"
    )
    assert gen_gitops.main(["--check"]) == 0


def test_argocd_applications_sync_the_overlays() -> None:
    apps = {a["metadata"]["name"]: a for a in _docs(KIT / "argocd/applications.yaml")}
    assert set(apps) == {"smollm2-staging", "smollm2-prod"}
    for env in ("staging", "prod"):
        spec = apps[f"smollm2-{env}"]["spec"]
        assert spec["source"]["path"] == f"examples/gitops/overlays/{env}"
        assert (REPO / spec["source"]["path"] / "kustomization.yaml").is_file()
        overlay = yaml.safe_load((REPO / spec["source"]["path"] / "kustomization.yaml").read_text())
        assert spec["destination"]["namespace"] == overlay["namespace"] == f"kquant-{env}"


def test_flux_health_checks_name_the_model_of_each_overlay() -> None:
    docs = _docs(KIT / "flux/kustomizations.yaml")
    kustomizations = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Kustomization"}
    assert set(kustomizations) == {"smollm2-staging", "smollm2-prod"}
    assert kustomizations["smollm2-prod"]["dependsOn"] == [{"name": "smollm2-staging"}]
    base = yaml.safe_load((KIT / "base/quantizedmodel.yaml").read_text())
    for env in ("staging", "prod"):
        spec = kustomizations[f"smollm2-{env}"]
        assert (REPO / spec["path"] / "kustomization.yaml").is_file()
        assert spec["healthChecks"] == [{"apiVersion": "kquant.dev/v1alpha1", "kind": "QuantizedModel",
                                         "name": base["metadata"]["name"], "namespace": spec["targetNamespace"]}]
