"""The table of invalid manifests (integration/invalid_manifests.yaml) that the pydantic models
(tests/unit/test_api_invalid.py) and the real API server (tests/integration/test_crd_admission.py)
must both refuse, each with its own message, and the merge patch that makes each case from the base."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import yaml

TABLE: dict[str, Any] = yaml.safe_load(
    (pathlib.Path(__file__).resolve().parent / "integration" / "invalid_manifests.yaml").read_text())
BASE: dict[str, Any] = TABLE["base"]
CASES: list[dict[str, Any]] = TABLE["cases"]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
