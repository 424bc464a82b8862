"""Start the pinned llama-server (optionally with RPC devices on loopback) and keep its startup log.

Used by the plan-check integration tests and by ``tests/fixtures/server_logs/capture.py``, which
writes the small committed logs the parser's unit tests read. The server runs with the same
``--log-verbosity`` the operator gives it (``server_manifests.LOG_VERBOSITY``): that level prints
the buffer sizes and the offloaded layers and nothing of the requests.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import fit_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(binaries: Path, model: Path, port: int, args: Sequence[str], rpc: Sequence[str]) -> list[str]:
    return [str(binaries / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--log-verbosity", "4", *(["--rpc", ",".join(rpc)] if rpc else []), *args]


def _wait_healthy(proc: subprocess.Popen[str], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            if response.status == 200:
                return True
        time.sleep(0.3)
    return False


@contextlib.contextmanager
def running(binaries: Path, model: Path, args: Sequence[str], rpc: Sequence[str] = (),
            timeout: float = 120.0) -> Iterator[int]:
    """A healthy llama-server for the ``with`` block; yields its port (the log is discarded)."""
    port = free_port()
    proc = subprocess.Popen(_command(binaries, model, port, args, rpc), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        if not _wait_healthy(proc, port, timeout):
            raise RuntimeError(f"llama-server {' '.join(args)} never became healthy (exit {proc.poll()})")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def startup_log(binaries: Path, model: Path, args: Sequence[str], rpc: Sequence[str] = (),
                timeout: float = 120.0) -> str:
    """Run llama-server until /health answers 200, stop it, and return its log up to that point."""
    port = free_port()
    proc = subprocess.Popen(_command(binaries, model, port, args, rpc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        healthy = _wait_healthy(proc, port, timeout)
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=30)
    if not healthy:
        raise RuntimeError(f"llama-server {' '.join(args)} never became healthy (exit {proc.poll()}):\n{log[-3000:]}")
    # What a reader sees when the pod turns Ready: everything up to "listening on".
    head, sep, _ = log.partition("listening on")
    return head + sep + log[len(head) + len(sep):].split("\n", 1)[0] + "\n"


@contextlib.contextmanager
def rpc_devices(binaries: Path, count: int) -> Iterator[list[str]]:
    """``count`` ggml-rpc-servers on loopback: llama.cpp sees each as a GPU."""
    with fit_params.rpc_servers(binaries, count) as endpoints:
        yield endpoints
