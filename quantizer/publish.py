"""Step 7: put a variant where the serving pods will find it, atomically.

Layout on the storage volume::

    <root>/<digest>/<variant>.gguf            (or <variant>-00001-of-0000N.gguf ...)
    <root>/<digest>/report.json               written last: its presence means "complete"
    <root>/<digest>/.partial/                 staging: the quantizer writes here first
    <root>/<digest>/<variant>/                a bnb variant: a Hugging Face folder (publish_folder)

Everything is written into ``.partial/`` (same filesystem, so ``rename`` is atomic) and moved to
its final name only after the report is complete; a crash, a full disk or a failed check leaves
nothing under a final name. ``report.json`` moves last, so a reader that sees it sees the files.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kquant.quantizer import fetch, gguf_facts, report

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
STAGING = ".partial"


class PublishError(Exception):
    """The variant could not be published; nothing was left under a final name."""


def variant_dir(root: Path, digest: str) -> Path:
    return root / digest


def staging_dir(root: Path, digest: str) -> Path:
    return variant_dir(root, digest) / STAGING


def is_published(root: Path, digest: str) -> bool:
    return (variant_dir(root, digest) / REPORT_NAME).is_file()


def read_facts(path: Path) -> dict[str, Any]:
    """The GGUF header facts the offload planner needs, as JSON."""
    try:
        facts = gguf_facts.read_facts(path)
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError on garbage
        raise PublishError(f"{path.name} is not a readable GGUF file: {exc}") from None
    data: dict[str, Any] = facts.model_dump(mode="json", by_alias=True)
    return data


def hash_files(paths: Sequence[Path], threads: int | None = None) -> list[str]:
    """sha256 of every file, in order, several at a time: hashlib releases the GIL on large
    buffers, so threads hash shards in parallel up to the disk's bandwidth (a 27-shard 16-bit R1
    is 1.3 TB: about 20 minutes on one thread, a few on eight)."""
    if len(paths) <= 1:
        return [fetch.sha256_file(p) for p in paths]
    workers = threads or min(len(paths), os.cpu_count() or 1, 8)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        return list(pool.map(fetch.sha256_file, paths))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bits_per_weight(tensor_bytes: int, parameters: int | None) -> float:
    return tensor_bytes * 8 / parameters if parameters else 0.0


def publish(
    staged: Sequence[Path], root: Path, base: report.VariantReport, *, parameters: int | None
) -> report.VariantReport:
    """Describe the staged GGUF file(s), write the report, then move everything to its final name.

    ``staged`` are files in ``staging_dir(root, base.digest)``; the first is the one llama.cpp
    loads. ``parameters`` (llama.cpp's count, from the evaluation) gives bits per weight; the
    header is read once, by ``gguf_facts`` (parsing a large vocabulary costs seconds). Returns the
    completed report.
    """
    final = variant_dir(root, base.digest)
    stage = staging_dir(root, base.digest)
    if not staged:
        raise PublishError(f"variant {base.name}: the quantize step produced no file")
    facts = read_facts(staged[0])  # all shards: gguf_facts finds them by name
    entries = [
        report.FileEntry(name=f.name, size_bytes=f.stat().st_size, sha256=digest)
        for f, digest in zip(staged, hash_files(staged), strict=True)
    ]
    first_final = final / staged[0].name
    done = base.model_copy(
        update={
            "path": str(first_final),
            "files": entries,
            "size_bytes": sum(e.size_bytes for e in entries),
            "sha256": entries[0].sha256,
            "bits_per_weight": round(bits_per_weight(facts["total_bytes"], parameters), 4),
            "tensor_types": dict(sorted(facts["tensor_types"].items())),
            "facts": facts,
        }
    )
    try:
        (stage / REPORT_NAME).write_text(done.to_json())
        for f in staged:
            f.replace(final / f.name)
        _fsync_dir(final)
        (stage / REPORT_NAME).replace(final / REPORT_NAME)
        _fsync_dir(final)
    except OSError as exc:
        # Take back whatever moved: a half-published variant must not look complete or be served.
        for f in staged:
            (final / f.name).unlink(missing_ok=True)
        raise PublishError(f"variant {base.name}: writing {final} failed: {exc.strerror or exc}") from None
    shutil.rmtree(stage, ignore_errors=True)
    log.info(
        "published %s: %s (%d bytes, %.2f bits per weight)",
        base.name,
        first_final,
        done.size_bytes,
        done.bits_per_weight,
    )
    return done


def safetensors_dtypes(path: Path) -> dict[str, int]:
    """Tensor count per dtype from a safetensors header (8-byte length, then JSON): no weights read."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    counts: dict[str, int] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    return counts


def publish_folder(
    folder: Path, root: Path, base: report.VariantReport, *, parameters: int | None
) -> report.VariantReport:
    """Publish a staged Hugging Face folder (a bnb variant) like ``publish`` does a GGUF file: the
    report lists every file with its sha256, ``path`` is the folder transformers loads, ``sha256``
    that of its first weights file, and report.json moves into place last."""
    final = variant_dir(root, base.digest)
    stage = staging_dir(root, base.digest)
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    weights = [f for f in files if f.suffix == ".safetensors"]
    if not weights:
        raise PublishError(f"variant {base.name}: {folder} holds no safetensors")
    entries = [
        report.FileEntry(name=str(f.relative_to(folder)), size_bytes=f.stat().st_size, sha256=digest)
        for f, digest in zip(files, hash_files(files), strict=True)
    ]
    by_name = {e.name: e for e in entries}
    weight_bytes = sum(by_name[str(w.relative_to(folder))].size_bytes for w in weights)
    types: dict[str, int] = {}
    for w in weights:
        for dtype, n in safetensors_dtypes(w).items():
            types[dtype] = types.get(dtype, 0) + n
    done = base.model_copy(
        update={
            "path": str(final / folder.name),
            "files": entries,
            "size_bytes": sum(e.size_bytes for e in entries),
            "sha256": by_name[str(weights[0].relative_to(folder))].sha256,
            "bits_per_weight": round(bits_per_weight(weight_bytes, parameters), 4),
            "tensor_types": dict(sorted(types.items())),
        }
    )
    try:
        (stage / REPORT_NAME).write_text(done.to_json())
        shutil.rmtree(final / folder.name, ignore_errors=True)
        folder.replace(final / folder.name)
        _fsync_dir(final)
        (stage / REPORT_NAME).replace(final / REPORT_NAME)
        _fsync_dir(final)
    except OSError as exc:
        shutil.rmtree(final / folder.name, ignore_errors=True)
        raise PublishError(f"variant {base.name}: writing {final} failed: {exc.strerror or exc}") from None
    shutil.rmtree(stage, ignore_errors=True)
    log.info("published %s: %s (%d bytes, %.2f bits per weight)", base.name, done.path, done.size_bytes,
             done.bits_per_weight)
    return done


def rewrite_report(root: Path, updated: report.VariantReport) -> None:
    """Replace a published variant's report.json atomically (new metrics or gate, same files)."""
    final = variant_dir(root, updated.digest) / REPORT_NAME
    tmp = final.with_name(f".{REPORT_NAME}.partial")
    tmp.write_text(updated.to_json())
    tmp.replace(final)


def discard_staging(root: Path, digest: str) -> None:
    """Remove a failed variant's staging folder (and the digest folder if it is then empty)."""
    shutil.rmtree(staging_dir(root, digest), ignore_errors=True)
    with_final = variant_dir(root, digest)
    if with_final.is_dir() and not any(with_final.iterdir()):
        with_final.rmdir()
