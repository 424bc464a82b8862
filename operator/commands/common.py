"""What several subcommands share: reading a manifest, sizes, and errors that end a command."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import yaml
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import units


class CommandError(Exception):
    """A failure the user can fix; the CLI prints the message (no traceback) and exits 1."""


def parse_size(text: str) -> int:
    """The ``--gpu`` size (``units.parse_size``: binary units either way, as GPU vendors quote
    memory in GiB while writing GB), with the option named in the error."""
    try:
        return units.parse_size(text)
    except ValueError:
        raise CommandError(f"--gpu is {text!r}, but it must be a size such as 24GiB, 80G or 81559MiB") from None


def read_documents(path: pathlib.Path) -> list[Any]:
    """The YAML documents in ``path``; ``-`` reads standard input (``kubectl kustomize DIR | kquant plan -``)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CommandError(f"{path} is not YAML: {exc}") from None


def load_model(path: pathlib.Path) -> api.QuantizedModel:
    """The one QuantizedModel in ``path``, validated by the same models the operator uses."""
    docs = [d for d in read_documents(path) if isinstance(d, dict) and d.get("kind") == api.KIND]
    if len(docs) != 1:
        raise CommandError(f"{path} holds {len(docs)} QuantizedModel documents, but this command needs exactly one")
    try:
        return api.validate_body(docs[0])
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None


def gib(n: int | float | None) -> str:
    """A table cell in GiB (``units.gib``); ``-`` when the value is not known."""
    return "-" if n is None else units.gib(n)


def size(n: int | None) -> str:
    """A file size for humans: MiB below one GiB (a 135M model), GiB above."""
    if n is None:
        return "-"
    return f"{n / units.MiB:.2f} MiB" if n < units.GiB else units.gib(n)
