"""The chart's values documentation: values.schema.json and the README's values table come from
the comments in values.yaml (hack/gen_chart_docs.py), cover every key, and refuse a misspelt one."""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import gen_chart_docs
import pytest
import yaml

VALUES = yaml.safe_load(gen_chart_docs.VALUES.read_text(encoding="utf-8"))
SCHEMA: dict[str, Any] = json.loads(gen_chart_docs.SCHEMA_TARGET.read_text(encoding="utf-8"))
OPEN_OBJECTS = {"resources", "podSecurityContext", "securityContext", "affinity",
                "networkPolicy.metricsScraper.namespaceSelector", "networkPolicy.metricsScraper.podSelector"}
"""Kubernetes objects passed through as is: the API server validates them, the schema does not."""


def _leaves(values: dict[str, Any], node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, value, schema node) of every key the chart itself defines, down to open objects."""
    for key, value in values.items():
        child = node["properties"].get(key)
        if isinstance(value, dict) and child is not None and "properties" in child:
            yield from _leaves(value, child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, child


def _objects(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if node.get("type") == "object":
        yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _objects(child, f"{path}.{key}" if path else key)


def _with(path: str, value: Any) -> dict[str, Any]:
    """The chart's defaults with one key, dotted, set to ``value``."""
    values = copy.deepcopy(VALUES)
    *parents, last = path.split(".")
    target = values
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value
    return values


def test_committed_files_are_current() -> None:
    assert gen_chart_docs.main(["--check"]) == 0, "run .venv/bin/python -P hack/gen_chart_docs.py"


def test_check_names_the_stale_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    values = tmp_path / "values.yaml"
    values.write_text("# How many.\nreplicaCount: 1\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# chart\n\n{gen_chart_docs.BEGIN}\n{gen_chart_docs.END}\n")
    schema = tmp_path / "values.schema.json"
    for name, path in (("ROOT", tmp_path), ("VALUES", values), ("README_TARGET", readme), ("SCHEMA_TARGET", schema)):
        monkeypatch.setattr(gen_chart_docs, name, path)
    assert gen_chart_docs.main([]) == 0
    assert "| `replicaCount` | integer | `1` | How many. |" in readme.read_text()
    assert gen_chart_docs.main(["--check"]) == 0
    values.write_text("# How many.\nreplicaCount: 2\n")
    assert gen_chart_docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md is stale" in err and "values.schema.json is stale" in err
    assert json.loads(schema.read_text())["properties"]["replicaCount"]["default"] == 1, "--check writes nothing"


def test_every_key_has_a_description_and_its_default() -> None:
    leaves = list(_leaves(VALUES, SCHEMA))
    assert len(leaves) > 30
    for path, value, node in leaves:
        assert node is not None, f"{path} is missing from values.schema.json"
        assert node["description"].strip(), f"{path} has no description"
        assert node["default"] == value, path
    for path, node in _objects(SCHEMA):
        assert node["description"].strip(), f"{path or 'the root'} has no description"


def test_every_object_the_chart_defines_refuses_unknown_keys() -> None:
    opened = set()
    for path, node in _objects(SCHEMA):
        entries = node.get("additionalProperties")
        assert entries is not None, f"{path or 'the root'} says nothing about unknown keys"
        if entries is True:
            opened.add(path)
        elif entries is not False:
            assert entries == {"type": "string"}, f"{path}: a map of strings (labels, annotations)"
    assert opened == OPEN_OBJECTS


