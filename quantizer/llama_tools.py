"""llama.cpp's own command-line tools (``llama-imatrix``), found and run as child processes.

Why a child process and not the in-process library: the tool memory-maps the GGUF, so on a host
without a GPU the weights are page cache (reclaimable, shared, charged to the pod's cgroup only
while there is room) and not the Python process's anonymous memory; with GPUs, llama.cpp's own
``--fit`` (on by default in this llama.cpp) or an explicit ``-ngl`` places only what fits. An
out-of-memory kill ends the child, not the pipeline that must still hand in its report.

Where the binaries are: ``KQUANT_LLAMA_BIN`` (the quantizer image sets it), else
``<KQUANT_CACHE or ~/.cache/kquant>/llama.cpp/<version>/bin`` (``hack/build-llama.sh``), else
``PATH``. They are built from the same llama.cpp commit that ``llama-cpp-python`` vendors, so
the imatrix they write is the one the in-process quantizer reads.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import typing
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BIN_ENV = "KQUANT_LLAMA_BIN"


class ToolError(RuntimeError):
    """A llama.cpp tool is missing or failed; the message carries its last words."""


def bin_dir() -> Path:
    """Where the tools are looked for first."""
    if os.environ.get(BIN_ENV):
        return Path(os.environ[BIN_ENV])
    cache = Path(os.environ.get("KQUANT_CACHE", Path.home() / ".cache" / "kquant"))
    return cache / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "bin"


def find(name: str) -> Path:
    """The path of tool ``name``; raises :class:`ToolError` saying where it looked."""
    candidate = bin_dir() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ToolError(
        f"{name} is not installed: looked in {bin_dir()} (set {BIN_ENV}) and on PATH; "
        "build it with hack/build-llama.sh or use the quantizer image"
    )


def gpu_args(gpu_layers: int | None) -> list[str]:
    """``-ngl``: a number from the spec (the operator's planner), or nothing so that llama.cpp's
    ``--fit`` places what fits the free device memory (and nothing on a host without GPUs)."""
    return [] if gpu_layers is None else ["-ngl", str(gpu_layers)]


def thread_args(threads: int) -> list[str]:
    """``-t``: the pod's CPU request (the operator sets ``threads``); 0 lets llama.cpp choose."""
    return [] if threads <= 0 else ["-t", str(threads)]


def run(
    args: Sequence[str | Path],
    *,
    on_line: Callable[[str], None] | None = None,
    what: str,
) -> list[str]:
    """Run a tool, feed each output line to ``on_line``, return the last lines; raise on failure."""
    cmd = [str(a) for a in args]
    log.info("running %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL) as proc:
        stdout = typing.cast(io.BufferedReader, proc.stdout)
        buf = b""
        while chunk := stdout.read1(65536):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                line = raw.decode(errors="replace")
                if not line.strip():
                    continue
                tail.append(line)
                log.debug("%s: %s", Path(cmd[0]).name, line)
                if on_line is not None:
                    on_line(line)
        if buf.strip():
            tail.append(buf.decode(errors="replace"))
        rc = proc.wait()
    if rc != 0:
        killed = " (killed: out of memory?)" if rc in (-9, 137) else ""
        raise ToolError(f"{what} failed with exit status {rc}{killed}: {last_words(tail)}")
    return list(tail)


_ERROR = re.compile(r"error|failed|out of memory|cannot|unable", re.IGNORECASE)


def last_words(lines: Sequence[str]) -> str:
    """The tool's own reason: its last error-looking lines, else its last line."""
    errors = [line.strip() for line in lines if _ERROR.search(line)]
    if errors:
        return " / ".join(errors[-3:])[-600:]
    return lines[-1].strip()[-600:] if lines else "no output"
