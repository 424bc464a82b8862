"""Small waiting helpers for tests that talk to the real API server."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import TypeVar

from kubernetes import client, config
from localcluster import controlplane

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A running local cluster, as tests see it."""

    paths: controlplane.ClusterPaths
    bin_dir: pathlib.Path

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.paths.kubeconfig

    @property
    def helm(self) -> pathlib.Path:
        return self.bin_dir / "helm"

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(str(self.kubeconfig))


def wait_for(check: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.3,
             what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
