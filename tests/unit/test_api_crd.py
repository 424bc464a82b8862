"""The generated CRD: up to date, structural, and carrying the rules and columns it promises."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import gen_crds
import pytest
import yaml
from kquant.operator.api import v1alpha1 as api

REPO = pathlib.Path(__file__).resolve().parents[2]


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(gen_crds.TARGETS[0].read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")


def test_committed_crds_are_up_to_date() -> None:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-P", str(REPO / "hack" / "gen_crds.py"), "--check"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_mode_reports_a_difference(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text(gen_crds.render().replace("maxItems: 16", "maxItems: 17", 1))
    monkeypatch.setattr(gen_crds, "TARGETS", (stale,))
    monkeypatch.setattr(gen_crds, "ROOT", tmp_path)
    assert gen_crds.main(["--check"]) == 1
    assert "+" in capsys.readouterr().out
    assert stale.read_text() != gen_crds.render()
    assert gen_crds.main([]) == 0
    assert stale.read_text() == gen_crds.render()


def test_chart_and_crds_dir_hold_the_same_file() -> None:
    first, second = gen_crds.TARGETS
    assert first.read_text() == second.read_text()


def test_schema_is_structural_and_documented() -> None:
    for path, node in _nodes(_schema()):
        assert not {"anyOf", "oneOf", "allOf", "$ref", "default", "title"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("additionalProperties") is not None:
            assert "properties" not in node, path
        if path.startswith(".spec") and not path.endswith("[]") and not path.endswith(".*"):
            assert node.get("description"), f"{path} has no description"


def test_cel_cost_is_bounded() -> None:
    # Every list and every string below a CEL rule needs a bound, or the API server's cost
    # estimate explodes; the real server checks this in the integration tier.
    for path, node in _nodes(_schema()):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, path


def test_names_columns_and_subresource() -> None:
    crd = yaml.safe_load(gen_crds.TARGETS[0].read_text())
    assert crd["metadata"]["name"] == "quantizedmodels.kquant.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "QuantizedModel",
        "quantizedmodels",
        ["qm"],
    )
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Variant"] == ".status.serving.variant"
    assert columns["Size"] == ".status.serving.size"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_gpu_layers_is_int_or_string_and_types_are_enums() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    gpu_layers = spec["serving"]["properties"]["gpuLayers"]
    assert gpu_layers["x-kubernetes-int-or-string"] is True
    variant = spec["variants"]["items"]["properties"]
    assert variant["type"]["enum"] == [t.value for t in api.FileType]
    assert variant["overrides"]["items"]["properties"]["type"]["enum"] == [t.value for t in api.TensorType]
    assert spec["variants"]["x-kubernetes-list-type"] == "map"


def test_cel_rules_present() -> None:
    text = gen_crds.TARGETS[0].read_text()
    for needle in (
        "self.variants.exists(v, v.name == self.serving.variant)",
        "(has(self.modelscope) ? 1 : 0)",
        "!has(self.token)",
        "type(''.matches(self)) == bool",
        "isQuantity(self)",
    ):
        assert needle in text


def test_structural_refuses_a_union() -> None:
    with pytest.raises(gen_crds.NotStructuralError, match="anyOf"):
        gen_crds.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