def _unknown_keys(values: dict[str, Any], node: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of ``values`` that ``additionalProperties: false`` refuses (what Helm reports as
    "additional properties ... not allowed"), without a JSON Schema library."""
    unknown = []
    for key, value in values.items():
        child = node.get("properties", {}).get(key)
        if child is None and node.get("additionalProperties") is False:
            unknown.append(prefix + key)
        elif child is not None and isinstance(value, dict):
            unknown += _unknown_keys(value, child, f"{prefix}{key}.")
    return unknown


def test_misspelt_keys_are_refused() -> None:
    assert _unknown_keys(VALUES, SCHEMA) == []
    for path in ("replicas", "peering.enabeld", "metrics.serviceMonitor.intervall", "image.tags", "rbac.enabled"):
        assert _unknown_keys(_with(path, "x"), SCHEMA) == [path]
    for path in ("resources.limits.cpu", "podSecurityContext.supplementalGroups", "podLabels.team"):
        assert _unknown_keys(_with(path, "x"), SCHEMA) == [], f"{path} is a Kubernetes field or a map entry"


def test_schema_accepts_what_installs_pass_and_refuses_bad_values() -> None:
    # jsonschema is no dependency of kquant's; where it is installed this checks types, enums and
    # patterns as Helm does.
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(SCHEMA)
    assert not list(validator.iter_errors(VALUES))
    # What tests/e2e/test_helm_chart.py, hack/demo.py and docs/operations.md pass to helm.
    for path, value in (("watchNamespaces", ["ml", "dev"]), ("replicaCount", 2), ("peering.priority", 7),
                        ("fullnameOverride", "x" * 80), ("peering.name", "kq-abc123"), ("healthPort", 40123),
                        ("quantizerImage", "ghcr.io/kquant-dev/quantizer:0.1.0"),
                        ("metrics.serviceMonitor.enabled", True), ("resources.limits.cpu", 1),
                        ("podSecurityContext.supplementalGroups", [1000])):  # fmt: skip
        assert not list(validator.iter_errors(_with(path, value))), path
    for path, value in (("replicas", 2), ("peering.enabeld", False), ("logLevel", "trace"),
                        ("image.pullPolicy", "always"), ("watchNamespaces", ["ML"]),
                        ("metrics.serviceMonitor.interval", "30 s"), ("peering.priority", "high")):  # fmt: skip
        assert list(validator.iter_errors(_with(path, value))), f"{path}={value!r} was accepted"


def test_every_example_is_a_valid_value() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(SCHEMA)
    examples = [(path, e) for path, _, node in _leaves(VALUES, SCHEMA) for e in node.get("examples", [])]
    assert len(examples) > 20
    for path, example in examples:
        errors = [e.message for e in validator.iter_errors(_with(path, example))]
        assert not errors, f"{path}: example {example!r}: {errors}"


def test_undocumented_keys_and_unknown_tags_are_refused() -> None:
    with pytest.raises(gen_chart_docs.ValuesDocError, match=r"image\.tag has no description"):
        gen_chart_docs.schema("# The image.\nimage:\n  # Where from.\n  repository: x\n  tag: ''\n")
    with pytest.raises(gen_chart_docs.ValuesDocError, match="has no description"):
        gen_chart_docs.schema("# A header, then a blank line.\n\nreplicaCount: 1\n")
    with pytest.raises(gen_chart_docs.ValuesDocError, match="unknown tag '@exmaple'"):
        gen_chart_docs.schema("# How many.\n# @exmaple 2\nreplicaCount: 1\n")


def test_an_optional_key_is_documented_without_a_default() -> None:
    text = (
        "# The image.\n"
        "image:\n"
        "  # Where from.\n"
        "  repository: x\n"
        "  # Pin the image by digest instead of its tag.\n"
        "  # @optional\n"
        "  # digest: sha256:0123\n"
        "# How many.\n"
        "replicaCount: 1\n"
    )
    schema = gen_chart_docs.schema(text)
    digest = schema["properties"]["image"]["properties"]["digest"]
    assert digest == {"description": "Pin the image by digest instead of its tag.", "type": "string",
                      "examples": ["sha256:0123"]}  # fmt: skip
    assert schema["properties"]["replicaCount"]["description"] == "How many."
    table = gen_chart_docs.table(schema)
    row = '| `image.digest` | string | unset | Pin the image by digest instead of its tag. Example: `"sha256:0123"`. |'
    assert row in table
