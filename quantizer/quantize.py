"""Quantize a GGUF file in-process with llama.cpp's ``llama_model_quantize``.

Running llama.cpp's own quantizer through llama-cpp-python (instead of the ``llama-quantize``
binary) keeps the quantizer image to one Python package and lets us hand the importance matrix
over as memory rather than as a file. Two things the C API does not give directly are rebuilt
here:

* **Failure reasons.** ``llama_model_quantize`` only returns a non-zero code; the reason is in its
  log. The log callback is swapped for one that keeps the text for the duration of the call, and
  a failure raises :class:`QuantizeError` with the reason llama.cpp gave.
* **What llama.cpp would do.** ``dry_run`` asks llama.cpp to choose every tensor's type without
  writing anything; :func:`dry_run` reads those choices back from the log, so a plan shown to the
  user is llama.cpp's own decision, not a re-implementation of its rules.

The call itself is the whole cost: building the ctypes arrays is microseconds, so the step costs
what a bare ``llama_model_quantize`` costs (``bench/quantize_overhead.py`` measures the ratio).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from kquant.quantizer import constants, quantize_job, recipes, shards

if TYPE_CHECKING:
    from kquant.quantizer import imatrix as imatrix_mod

_TENSOR_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(?P<old>\w+),\s+"
    r"size\s*=\s*[\d.]+\s*MiB(?:\s*->\s*[\d.]+\s*MiB\s*\((?P<new>\w+)\))?"
)
_STEP = re.compile(r"\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")
_FAILURE = re.compile(r"failed to quantize: (?P<reason>[^\n]*)")
_NEEDS_IMATRIX = re.compile(r"offending tensor:\s*(?P<tensor>\S+)\s+-\s*target type:\s*(?P<type>\w+)")


class QuantizeError(RuntimeError):
    """llama.cpp refused or failed to quantize; the message carries its reason."""


def quantize(
    src: Path,
    dst: Path,
    job: quantize_job.QuantizeJob,
    imatrix: imatrix_mod.ImatrixData | None,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Quantize ``src`` into ``dst``; nothing appears under ``dst`` unless the whole run succeeded.

    llama.cpp writes into a temporary folder next to ``dst`` (same filesystem), and the finished
    file (or shards, with ``keep_split``) is renamed into place at the end.
    With ``keep_split`` and a sharded source, ``dst`` is the first shard's name
    (``x-00001-of-00003.gguf``) and the others land next to it. ``progress`` gets the fraction of
    tensors done, read from llama.cpp's ``[ i/ n]`` log lines as they appear.
    """
    keep_split = job.keep_split and shards.is_shard(src.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        # with keep_split llama.cpp appends "-0000i-of-0000n.gguf" to the name it is given
        target = tmp / (shards.stem_of(dst.name) if keep_split else dst.name)
        _run(src, target, job, imatrix, dry=False, keep_split=keep_split, progress=progress)
        for produced in sorted(tmp.iterdir()):
            os.replace(produced, dst.parent / produced.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dry_run(src: Path, job: quantize_job.QuantizeJob) -> dict[str, constants.TensorType]:
    """llama.cpp's choice of type for every tensor of ``src`` under ``job``, without writing anything.

    Tensors llama.cpp leaves alone (norms, expert routers, a kept output tensor) keep their source
    type. An imatrix is not needed: llama.cpp only warns in a dry run.
    """
    log = _run(src, None, job, None, dry=True, keep_split=False)
    types: dict[str, constants.TensorType] = {}
    for match in _TENSOR_LINE.finditer(log):
        name = match["new"] or match["old"]
        types[match["name"]] = constants.TensorType(name.upper())
    if not types:
        raise QuantizeError(f"llama.cpp's dry run of {src} listed no tensors; its log ends with: {log[-500:]}")
    return types


def plan(
    src_gguf: Path,
    variant: recipes.VariantRecipe,
    imatrix: imatrix_mod.ImatrixData | None,
    *,
    nthread: int = 0,
) -> recipes.RecipePlan:
    """Plan ``variant`` against ``src_gguf``, with llama.cpp's own choice for the uniform file.

    The dry run is the one part of planning that needs llama.cpp; :func:`recipes.plan_variant`
    does the rest and stays importable without the C library. The header is read first, so a file
    that is no GGUF fails with the recipe's reason before llama.cpp is asked about it.
    """
    tensors = recipes.read_tensors(src_gguf)
    uniform_types = dry_run(src_gguf, recipes.base_job(variant, nthread))
    return recipes.plan_variant(tensors, variant, imatrix, uniform_types, source=src_gguf, nthread=nthread)


def _run(
    src: Path,
    dst: Path | None,
    job: quantize_job.QuantizeJob,
    imatrix: imatrix_mod.ImatrixData | None,
    *,
    dry: bool,
    keep_split: bool,
    progress: Callable[[float], None] | None = None,
) -> str:
    """Call ``llama_model_quantize`` once and return its log; raise :class:`QuantizeError` on failure."""
    if not src.is_file():
        raise QuantizeError(f"source GGUF {src} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = job.nthread
    params.ftype = constants.FILE_TYPES[job.file_type].code
    if job.output_tensor_type is not None:
        params.output_tensor_type = constants.TENSOR_TYPES[job.output_tensor_type].code
    if job.token_embedding_type is not None:
        params.token_embedding_type = constants.TENSOR_TYPES[job.token_embedding_type].code
    params.quantize_output_tensor = not job.leave_output_tensor
    params.pure = job.pure
    params.allow_requantize = job.allow_requantize
    params.keep_split = keep_split
    params.dry_run = dry

    keep_alive: list[Any] = []  # ctypes arrays and numpy buffers must outlive the call
    if job.overrides:
        params.tt_overrides = _override_array(job.overrides, keep_alive)
    if imatrix is not None and not dry:
        params.imatrix = _imatrix_array(imatrix, keep_alive)

    out = b"" if dst is None else os.fsencode(dst)
    with _captured_log(progress) as chunks:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), out, ctypes.byref(params))
    log = "".join(chunks)
    if rc != 0:
        raise QuantizeError(_failure_message(src, job, log))
    return log


def _override_array(overrides: tuple[tuple[str, constants.TensorType], ...], keep_alive: list[Any]) -> Any:
    # One extra zero-filled entry ends the array: llama.cpp loops while pattern != NULL.
    array = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, tensor_type) in enumerate(overrides):
        encoded = pattern.encode()
        keep_alive.append(encoded)
        array[i].pattern = encoded
        array[i].type = constants.TENSOR_TYPES[tensor_type].code
    keep_alive.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_tensor_override))


