"""The quantize step's time divided by a bare ``llama_model_quantize`` call on the same input.

"Bare" is the C call alone, with its parameters and imatrix array built beforehand. The step is
``kquant.quantizer.quantize.quantize``: building the ctypes arrays, capturing llama.cpp's log,
writing into a temporary folder and renaming. Runs alternate (bare, step, bare, step, ...) so
that load from other processes on a shared machine hits both alike; the median ratios of wall time
and of CPU time (this process's threads, less sensitive to other load) are printed.

    .venv/bin/python -P bench/quantize_overhead.py [--repeats 5] [--model smollm2|random-256]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp
from kquant.quantizer import constants, evaluate, imatrix, quantize, quantize_job

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from fixtures import hf_models, smollm2  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and its threads (llama.cpp quantizes on threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bare_call(src: Path, dst: Path, job: quantize_job.QuantizeJob, data: imatrix.ImatrixData) -> tuple[float, float]:
    """Time one ``llama_model_quantize`` call as the research snippet makes it."""
    keep: list[Any] = []
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = job.nthread
    params.ftype = constants.FILE_TYPES[job.file_type].code
    params.imatrix = quantize._imatrix_array(data, keep)
    start, cpu = time.perf_counter(), cpu_seconds()
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if rc != 0:
        raise SystemExit(f"bare llama_model_quantize failed with {rc}")
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "random-256"])
    parser.add_argument("--type", default="Q4_K_M")
    args = parser.parse_args()
    hf = smollm2.hf_dir()
    if args.model == "random-256":
        hf = hf_models.write_random_hf_like(Path.home() / ".cache" / "kquant" / "fixtures" / "random-256-hf", hf)
    src = hf_models.cached_f16_gguf(hf, args.model)
    data = imatrix.compute_imatrix(hf, [evaluate.builtin_text("calibration.txt")], chunks=4, context_size=512)
    job = quantize_job.QuantizeJob(file_type=constants.FileType(args.type), nthread=2)
    bare: list[float] = []
    step: list[float] = []
    bare_cpu: list[float] = []
    step_cpu: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bare_call(src, out / "warm.gguf", job, data)  # page cache and first-use costs out of the way
        for i in range(args.repeats):
            seconds, cpu = bare_call(src, out / f"bare{i}.gguf", job, data)
            bare.append(seconds)
            bare_cpu.append(cpu)
            start, cpu = time.perf_counter(), cpu_seconds()
            quantize.quantize(src, out / f"step{i}.gguf", job, data)
            step.append(time.perf_counter() - start)
            step_cpu.append(cpu_seconds() - cpu)
            (out / f"bare{i}.gguf").unlink()
            (out / f"step{i}.gguf").unlink()
    ratios = [s / b for s, b in zip(step, bare, strict=True)]
    print(f"model {args.model}, {args.type} with imatrix, {args.repeats} alternating runs")
    print(f"bare llama_model_quantize: median {statistics.median(bare):.3f} s  {[round(b, 3) for b in bare]}")
    print(f"quantize step:             median {statistics.median(step):.3f} s  {[round(s, 3) for s in step]}")
    overall = statistics.median(step) / statistics.median(bare)
    print(f"wall step / bare: median of ratios {statistics.median(ratios):.3f}, ratio of medians {overall:.3f}")
    cpu_ratio = statistics.median(step_cpu) / statistics.median(bare_cpu)
    cpu_bare, cpu_step = statistics.median(bare_cpu), statistics.median(step_cpu)
    print(f"CPU  bare {cpu_bare:.3f} s, step {cpu_step:.3f} s, ratio {cpu_ratio:.3f}")


if __name__ == "__main__":
    main()
