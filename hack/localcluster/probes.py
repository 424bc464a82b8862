"""Readiness, liveness and startup probes, run the way the kubelet runs them."""

from __future__ import annotations

import dataclasses
import http.client
import socket
import subprocess
import time
from typing import Any


@dataclasses.dataclass
class ProbeState:
    """A probe's schedule and its run of successes or failures."""

    spec: dict[str, Any]
    started_at: float
    last_run: float = 0.0
    successes: int = 0
    failures: int = 0
    passed: bool = False

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    def due(self, now: float) -> bool:
        if now - self.started_at < float(self.spec.get("initialDelaySeconds", 0)):
            return False
        return now - self.last_run >= self.period

    def record(self, ok: bool, now: float) -> None:
        self.last_run = now
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(self.spec.get("successThreshold", 1)):
                self.passed = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.spec.get("failureThreshold", 3)):
                self.passed = False

    @property
    def failed_out(self) -> bool:
        return self.failures >= int(self.spec.get("failureThreshold", 3))


def _port(value: int | str, ports: dict[str, int]) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    return ports[str(value)]


def run_probe(spec: dict[str, Any], pod_ip: str, ports: dict[str, int], env: dict[str, str],
              cwd: str) -> bool:
    timeout = float(spec.get("timeoutSeconds", 1))
    try:
        if "httpGet" in spec:
            get = spec["httpGet"]
            conn = http.client.HTTPConnection(get.get("host") or pod_ip, _port(get["port"], ports),
                                              timeout=timeout)
            try:
                conn.request("GET", get.get("path", "/"))
                status = conn.getresponse().status
            finally:
                conn.close()
            return 200 <= status < 400
        if "tcpSocket" in spec:
            tcp = spec["tcpSocket"]
            with socket.create_connection((tcp.get("host") or pod_ip, _port(tcp["port"], ports)),
                                          timeout=timeout):
                return True
        if "exec" in spec:
            done = subprocess.run(spec["exec"]["command"], env=env, cwd=cwd, timeout=timeout,
                                  capture_output=True, check=False)
            return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired, http.client.HTTPException, KeyError):
        return False
    return False


def new_state(spec: dict[str, Any] | None) -> ProbeState | None:
    return ProbeState(spec, time.monotonic()) if spec else None