def _imatrix_array(imatrix: imatrix_mod.ImatrixData, keep_alive: list[Any]) -> Any:
    array = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        buffer = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep_alive.extend((buffer, encoded))
        array[i].name = encoded
        array[i].data = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = buffer.size
    keep_alive.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


@contextlib.contextmanager
def _captured_log(progress: Callable[[float], None] | None = None) -> Iterator[list[str]]:
    """Route llama.cpp's log into a list for the duration of the block, then restore the old sink."""
    chunks: list[str] = []

    def sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunk = text.decode("utf-8", errors="replace")
        chunks.append(chunk)
        if progress is not None and (step := _STEP.match(chunk)) is not None:
            with contextlib.suppress(Exception):  # an exception cannot cross back into C
                progress(int(step["done"]) / int(step["total"]))

    callback = llama_cpp.llama_log_callback(sink)
    previous = llama_cpp.llama_log_callback()
    previous_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(previous, previous_data)


def _failure_message(src: Path, job: quantize_job.QuantizeJob, log: str) -> str:
    needs = _NEEDS_IMATRIX.search(log)
    if needs is not None or "requires an imatrix" in log or "Missing importance matrix" in log:
        detail = ""
        if needs is not None:
            detail = f" (llama.cpp would store {needs['tensor']} as {needs['type'].upper()})"
        return (
            f"type {job.file_type} needs an importance matrix{detail}, but none was given: "
            "run the calibrate step, or pick a type that does not need one such as Q4_K_M"
        )
    failure = _FAILURE.search(log)
    reason = failure["reason"].strip() if failure else log.strip()[-500:] or "no reason in llama.cpp's log"
    return f"llama.cpp could not quantize {src} to {job.file_type}: {reason}"
