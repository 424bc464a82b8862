"""Run one pod as local processes and report its real state, as a kubelet would.

Init containers run one after another, then the main containers side by side. Exit codes,
restarts (by the pod's restartPolicy), probes and termination messages are real; the pod's status
is patched whenever it changes. Restart back-off is capped at 20 s rather than the kubelet's five
minutes, to keep tests short.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

from kubernetes import client

from localcluster import gpus, images, probes, sandbox

log = logging.getLogger("localcluster.pod")
TICK = 0.25


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class ContainerRun:
    """A container's process, its state as the API shows it, and its probes."""

    spec: dict[str, Any]
    process: sandbox.ProcessSpec | None = None
    popen: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    restart_count: int = 0
    restart_at: float | None = None
    retry_at: float = 0.0
    """When a container that could not be created (a missing Secret, say) is tried again."""
    readiness: probes.ProbeState | None = None
    liveness: probes.ProbeState | None = None
    startup: probes.ProbeState | None = None
    started_at: str = ""

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def started(self) -> bool:
        return self.running and (self.startup is None or self.startup.passed)

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        return self.readiness is None or self.readiness.passed

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": "",
            "containerID": f"local://{self.popen.pid}" if self.popen else "",
            "ready": self.ready, "started": self.started, "restartCount": self.restart_count,
            "state": self.state, "lastState": self.last_state,
        }


