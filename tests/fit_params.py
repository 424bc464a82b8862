"""Run llama.cpp's ``llama-fit-params`` against RPC devices on loopback and parse what it reports.

The offload planner is measured against llama.cpp itself without a GPU: ``ggml-rpc-server`` on
127.0.0.1 appears to llama.cpp as a GPU, and ``llama-fit-params`` builds the model and context with
``no_alloc`` (no weights are read) and reports per-device model, KV ("context") and compute bytes.

* ``measure`` runs ``--fit-print on``: the stdout lines ``RPC0 <model> <context> <compute>`` and
  ``Host ...`` (whole MiB, truncated), plus the debug log's ``sched_reserve: <dev> compute buffer
  size = X MiB`` (two decimals) and ``llama_kv_cache: size = X MiB``.
* ``fit`` runs ``--fit`` with a per-device target margin (``-fitt``); the emulated budget is the free
  memory llama.cpp saw (``- N MiB free`` in the log) minus that margin.

Binaries come from ``hack/build-llama.sh`` (``~/.cache/kquant/llama.cpp/0.3.36/bin``, or the
``KQUANT_LLAMA_BIN`` environment variable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

MiB = 1024 * 1024
DEFAULT_BIN = Path.home() / ".cache" / "kquant" / "llama.cpp" / "0.3.36" / "bin"

_PRINT_RE = re.compile(r"^(?P<dev>RPC\d+|Host) (?P<model>\d+) (?P<ctx>\d+) (?P<compute>\d+)\s*$", re.M)
_COMPUTE_RE = re.compile(r"sched_reserve:\s+(?P<dev>\S+) compute buffer size =\s+(?P<mib>[\d.]+) MiB")
_KV_RE = re.compile(r"llama_kv_cache: size =\s+(?P<mib>[\d.]+) MiB")
_FREE_RE = re.compile(r"using device (?P<dev>RPC\d+) .* - (?P<mib>\d+) MiB free")
_FIT_RE = re.compile(r"^-c (?P<ctx>\d+) -ngl (?P<ngl>-?\d+)(?: -ts (?P<ts>[\d,]+))?(?: -ot \"(?P<ot>[^\"]*)\")?", re.M)


def bin_dir() -> Path | None:
    """The llama.cpp binaries, or None when ``hack/build-llama.sh`` has not run."""
    path = Path(os.environ.get("KQUANT_LLAMA_BIN", DEFAULT_BIN))
    needed = ("llama-fit-params", "ggml-rpc-server")
    return path if all((path / n).is_file() for n in needed) else None


@dataclasses.dataclass(frozen=True)
class DeviceMiB:
    """One row of ``--fit-print``: whole MiB as llama.cpp truncates them."""

    model: int
    context: int
    compute: int


@dataclasses.dataclass(frozen=True)
class Measurement:
    devices: tuple[DeviceMiB, ...]
    host: DeviceMiB
    compute_bytes: tuple[int, ...]
    """Per RPC device, from the two-decimal ``sched_reserve`` lines (0 where a device has none)."""
    host_compute_bytes: int
    kv_total_bytes: int


@dataclasses.dataclass(frozen=True)
class FitResult:
    context: int
    gpu_layers: int
    tensor_split: tuple[int, ...]
    overrides: str
    free_mib: tuple[int, ...]
    """Free memory of each RPC device as ``--fit`` saw it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def rpc_servers(binaries: Path, count: int = 1) -> Iterator[list[str]]:
    """Start ``count`` ggml-rpc-servers on free loopback ports; yield their ``host:port`` endpoints."""
    procs: list[subprocess.Popen[bytes]] = []
    endpoints: list[str] = []
    try:
        for _ in range(count):
            port = _free_port()
            proc = subprocess.Popen(
                [str(binaries / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            endpoints.append(f"127.0.0.1:{port}")
            _wait_for_port(port, proc)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ggml-rpc-server on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"ggml-rpc-server did not listen on port {port} within {timeout} s")


def _run(binaries: Path, model: Path, endpoints: Sequence[str], args: Sequence[str]) -> tuple[str, str]:
    cmd = [str(binaries / "llama-fit-params"), "-m", str(model), "--rpc", ",".join(endpoints), "-v", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout, done.stderr


def measure(binaries: Path, model: Path, endpoints: Sequence[str], args: Sequence[str]) -> Measurement:
    """``llama-fit-params --fit-print on`` for fixed arguments (pass ``-ngl``, ``-c`` ...)."""
    out, err = _run(binaries, model, endpoints, [*args, "--fit-print", "on"])
    rows = {m["dev"]: DeviceMiB(int(m["model"]), int(m["ctx"]), int(m["compute"])) for m in _PRINT_RE.finditer(out)}
    if "Host" not in rows:
        raise RuntimeError(f"llama-fit-params printed no Host row:\n{out}")
    compute: dict[str, int] = {}
    for m in _COMPUTE_RE.finditer(err):
        # Buffer names look like "RPC0[127.0.0.1:50052]"; llama.cpp prints "RPC0" for every RPC
        # device, so the endpoint in brackets tells them apart.
        name, _, rest = m["dev"].partition("[")
        endpoint = rest.rstrip("]")
        if endpoint in endpoints:
            name = f"RPC{list(endpoints).index(endpoint)}"
        compute[name] = round(float(m["mib"]) * MiB)
    # The debug log is written by a logging thread and a line is now and then lost; fall back to
    # the whole-MiB figure of the printed row then.
    for i in range(len(endpoints)):
        row = rows.get(f"RPC{i}")
        if row and row.compute and f"RPC{i}" not in compute:
            compute[f"RPC{i}"] = row.compute * MiB
    if "CPU" not in compute:
        compute["CPU"] = rows["Host"].compute * MiB
    kv = [round(float(m["mib"]) * MiB) for m in _KV_RE.finditer(err)]
    n_dev = len(endpoints)
    return Measurement(
        devices=tuple(rows.get(f"RPC{i}", DeviceMiB(0, 0, 0)) for i in range(n_dev)),
        host=rows["Host"],
        compute_bytes=tuple(compute.get(f"RPC{i}", 0) for i in range(n_dev)),
        host_compute_bytes=compute.get("CPU", 0),
        kv_total_bytes=kv[-1] if kv else 0,
    )


def fit(
    binaries: Path, model: Path, endpoints: Sequence[str], args: Sequence[str], target_mib: Sequence[int]
) -> FitResult:
    """``llama-fit-params`` in fit mode with ``-fitt`` margins; returns its chosen arguments."""
    out, err = _run(binaries, model, endpoints, [*args, "-fitt", ",".join(str(t) for t in target_mib)])
    match = _FIT_RE.search(out)
    if not match:
        raise RuntimeError(f"llama-fit-params printed no fitted arguments:\n{out}\n{err[-2000:]}")
    free: dict[str, int] = {}
    for m in _FREE_RE.finditer(err):
        free.setdefault(m["dev"], int(m["mib"]))
    return FitResult(
        context=int(match["ctx"]),
        gpu_layers=int(match["ngl"]),
        tensor_split=tuple(int(x) for x in match["ts"].split(",")) if match["ts"] else (),
        overrides=match["ot"] or "",
        free_mib=tuple(free.get(f"RPC{i}", 0) for i in range(len(endpoints))),
    )
