"""``kquant promote FILE --variant X``: the one-line Git change that promotes a variant.

Promotion in kquant is an edit of ``spec.serving.variant`` that Argo CD or Flux syncs. The edit
must keep the file as its author wrote it (comments, key order, quoting, blank lines), so that the
diff in review is exactly one line; a YAML round trip through a parser would reflow the file. The
edit is therefore a line edit, found by walking the mapping keys by indentation, and checked
afterwards by parsing both versions: the new document must equal the old one with only that
field changed, or nothing is written.

The variant must be declared in ``spec.variants`` (the API server refuses anything else; failing
here is earlier and clearer). A kustomize patch that sets only ``spec.serving`` has no variants
list: ``--base`` names the manifest that declares them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

import yaml
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import common

PATH = ("spec", "serving", "variant")
_KEY = re.compile(r"^(?P<indent>\s*)(?P<dash>-\s+)?(?P<key>[A-Za-z_][\w.-]*)\s*:(?P<rest>.*)$")
_VALUE = re.compile(r"^(?P<pre>\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s#]+)?(?P<post>.*)$")
_FLOW = re.compile(r"(?P<pre>[{,]\s*variant\s*:\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^,}\s]+)")


@dataclasses.dataclass(frozen=True)
class Promotion:
    old_variant: str | None
    new_variant: str
    text: str
    """The whole file after the edit."""

    @property
    def changed(self) -> bool:
        return self.old_variant != self.new_variant


def _documents(text: str) -> list[tuple[int, int]]:
    """(first line, end line) of each YAML document in ``text``, split at ``---`` lines."""
    lines = text.splitlines(keepends=True)
    bounds, start = [], 0
    for i, line in enumerate(lines):
        if line.startswith("---"):
            if i > start:
                bounds.append((start, i))
            start = i + 1
    bounds.append((start, len(lines)))
    return bounds


def _quoted_like(old: str, new: str) -> str:
    if old[:1] in ("'", '"'):
        return f"{old[0]}{new}{old[0]}"
    return new


def _edit_line(line: str, rest_start: int, new: str) -> str:
    """Replace the scalar after ``key:`` in ``line`` (starting at ``rest_start``), keeping its comment."""
    rest = line[rest_start:]
    match = _VALUE.match(rest.rstrip("\n"))
    assert match is not None  # the pattern accepts any line
    old = match["value"]
    if old is None or old.startswith(("{", "[", "&", "*", "|", ">")):
        raise common.CommandError("spec.serving.variant is not a plain scalar on its line; edit it by hand")
    newline = "\n" if line.endswith("\n") else ""
    value = _quoted_like(old, new)
    post = match["post"]
    comment = re.match(r"^( +)#", post)
    if comment is not None:
        # Keep an aligned trailing comment in its column where the padding allows.
        pad = max(1, len(comment[1]) - (len(value) - len(old)))
        post = " " * pad + post[len(comment[1]):]
    return line[:rest_start] + match["pre"] + value + post + newline


def _find_and_edit(lines: list[str], new: str) -> bool:
    """Edit ``spec.serving.variant`` in one document's lines in place; False when it is not there."""
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _KEY.match(line.rstrip("\n"))
        if match is None:
            continue
        indent = len(match["indent"])
        if match["dash"]:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, "[]"))
            indent += len(match["dash"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(key for _, key in stack), match["key"])
        if path == PATH:
            lines[i] = _edit_line(line, match.end("key") + line[match.end("key"):].index(":") + 1, new)
            return True
        if path == PATH[:2]:
            flow = _FLOW.search(line)
            if flow is not None:
                value = _quoted_like(flow["value"], new)
                lines[i] = line[: flow.start("value")] + value + line[flow.end("value"):]
                return True
        stack.append((indent, match["key"]))
    return False


def _get(doc: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def declared_variants(doc: Any, base: Sequence[Any] = ()) -> list[str]:
    """Names in ``spec.variants`` of ``doc``, or of the first base document that has them."""
    for candidate in (doc, *base):
        variants = _get(candidate, ("spec", "variants"))
        if isinstance(variants, list):
            return [str(v.get("name")) for v in variants if isinstance(v, dict)]
    return []


def promote(text: str, variant: str, base: Sequence[Any] = (), where: str = "the manifest") -> Promotion:
    """``text`` with ``spec.serving.variant`` of its QuantizedModel set to ``variant`` (pure)."""
    lines = text.splitlines(keepends=True)
    for first, end in _documents(text):
        try:
            doc = yaml.safe_load("".join(lines[first:end]))
        except yaml.YAMLError as exc:
            raise common.CommandError(f"{where} is not YAML: {exc}") from None
        if not (isinstance(doc, dict) and doc.get("kind") == api.KIND):
            continue
        name = _get(doc, ("metadata", "name")) or "?"
        declared = declared_variants(doc, base)
        if not declared:
            raise common.CommandError(
                f"QuantizedModel {name} in {where} has no spec.variants; "
                "pass --base with the manifest that declares them"
            )
        if variant not in declared:
            raise common.CommandError(
                f"QuantizedModel {name}: spec.serving.variant cannot be {variant!r}: spec.variants declares only "
                f"{', '.join(declared)}"
            )
        old = _get(doc, PATH)
        if old == variant:
            return Promotion(old, variant, text)
        part = lines[first:end]
        if not _find_and_edit(part, variant):
            raise common.CommandError(
                f"QuantizedModel {name} in {where} has no spec.serving.variant line to edit; add spec.serving first"
            )
        _check(doc, yaml.safe_load("".join(part)), variant)
        return Promotion(old, variant, "".join([*lines[:first], *part, *lines[end:]]))
    raise common.CommandError(f"{where} holds no QuantizedModel")


def _check(before: Any, after: Any, variant: str) -> None:
    """The edit changed exactly one field: anything else is a bug here, never written to the file."""
    expected = copy.deepcopy(before)
    expected["spec"]["serving"]["variant"] = variant
    if after != expected:
        raise common.CommandError("the line edit would change more than spec.serving.variant; edit the file by hand")


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{path}", tofile=f"b/{path}"))  # fmt: skip