class PodRunner(threading.Thread):
    """Owns one pod's processes from admission to termination."""

    def __init__(self, pod: dict[str, Any], core: client.CoreV1Api, table: images.ImageTable,
                 box: sandbox.Sandbox) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.pod = pod
        self.core = core
        self.table = table
        self.box = box
        self.stopping = threading.Event()
        self.grace = 30.0
        self.init_runs = [ContainerRun(c) for c in pod["spec"].get("initContainers") or []]
        self.runs = [ContainerRun(c) for c in pod["spec"].get("containers") or []]
        self.initialized = not self.init_runs
        self.phase = "Pending"
        self.started_at = now_rfc3339()
        self._last_status: dict[str, Any] = {}
        """The status last patched, before timestamps: what the next report compares with."""
        self._last_reported: dict[str, Any] = {}
        self.finished = threading.Event()
        self.devices: gpus.Devices | None = None

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy", "Always"))

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._prepare()
            while not self.stopping.is_set() and not self.initialized:
                self._step_init()
                self._report()
                self.stopping.wait(TICK)
            while not self.stopping.is_set() and self.phase not in ("Succeeded", "Failed"):
                self._step_main()
                self._report()
                self.stopping.wait(TICK)
        except Exception:  # a broken runner must not take the agent down
            log.exception("pod %s: runner failed", self.key)
        finally:
            self._kill_all()
            if self.devices is not None:
                self.devices.stop()
            # A killed pod ends in a terminal phase, as the kubelet reports it: the API server
            # removes a bound pod at once (grace period 0) only when it is no longer running.
            self.phase = self._phase()
            if self.phase not in ("Succeeded", "Failed"):
                self.phase = "Failed"
            self._report_final()
            self.finished.set()

    def stop(self, grace: float | None) -> None:
        if grace is not None:
            self.grace = grace
        self.stopping.set()

    def _prepare(self) -> None:
        count = gpus.requested(self.pod)
        if count:
            self.devices = gpus.Devices(count, self.box.root / "logs")
            self.box.device_env["LLAMA_ARG_RPC"] = ",".join(self.devices.endpoints)
        while not self.stopping.is_set():
            try:
                self.box.prepare_volumes()
                return
            except sandbox.ConfigError as exc:
                for run in self.init_runs + self.runs:
                    run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                self._report()
                self.stopping.wait(2.0)
            except Exception as exc:  # the API server is down (a volume's ConfigMap or token unread): wait
                log.warning("pod %s: volumes not ready yet: %s", self.key, type(exc).__name__)
                self.stopping.wait(2.0)

    # -- containers ------------------------------------------------------------------------

    def _start(self, run: ContainerRun) -> bool:
        try:
            run.process = self.box.process(run.spec, self.table)
        except sandbox.ConfigError as exc:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            run.retry_at = time.monotonic() + 2.0
            return False
        except images.UnknownImageError as exc:
            run.state = {"waiting": {"reason": "ErrImageNeverPull", "message": str(exc)}}
            return False
        except Exception as exc:  # an env ConfigMap unread while the API server is down: try again
            run.state = {"waiting": {"reason": "ContainerCreating", "message": type(exc).__name__}}
            run.retry_at = time.monotonic() + 2.0
            return False
        proc = run.process
        logfile = proc.log.open("ab")
        try:
            run.popen = subprocess.Popen(proc.argv, env=proc.env, cwd=proc.cwd, stdout=logfile,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as exc:
            run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(exc),
                                        "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()}}
            return False
        finally:
            logfile.close()
        run.started_at = now_rfc3339()
        run.state = {"running": {"startedAt": run.started_at}}
        run.readiness = probes.new_state(run.spec.get("readinessProbe"))
        run.liveness = probes.new_state(run.spec.get("livenessProbe"))
        run.startup = probes.new_state(run.spec.get("startupProbe"))
        log.info("pod %s: started %s: %s", self.key, run.name, " ".join(proc.argv))
        return True

    def _termination_message(self, run: ContainerRun, code: int) -> str:
        assert run.process is not None
        path = run.process.termination_log
        if path.exists() and path.stat().st_size:
            return path.read_text(errors="replace")[-4096:]
        if run.process.fallback_to_logs and code != 0 and run.process.log.exists():
            lines = run.process.log.read_text(errors="replace").splitlines()[-80:]
            return "\n".join(lines)[-2048:]
        return ""

    def _reap(self, run: ContainerRun) -> int | None:
        """Record a finished process; return its exit code, or None while it runs."""
        if run.popen is None or run.popen.poll() is None:
            return None
        code = run.popen.returncode
        if code < 0:  # killed by a signal: report it as a shell would
            code = 128 - code
        if "terminated" not in run.state:
            run.state = {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "message": self._termination_message(run, code),
                "startedAt": run.started_at, "finishedAt": now_rfc3339(),
            }}
        return code

    def _should_restart(self, code: int) -> bool:
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)

    def _schedule_restart(self, run: ContainerRun) -> None:
        delay = min(20.0, 1.0 * 2 ** run.restart_count)
        run.restart_at = time.monotonic() + delay
        run.last_state = run.state
        run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off {delay:.0f}s restarting failed container"}}

    def _step_init(self) -> None:
        for run in self.init_runs:
            if run.popen is None and "waiting" in run.state and run.restart_at is None:
                self._start(run)
                return
            if run.restart_at is not None:
                if time.monotonic() >= run.restart_at:
                    run.restart_at = None
                    run.restart_count += 1
                    self._start(run)
                return
            code = self._reap(run)
            if code is None:
                return
            if code != 0:
                if self.restart_policy == "Never":
                    self.phase = "Failed"
                    self.initialized = True
                    return
                self._schedule_restart(run)
                return
        self.initialized = True

    def _step_main(self) -> None:
        now = time.monotonic()
        for run in self.runs:
            if run.popen is None and run.restart_at is None and "waiting" in run.state:
                if now >= run.retry_at:
                    self._start(run)
            elif run.restart_at is not None and now >= run.restart_at:
                run.restart_at = None
                run.restart_count += 1
                self._start(run)
            elif run.running:
                self._probe(run, now)
            elif run.restart_at is None:
                code = self._reap(run)
                if code is not None and self._should_restart(code):
                    self._schedule_restart(run)
        self.phase = self._phase()

    def _probe(self, run: ContainerRun, now: float) -> None:
        assert run.process is not None
        args = (self.box.pod_ip, run.process.ports, run.process.env, str(run.process.cwd))
        if run.startup and not run.startup.passed:
            if run.startup.due(now):
                run.startup.record(probes.run_probe(run.startup.spec, *args), now)
                if run.startup.failed_out:
                    self._kill(run, "startup probe failed")
            return
        if run.readiness and run.readiness.due(now):
            run.readiness.record(probes.run_probe(run.readiness.spec, *args), now)
        if run.liveness and run.liveness.due(now):
            run.liveness.record(probes.run_probe(run.liveness.spec, *args), now)
            if run.liveness.failed_out:
                self._kill(run, "liveness probe failed")

    def _kill(self, run: ContainerRun, why: str) -> None:
        log.info("pod %s: killing %s: %s", self.key, run.name, why)
        self._terminate(run, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def _phase(self) -> str:
        if any(r.running or r.restart_at is not None for r in self.runs):
            return "Running"
        codes = [r.state.get("terminated", {}).get("exitCode") for r in self.runs]
        if any(c is None for c in codes):
            return "Pending" if all(r.popen is None for r in self.runs) else "Running"
        return "Succeeded" if all(c == 0 for c in codes) else "Failed"

    def _terminate(self, run: ContainerRun, grace: float) -> None:
        if not run.running or run.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.popen.pid, signal.SIGTERM)
        try:
            run.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.popen.pid, signal.SIGKILL)
            run.popen.wait()

    def _kill_all(self) -> None:
        for run in self.init_runs + self.runs:
            self._terminate(run, self.grace)
            self._reap(run)

    # -- status ----------------------------------------------------------------------------

    def _conditions(self) -> list[dict[str, Any]]:
        ready = bool(self.runs) and all(r.ready for r in self.runs) and self.phase == "Running"

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False"}

        return [cond("PodReadyToStartContainers", True), cond("Initialized", self.initialized),
                cond("ContainersReady", ready), cond("Ready", ready)]

    def _report_final(self) -> None:
        """The terminal phase must reach the API server, as the kubelet's status manager keeps
        retrying it: a pod whose final write met a restarting API server stayed Running for
        ever, and its Job never finished. Gives up when the pod is gone or after ten minutes."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if self._report():
                    return
            except Exception as exc:  # the API server is down: try again
                log.warning("pod %s: final status not written yet: %s", self.key, type(exc).__name__)
            time.sleep(1.0)

    def _report(self) -> bool:
        """Patch the pod's status when it changed. A condition keeps its lastTransitionTime until
        its status flips, as the kubelet does: a fresh timestamp on every tick would make every
        pod write its status four times a second and flood the API server and every pod watcher."""
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.box.pod_ip, "podIPs": [{"ip": self.box.pod_ip}],
            "startTime": self.started_at,
            "conditions": self._conditions(),
            "containerStatuses": [r.status() for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        if status == self._last_status:
            return True
        reported = copy.deepcopy(status)
        before = {c["type"]: c for c in self._last_reported.get("conditions", [])}
        now = now_rfc3339()
        for condition in reported["conditions"]:
            old = before.get(condition["type"])
            same = old is not None and old["status"] == condition["status"]
            condition["lastTransitionTime"] = old["lastTransitionTime"] if same and old else now
        meta = self.pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": reported},
                                                  _request_timeout=30)
            self._last_status, self._last_reported = copy.deepcopy(status), reported
        except client.ApiException as exc:
            if exc.status == 404:
                self.stopping.set()
                return True  # nothing left to report to
            log.warning("pod %s: status patch failed: %s", self.key, exc.reason)
            return False
        except Exception as exc:  # refused or reset: the API server is down; the processes run
            # on and the next tick writes the status again, as a kubelet does.
            log.warning("pod %s: status patch failed: %s", self.key, type(exc).__name__)
            return False
        return True
