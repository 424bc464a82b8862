"""Where progress goes: the log always, and the result ConfigMap when the spec names one.

The Job's ServiceAccount may patch exactly one ConfigMap (by ``resourceNames``), so the patcher
only ever touches ``data.progress`` and ``data.report`` of that object. Progress arrives many
times a second during quantization; the API server does not need that, so updates are
throttled (pure ``Throttle``) and the final report is always written, throttle or not. A failed
progress patch is logged and never fails the build: losing a progress line is better than losing a
model. The final report is different: it is the build's result, and the operator reads nothing
else, so its write is retried with a growing wait (about 30 s in all, enough for an API server
restart) before it is given up; the operator then reports the completed Job without a report as
``ReportMissing``, never as a build that runs for ever.
This is the only module of the quantizer that talks to the Kubernetes API.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import kubernetes
from kquant.quantizer import redact
from kquant.quantizer import report as report_mod

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProgressLine:
    """``q4km 2/5 quantizing 63%``: the variant, its position, the phase and the fraction done."""

    phase: str
    fraction: float
    variant: str | None = None
    index: int = 0
    count: int = 0

    def render(self) -> str:
        parts: list[str] = []
        if self.variant:
            parts.append(self.variant)
            if self.count:
                parts.append(f"{self.index}/{self.count}")
        parts.append(self.phase)
        parts.append(f"{round(self.fraction * 100)}%")
        return " ".join(parts)


class Sink(Protocol):
    def progress(self, line: ProgressLine) -> None: ...

    def report(self, build: report_mod.BuildReport) -> None: ...


class Throttle:
    """Lets an event through at most once per ``interval`` seconds, unless it is forced."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: float | None = None

    def allow(self, *, force: bool = False) -> bool:
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class LogSink:
    """Logs a progress line when the phase changes or every ``interval`` seconds."""

    def __init__(self, interval: float = 5.0) -> None:
        self._throttle = Throttle(interval)
        self._last_phase: tuple[str | None, str] | None = None

    def progress(self, line: ProgressLine) -> None:
        phase = (line.variant, line.phase)
        changed = phase != self._last_phase
        self._last_phase = phase
        if self._throttle.allow(force=changed or line.fraction >= 1.0):
            log.info("progress: %s", line.render())

    def report(self, build: report_mod.BuildReport) -> None:
        log.info("build %s%s", build.status.value, f": {redact.redact(build.reason)}" if build.reason else "")


Patcher = Callable[[dict[str, str]], None]
"""Merges the given keys into the ConfigMap's ``data``."""


def kubernetes_patcher(name: str, namespace: str) -> Patcher:
    """A patcher that uses the in-cluster ServiceAccount, or the local kubeconfig outside a pod."""
    config: Any = kubernetes.config  # the client ships without type hints
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = kubernetes.client.CoreV1Api()

    def patch(data: dict[str, str]) -> None:
        api.patch_namespaced_config_map(name, namespace, {"data": data})

    return patch


class ConfigMapSink:
    """Writes ``data.progress`` (throttled, except when a step starts or ends) and ``data.report``
    (always) into the result ConfigMap."""

    REPORT_ATTEMPTS = 6
    """Tries of the final report's write: waits of 1, 2, 4, 8 and 16 s between them."""

    def __init__(self, patcher: Patcher, interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._patch = patcher
        self._throttle = Throttle(interval, clock)
        self._sleep = sleep
        self._last: str | None = None
        self._last_phase: tuple[str | None, str] | None = None

    def _send(self, data: dict[str, str], attempts: int = 1) -> bool:
        # The sink where reasons leave the pod for status, conditions and Events: no secret passes.
        data = {key: redact.redact(value) for key, value in data.items()}
        for attempt in range(1, attempts + 1):
            try:
                self._patch(data)
            except Exception as exc:  # any API or network failure: keep building
                if attempt == attempts:
                    log.warning("could not update the result ConfigMap: %s", _short(exc))
                    return False
                wait = 2.0 ** (attempt - 1)
                log.warning("could not update the result ConfigMap (try %d of %d): %s; trying again in %.0fs",
                            attempt, attempts, _short(exc), wait)
                self._sleep(wait)
            else:
                return True
        return False

    def progress(self, line: ProgressLine) -> None:
        text = line.render()
        if text == self._last:
            return
        # A new step always goes through: the operator derives status.phase from the step's name,
        # and a step that starts within the throttle interval of the last line would not show.
        phase = (line.variant, line.phase)
        changed, self._last_phase = phase != self._last_phase, phase
        if self._throttle.allow(force=changed or line.fraction >= 1.0):
            self._last = text
            self._send({"progress": text})

    def final(self, data: dict[str, str]) -> bool:
        """A last write that must arrive (a result): tried like the report."""
        return self._send(data, self.REPORT_ATTEMPTS)

    def report(self, build: report_mod.BuildReport) -> None:
        progress = "done" if build.status is report_mod.BuildStatus.SUCCEEDED else f"failed: {build.reason}"
        if not self._send({"progress": progress, "report": build.to_json()}, self.REPORT_ATTEMPTS):
            log.error("the build's report never reached its ConfigMap after %d tries: the operator will "
                      "report this build as ReportMissing", self.REPORT_ATTEMPTS)


def _short(exc: Exception) -> str:
    reason: Any = getattr(exc, "reason", None)
    status: Any = getattr(exc, "status", None)
    if status is not None:
        return f"{status} {reason}"
    return redact.redact(str(exc))[:200]


class FanOut:
    """Sends everything to several sinks."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def progress(self, line: ProgressLine) -> None:
        for s in self.sinks:
            s.progress(line)

    def report(self, build: report_mod.BuildReport) -> None:
        for s in self.sinks:
            s.report(build)
