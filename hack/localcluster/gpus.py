"""The simulated GPU nodes' "GPUs": one ggml-rpc-server per GPU a llama-server pod is given.

A pod on a simulated node runs as host processes, so the GPUs its node advertises
(``nvidia.com/gpu``) do not exist. For llama-server, a ggml-rpc-server on loopback is a device
like a GPU: llama.cpp places layers, KV cache and compute buffers on it and reports them in its
log. So, playing the device plugin, the agent starts one rpc-server per GPU the pod's containers
are given and hands llama-server the endpoints in ``LLAMA_ARG_RPC`` (llama.cpp's environment
spelling of ``--rpc``), and stops them with the pod. The operator's plan check then reads real
per-device allocations from these pods' logs. Other images (the quantizer) get no devices: their
GPU builds run on the CPU as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import socket
import subprocess
import time
from typing import Any

log = logging.getLogger("localcluster.gpus")
GPU_RESOURCE = "nvidia.com/gpu"
SERVER_IMAGES = ("ghcr.io/kquant-dev/llama-server", "ghcr.io/ggml-org/llama.cpp:server")


def requested(pod: dict[str, Any]) -> int:
    """GPUs a llama-server pod is given (limits, as the device plugin reads them); 0 for other pods."""
    containers = pod["spec"].get("containers") or []
    if not any(str(c.get("image", "")).startswith(SERVER_IMAGES) for c in containers):
        return 0
    total = 0
    for c in containers:
        limits = (c.get("resources") or {}).get("limits") or {}
        with contextlib.suppress(ValueError):
            total += int(str(limits.get(GPU_RESOURCE, "0")))
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Devices:
    """The rpc-servers of one pod; ``endpoints`` for LLAMA_ARG_RPC, ``stop`` when the pod ends."""

    def __init__(self, count: int, logs: pathlib.Path) -> None:
        binary = pathlib.Path(os.environ.get("LLAMA_CPP_BIN", "")) / "ggml-rpc-server"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            port = _free_port()
            with (logs / f"gpu{i}-rpc.log").open("ab") as out:
                # in the agent's process group: stopping the agent (cluster down) stops them too
                self.procs.append(subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                                   stderr=subprocess.STDOUT))
            self.endpoints.append(f"127.0.0.1:{port}")
        for endpoint, proc in zip(self.endpoints, self.procs, strict=True):
            self._wait(endpoint, proc)

    @staticmethod
    def _wait(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        host, port = endpoint.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
                return
            time.sleep(0.1)
        log.warning("rpc-server %s did not come up (exit %s)", endpoint, proc.poll())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
