"""Resumable steps: a Job that dies half-way (node drained, pod evicted) starts over cheaply.

A step declares its inputs as a small JSON-able mapping (upstream digests, settings, file sizes)
and the files it produces. After a step succeeds, a stamp file records the digest of its inputs;
on the next run the step is skipped when every output exists and the stamp holds the same digest.
An output without a stamp is never trusted (the process may have died while writing it), and a
step removes its stale stamp before it starts, so a crash mid-step always reruns the step.

The pipeline runs its steps one by one in the order it writes out: the order is part of its
definition, not derived.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
"""Receives the fraction (0..1) of the running step that is done."""


class StepKind(enum.StrEnum):
    """The pipeline's phases; the names appear in progress strings and in the report."""

    FETCH = "fetching"
    CONVERT = "converting"
    CALIBRATE = "calibrating"
    REFERENCE = "referencing"
    PLAN = "planning"
    QUANTIZE = "quantizing"
    EVALUATE = "evaluating"
    PUBLISH = "publishing"


@dataclasses.dataclass(frozen=True)
class Step:
    """One unit of resumable work."""

    key: str
    """Unique in a pipeline and safe as a file name (``quantize-q4km``)."""
    kind: StepKind
    inputs: Mapping[str, Any]
    outputs: tuple[Path, ...]
    run: Callable[[Progress], None]
    variant: str | None = None

    @property
    def digest(self) -> str:
        return inputs_digest(self.inputs)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    key: str
    kind: StepKind
    variant: str | None
    skipped: bool
    seconds: float


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``inputs``; paths and enums are written as strings."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """A cheap stand-in for a file's content in step inputs: name, size and mtime."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class StampStore:
    """Stamp files, one per step key, in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def read(self, key: str) -> str | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        digest = data.get("digest") if isinstance(data, dict) else None
        return digest if isinstance(digest, str) else None

    def write(self, key: str, digest: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps({"digest": digest, "time": time.time()}))
        tmp.replace(self._path(key))

    def clear(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def is_fresh(step: Step, stamps: StampStore) -> bool:
    """True when the step's work is done: all outputs exist and the stamp matches its inputs."""
    return stamps.read(step.key) == step.digest and all(p.exists() for p in step.outputs)


StepListener = Callable[[Step, float], None]
"""Gets (step, fraction done) at the start (0.0), during, and at the end (1.0) of a step."""


def run_step(step: Step, stamps: StampStore, listener: StepListener | None = None) -> StepOutcome:
    """Run one step unless it is fresh; stamp it when it succeeds."""

    def report(fraction: float) -> None:
        if listener is not None:
            listener(step, min(max(fraction, 0.0), 1.0))

    if is_fresh(step, stamps):
        log.info("step %s: up to date, skipped", step.key)
        report(1.0)
        return StepOutcome(step.key, step.kind, step.variant, skipped=True, seconds=0.0)
    stamps.clear(step.key)
    report(0.0)
    start = time.perf_counter()
    step.run(report)
    seconds = time.perf_counter() - start
    missing = [str(p) for p in step.outputs if not p.exists()]
    if missing:
        # A bug in the step, not a user error: say so rather than stamping a lie.
        raise RuntimeError(f"step {step.key} finished but did not write {', '.join(missing)}")
    stamps.write(step.key, step.digest)
    report(1.0)
    log.info("step %s: done in %.1f s", step.key, seconds)
    return StepOutcome(step.key, step.kind, step.variant, skipped=False, seconds=seconds)
