"""Whole passes through a recording fake of the pass's ``Writer``: every reason the end-to-end
failure tests look for by its message, and the ones that need a fault to happen for real (a
report that never arrived, an object that belongs to someone else, a value the API server
refuses), each with its condition, its Warning Event and the writes it leads to. Pure logic."""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from typing import Any

import yaml
from fixtures import listings
from fixtures.gguf_models import Shape, shape_facts
from kquant.operator import builds, config, findings, manifests, observed, reconcile, server_manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import report

REPO = pathlib.Path(__file__).resolve().parents[2]
Reason = findings.Reason
NOW = datetime.datetime.now(datetime.UTC)


class Recorder:
    """Does what a pass asks as an empty cluster would, and remembers it; ``foreign`` objects
    exist and belong to someone else, ``refuse`` maps a kind to the API server's refusal."""

    settings = config.DEFAULTS

    def __init__(self, foreign: set[tuple[str, str]] | None = None, refuse: dict[str, str] | None = None,
                 config_maps: dict[str, list[str]] | None = None, logs: dict[str, str] | None = None,
                 margins: dict[str, str] | None = None) -> None:
        self.logs = logs or {}
        self.margins = margins or {}
        self.recorded: list[tuple[str, int]] = []
        self.log_reads: list[str] = []
        self.foreign = foreign or set()
        self.refuse = refuse or {}
        self.config_maps = config_maps or {}
        self.made: dict[tuple[str, str], manifests.Manifest] = {}
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.event_names: set[str] = set()
        self.deleted_models: set[str] = set()
        self.deleted: list[tuple[str, str]] = []

    def _check(self, manifest: manifests.Manifest) -> tuple[str, str]:
        key = (manifest["kind"], manifest["metadata"]["name"])
        if key in self.foreign:
            raise findings.NotOwnedError(key[0], manifest["metadata"]["namespace"], key[1], "ConfigMap-maker (uid 666)")
        if key[0] in self.refuse:
            raise findings.RefusedError(key[0], key[1], self.refuse[key[0]])
        return key

    def create(self, manifest: manifests.Manifest) -> manifests.Manifest | None:
        key = self._check(manifest)
        if key in self.made:
            return None
        self.made[key] = manifest
        return manifest

    def apply(self, manifest: manifests.Manifest) -> manifests.Manifest:
        self.made[self._check(manifest)] = manifest
        return manifest

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> str:
        self.statuses.append(status)
        return str(len(self.statuses))

    def event(self, qm: api.QuantizedModel, kind: str, reason: str, message: str, once: str | None = None) -> None:
        # As the API server does with a fixed Event name: a second create of it is refused.
        if once is not None and once in self.event_names:
            return
        if once is not None:
            self.event_names.add(once)
        self.events.append((kind, reason, message))

    def delete(self, manifest: manifests.Manifest) -> bool:
        self.deleted.append((manifest["kind"], manifest["metadata"]["name"]))
        return self.made.pop((manifest["kind"], manifest["metadata"]["name"]), None) is not None

    def config_map_keys(self, namespace: str, name: str) -> list[str] | None:
        return self.config_maps.get(name)

    def model_exists(self, namespace: str, name: str, uid: str) -> bool:
        return uid not in self.deleted_models

    def pod_log(self, namespace: str, name: str, container: str) -> str | None:
        self.log_reads.append(name)
        return self.logs.get(name)

    def plan_margins(self) -> tuple[dict[str, str], str]:
        return self.margins, "ConfigMap kquant-system/kquant-margins"

    def record_margin(self, product: str, excess: int) -> None:
        self.recorded.append((product, excess))

    def warnings(self) -> set[str]:
        return {reason for kind, reason, _ in self.events if kind == "Warning"}


def _body(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="uid-1", generation=1, resourceVersion="1")
    body["spec"]["variants"] = [{"name": "q8", "type": "Q8_0"}]
    body["spec"]["serving"]["variant"] = "q8"
    body["spec"].update(spec)
    return body


def _build(body: dict[str, Any]) -> builds.Build:
    return builds.plan_builds(api.QuantizedModel.model_validate(body), "ml")[0]


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def _pass(recorder: Recorder, body: dict[str, Any], children: observed.Children | None = None,
          nodes: list[dict[str, Any]] | None = None) -> reconcile.Result:
    """One pass; the model's sizing Job has listed SmolLM2 already (``test_operator_sizing`` covers it)."""
    view = reconcile.ClusterView(nodes=nodes or [], pods=[])
    return reconcile.reconcile(recorder, body, listings.with_sizing(body, children or observed.Children()), view)


def _owned(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"ownerReferences": [{"uid": body["metadata"]["uid"]}], **extra}


def _job(body: dict[str, Any], name: str, **status: Any) -> observed.BuildJob:
    return observed.build_job({"metadata": _owned(body, name=name, uid="job-uid"), "status": status})


def _report(build: builds.Build, gate: bool = True, facts: dict[str, Any] | None = None, fmt: str = "gguf") -> str:
    variant = report.VariantReport(name=build.variant, digest=build.digest, type="Q8_0", recipe="uniform",
                                   size_bytes=144_000_000, path=f"/var/lib/kquant/{build.digest}/q8.gguf",
                                   gate_passed=gate, facts=facts, format=fmt,
                                   gate=report.Gate(passed=gate, reasons=[] if gate else ["KL 0.2 > 1e-06"]))
    return report.BuildReport(status=report.BuildStatus.SUCCEEDED, quantizer_version="0",
                              variants=[variant]).to_json()


def _built(body: dict[str, Any], build: builds.Build, **kwargs: Any) -> observed.Children:
    configmap = observed.build_configmap({"metadata": _owned(body, name=build.name),
                                          "data": {"report": _report(build, **kwargs)}})
    return observed.Children.collect(configmaps=[configmap], jobs=[_job(body, build.name)],
                                     claims=["smollm2-storage"], owner=body["metadata"]["uid"])


def test_a_new_model_gets_its_claim_and_its_first_build_and_says_so() -> None:
    recorder = Recorder()
    result = _pass(recorder, _body())
    kinds = [kind for kind, _ in recorder.made]
    assert kinds == ["PersistentVolumeClaim", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    assert result.written is not None and _condition(result.written.status, "Quantized")["reason"] == Reason.BUILDING
    assert recorder.warnings() == set()


def test_a_missing_token_secret_says_which_and_how_to_create_it() -> None:
    body = _body()
    body["spec"]["source"]["huggingface"]["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
    build = _build(body)
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
    pod = observed.build_pod({"metadata": {"name": "p", "labels": {"job-name": build.name},
                                           "ownerReferences": [{"uid": "job-uid"}]},
                              "status": {"containerStatuses": [{"state": {"waiting": waiting}}]}})
    children = observed.Children.collect(jobs=[_job(body, build.name)], pods=[pod], claims=["smollm2-storage"],
                                         owner="uid-1")
    recorder = Recorder()
    result = _pass(recorder, body, children)
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.SECRET_NOT_FOUND
    assert "'hf-token'" in quantized["message"] and "kubectl create secret" in quantized["message"]
    assert Reason.SECRET_NOT_FOUND in recorder.warnings()
    assert ("Job", build.name) not in recorder.made, "a blocked build is not started twice"


def test_a_missing_configmap_key_is_not_called_a_missing_secret() -> None:
    body = _body(calibration={"configMapRef": {"name": "calib", "key": "text.txt"}})
    build = _build(body)
    message = "couldn't find key spec.json in ConfigMap ml/" + build.name
    qm = api.QuantizedModel.model_validate(body)
    why, text = reconcile.blocked(qm, build, "CreateContainerConfigError", message)
    assert why is Reason.CONFIG_NOT_FOUND and "has no key 'spec.json'" in text
    why, text = reconcile.blocked(qm, build, "CreateContainerConfigError", 'configmap "calib" not found')
    assert why is Reason.CONFIG_NOT_FOUND and "spec.calibration.configMapRef" in text
    why, text = reconcile.blocked(qm, build, "ErrImagePull", "pull access denied")
    assert why is Reason.BUILD_BLOCKED and "spec.quantizer.image" in text


def test_a_calibration_configmap_that_does_not_exist_blocks_the_build_before_its_job() -> None:
    body = _body(calibration={"configMapRef": {"name": "calib", "key": "text.txt"}})
    recorder = Recorder()
    result = _pass(recorder, body)
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.CONFIG_NOT_FOUND
    assert "spec.calibration.configMapRef names ConfigMap 'calib'" in quantized["message"]
    assert not any(kind == "Job" for kind, _ in recorder.made), "no pod left in ContainerCreating for ever"
    assert result.again_in == reconcile.CONFIG_RECHECK_SECONDS, "the operator does not watch users' ConfigMaps"
    assert Reason.CONFIG_NOT_FOUND in recorder.warnings()
    # The key is missing: the keys that are there are named.
    recorder = Recorder(config_maps={"calib": ["other.txt"]})
    result = _pass(recorder, body)
    assert result.written is not None
    assert "which has only 'other.txt'" in _condition(result.written.status, "Quantized")["message"]
    # Once it is there, the build starts.
    recorder = Recorder(config_maps={"calib": ["text.txt"]})
    _pass(recorder, body)
    assert any(kind == "Job" for kind, _ in recorder.made)


def test_a_failed_build_carries_the_quantizers_reason() -> None:
    body = _body()
    build = _build(body)
    failed = report.BuildReport(status=report.BuildStatus.FAILED, quantizer_version="0",
                                reason="revision 'no-such-branch' not found")
    configmap = observed.build_configmap({"metadata": _owned(body, name=build.name),
                                          "data": {"report": failed.to_json()}})
    ended = _job(body, build.name, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                                "message": "container quantizer exited with 3"}])
    children = observed.Children.collect(configmaps=[configmap], jobs=[ended],
                                         claims=["smollm2-storage"], owner="uid-1")
    recorder = Recorder()
    result = _pass(recorder, body, children)
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.BUILD_FAILED and "no-such-branch" in quantized["message"]
    assert result.written.status["phase"] == "Failed"
    assert Reason.BUILD_FAILED in recorder.warnings()


def test_a_failed_try_whose_job_retries_is_still_running() -> None:
    """The quantizer exited 1 (the hub answered 503) and the Job runs its next pod: not a failure yet."""
    body = _body()
    build = _build(body)
    failed = report.BuildReport(status=report.BuildStatus.FAILED, quantizer_version="0",
                                reason="the hub answered 503 Service Unavailable")
    configmap = observed.build_configmap({"metadata": _owned(body, name=build.name),
                                          "data": {"report": failed.to_json()}})
    children = observed.Children.collect(configmaps=[configmap], jobs=[_job(body, build.name, active=1, failed=1)],
                                         claims=["smollm2-storage"], owner="uid-1")
    recorder = Recorder()
    result = _pass(recorder, body, children)
    assert result.written is not None
    assert result.written.status["phase"] != "Failed"
    assert "retrying after: the hub answered 503" in result.written.status["progress"]
    assert Reason.BUILD_FAILED not in recorder.warnings()


def test_a_job_that_completed_without_a_report_fails_with_its_own_reason() -> None:
    body = _body()
    build = _build(body)

    def children(completed: datetime.datetime) -> observed.Children:
        job = _job(body, build.name, completionTime=completed.isoformat().replace("+00:00", "Z"),
                   conditions=[{"type": "Complete", "status": "True"}])
        progress = observed.build_configmap({"metadata": _owned(body, name=build.name),
                                             "data": {"progress": "q8 1/1 publishing 100%"}})
        return observed.Children.collect(configmaps=[progress], jobs=[job], claims=["smollm2-storage"],
                                         owner="uid-1")

    # Just completed: the report may still be on its way through the ConfigMaps' watch. The pass
    # reads the wall clock, so "just" is now, not the module's NOW (collected long before in a full run).
    now = datetime.datetime.now(datetime.UTC)
    recorder = Recorder()
    result = _pass(recorder, body, children(now))
    assert result.written is not None
    assert _condition(result.written.status, "Quantized")["reason"] == Reason.BUILDING
    assert result.again_in is not None and 0 < result.again_in <= reconcile.REPORT_GRACE_SECONDS
    # Long after: not "running" for ever, but a failure that says what is missing.
    recorder = Recorder()
    result = _pass(recorder, body, children(now - datetime.timedelta(minutes=5)))
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.REPORT_MISSING
    assert f"ConfigMap {build.name} holds no final report" in quantized["message"]
    assert result.written.status["phase"] == "Failed"
    assert _condition(result.written.status, "Stalled")["status"] == "True"
    assert Reason.REPORT_MISSING in recorder.warnings()


def test_a_variant_that_failed_its_gate_is_never_served() -> None:
    body = _body()
    build = _build(body)
    recorder = Recorder()
    result = _pass(recorder, body, _built(body, build, gate=False))
    assert result.written is not None
    serving = _condition(result.written.status, "Serving")
    assert serving["reason"] == Reason.GATE_FAILED and "q8 failed its quality gate" in serving["message"]
    assert not any(kind == "Deployment" for kind, _ in recorder.made)
    assert Reason.GATE_FAILED in recorder.warnings()


def test_serving_a_bnb_variant_is_an_invalid_spec_that_says_llama_server_serves_gguf_only() -> None:
    body = _body(variants=[{"name": "q8", "type": "Q8_0"}, {"name": "nf4", "format": "bnb-nf4"}])
    body["spec"]["serving"]["variant"] = "nf4"
    recorder = Recorder()
    # no sizing fixture: it parses the model, which is the step that refuses it
    result = reconcile.reconcile(recorder, body, observed.Children(), reconcile.ClusterView(nodes=[], pods=[]))
    assert result.written is not None
    ready = _condition(result.written.status, "Ready")
    assert ready["reason"] == Reason.INVALID_SPEC
    assert "spec.serving.variant" in ready["message"] and "llama-server serves GGUF only" in ready["message"]
    assert not any(kind in ("Job", "Deployment") for kind, _ in recorder.made)


def test_a_built_bnb_variant_shows_its_format_and_is_never_rolled_out() -> None:
    """A report that says bnb for the served name (an object stored before the CEL rule, or a
    variant whose format was edited) never reaches llama-server."""
    body = _body()
    build = _build(body)
    recorder = Recorder()
    result = _pass(recorder, body, _built(body, build, fmt="bnb-nf4"))
    assert result.written is not None
    assert result.written.status["variants"][0]["format"] == "bnb-nf4"
    serving = _condition(result.written.status, "Serving")
    assert serving["reason"] == Reason.NOT_SERVABLE and "llama-server serves GGUF only" in serving["message"]
    assert not any(kind == "Deployment" for kind, _ in recorder.made)


def _gpu_node(gib: int) -> dict[str, Any]:
    return {"metadata": {"name": "gpu", "labels": {"nvidia.com/gpu.product": "T4", "nvidia.com/gpu.memory":
                                                    str(gib * 1024), "nvidia.com/gpu.count": "1"}},
            "status": {"allocatable": {"nvidia.com/gpu": "1", "memory": "64Gi"}}}


def test_a_context_no_gpu_holds_is_not_rolled_out_and_says_why() -> None:
    body = _body()
    body["spec"]["serving"].update({"gpus": 1, "gpuLayers": 61})
    build = _build(body)
    facts = shape_facts(Shape(n_layer=60, n_embd=8192, n_ff=65536, n_head=64, n_head_kv=8, n_vocab=32000))
    children = _built(body, build, facts=json.loads(facts.model_dump_json()))
    recorder = Recorder()
    result = _pass(recorder, body, children, nodes=[_gpu_node(16)])
    assert result.written is not None
    serving = _condition(result.written.status, "Serving")
    assert serving["reason"] == Reason.DOES_NOT_FIT and "fits no GPU pool" in serving["message"]
    assert Reason.DOES_NOT_FIT in recorder.warnings()
    assert not any(kind == "Deployment" for kind, _ in recorder.made), "nothing left Pending"
    assert reconcile.waits_for_capacity({"status": result.written.status})
    recorder = Recorder()
    result = _pass(recorder, body, children, nodes=[])
    assert result.written is not None and _condition(result.written.status, "Serving")["reason"] == Reason.NO_GPU_NODES


def test_a_built_variant_is_served_on_cpu() -> None:
    body = _body()
    build = _build(body)
    recorder = Recorder()
    result = _pass(recorder, body, _built(body, build))
    assert ("Deployment", "smollm2-server") in recorder.made and ("Service", "smollm2") in recorder.made
    assert result.written is not None
    assert _condition(result.written.status, "Serving")["reason"] == Reason.ROLLING_OUT


def test_an_object_that_belongs_to_someone_else_is_a_conflict_that_names_it() -> None:
    body = _body()
    build = _build(body)
    recorder = Recorder(foreign={("ConfigMap", build.name)})
    result = _pass(recorder, body)
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.CONFLICT
    assert f"ConfigMap ml/{build.name} exists and belongs to ConfigMap-maker" in quantized["message"]
    assert not any(kind == "Job" for kind, _ in recorder.made), "the build never runs on a foreign spec"
    assert Reason.CONFLICT in recorder.warnings()
    # A Service of the model's name that is someone else's: not rewritten, and the status says so.
    recorder = Recorder(foreign={("Service", "smollm2")})
    result = _pass(recorder, body, _built(body, build))
    assert result.written is not None
    serving = _condition(result.written.status, "Serving")
    assert serving["reason"] == Reason.CONFLICT and "Service ml/smollm2" in serving["message"]


def test_a_value_the_api_server_refuses_names_the_field_once() -> None:
    body = _body()
    body["spec"]["quantizer"]["resources"] = {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}
    refusal = ('Job.batch "smollm2-q8-0123abcd" is invalid: spec.template.spec.containers[0].resources.requests: '
               'Invalid value: "2Gi": must be less than or equal to memory limit of 1Gi')
    recorder = Recorder(refuse={"Job": refusal})
    result = _pass(recorder, body)  # no exception: the work queue does not retry it for ever
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.REFUSED
    assert "spec.quantizer.resources" in quantized["message"] and "less than or equal" in quantized["message"]
    assert [e[1] for e in recorder.events if e[0] == "Warning"] == [Reason.REFUSED], "one Warning per reason"
    # The next pass over the stored status changes nothing and says nothing again.
    stored = {**body, "status": result.written.status}
    again = Recorder(refuse={"Job": refusal})
    assert _pass(again, stored).written is None and again.events == []




def test_no_build_starts_for_a_model_the_api_server_no_longer_has() -> None:
    """The index still holds a model being deleted: its pass must not make a Job that the
    garbage collector would have to find later."""
    recorder = Recorder()
    recorder.deleted_models.add("uid-1")
    result = _pass(recorder, _body())
    assert not any(kind == "Job" for kind, _ in recorder.made), recorder.made
    assert result.written is not None and result.written.status["variants"][0]["message"] == "Queued"

def test_a_pass_repeated_after_its_status_write_was_lost_posts_no_event_twice() -> None:
    """The operator killed between a pass's Events and its status write: the next pass sees the
    old status, makes the same changes and posts the same Events, which must not be new ones."""
    body = _body()
    build = _build(body)
    first = _pass(recorder := Recorder(), body)
    assert first.written is not None
    stored = {**body, "status": first.written.status}
    recorder.events.clear()
    done = _pass(recorder, stored, _built(body, build))  # the build finishes: Ready and more change
    assert recorder.events, "the finished build is announced"
    announced = list(recorder.events)
    again = _pass(recorder, stored, _built(body, build))  # killed before the write: the same pass again
    assert again.written is not None and done.written is not None
    assert recorder.events == announced, "the repeated pass posted its Events a second time"
    # The same change made again later (the state it leaves began at another time) is a new Event.
    later = {**stored, "status": {**stored["status"], "conditions": [
        {**c, "lastTransitionTime": "2030-01-01T00:00:00Z"} for c in stored["status"]["conditions"]]}}
    change = api.Condition.model_validate(done.written.status["conditions"][0])

    def name_of(model_body: dict[str, Any]) -> str:
        qm = api.QuantizedModel.model_validate(model_body)
        assert qm.status is not None and qm.status.conditions
        return reconcile.transition_id(qm, change, qm.status.conditions[0])

    assert name_of(stored) == name_of(stored) != name_of(later)

def test_children_that_carry_the_models_labels_but_not_its_uid_are_ignored() -> None:
    body = _body()
    build = _build(body)
    forged = observed.build_configmap({"metadata": {"name": build.name, "ownerReferences": [{"uid": "mallory"}]},
                                       "data": {"report": _report(build)}})
    children = observed.Children.collect(configmaps=[forged], claims=["smollm2-storage"], owner="uid-1")
    assert children.configmaps == {}
    recorder = Recorder()
    _pass(recorder, body, children)
    assert not any(kind == "Deployment" for kind, _ in recorder.made), "a forged report is never served"


def _failed_children(body: dict[str, Any], build: builds.Build, retry: str = "") -> observed.Children:
    failed = report.BuildReport(status=report.BuildStatus.FAILED, quantizer_version="0", reason="hub said 500")
    meta = _owned(body, name=build.name, annotations={observed.RETRY_ANNOTATION: retry} if retry else {})
    configmap = observed.build_configmap({"metadata": meta, "data": {"report": failed.to_json()}})
    job = _job(body, build.name, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    return observed.Children.collect(configmaps=[configmap], jobs=[job], claims=["smollm2-storage"], owner="uid-1")


def test_a_retry_token_runs_a_failed_build_again_once() -> None:
    body = _body()
    build = _build(body)
    recorder = Recorder()
    _pass(recorder, body, _failed_children(body, build))
    assert recorder.deleted == [], "a failure is final until someone asks"
    body["metadata"]["annotations"] = {observed.RETRY_ANNOTATION: "2026-12-07T03:00:00Z"}
    recorder = Recorder()
    result = _pass(recorder, body, _failed_children(body, build))
    assert recorder.deleted == [("Job", build.name), ("ConfigMap", build.name)]
    configmap = recorder.made[("ConfigMap", build.name)]
    assert configmap["metadata"]["annotations"] == {observed.RETRY_ANNOTATION: "2026-12-07T03:00:00Z"}
    assert ("Job", build.name) in recorder.made
    assert result.written is not None and _condition(result.written.status, "Quantized")["reason"] == Reason.BUILDING
    # The retried build failed again: the same token does not retry it a second time.
    recorder = Recorder()
    _pass(recorder, body, _failed_children(body, build, retry="2026-12-07T03:00:00Z"))
    assert recorder.deleted == []


def test_what_no_current_build_needs_is_removed_but_reports_a_rollback_needs_stay() -> None:
    body = _body()
    build = _build(body)
    old_running, old_built, old_failed = (f"smollm2-q8-{c * 8}" for c in "abc")
    old_build = dataclasses.replace(build, digest="b" * 16)
    built = observed.build_configmap({"metadata": _owned(body, name=old_built, labels={"kquant.dev/variant": "q8"}),
                                      "data": {"report": _report(old_build)}})
    failed = observed.build_configmap({"metadata": _owned(body, name=old_failed), "data": {"progress": "failed"}})
    running = observed.build_configmap({"metadata": _owned(body, name=old_running), "data": {}})
    children = observed.Children.collect(configmaps=[built, failed, running], jobs=[_job(body, old_running)],
                                         claims=["smollm2-storage"], owner="uid-1")
    recorder = Recorder()
    _pass(recorder, body, children)
    assert ("Job", old_running) in recorder.deleted, "a build whose digest left the spec is cancelled"
    assert {("ServiceAccount", old_failed), ("ConfigMap", old_failed)} <= set(recorder.deleted)
    assert all(name != old_built for _, name in recorder.deleted), "a rollback may need that report"
    assert ("ConfigMap", old_running) not in recorder.deleted, "its Job goes first"
    assert ("Job", build.name) in recorder.made, "the current build starts"


def test_removing_spec_serving_removes_the_server_and_its_status() -> None:
    body = _body()
    build = _build(body)
    children = _built(body, build)
    served = Recorder()
    first = _pass(served, body, children)
    assert first.written is not None
    assert first.written.status["serving"]["variant"] == "q8"
    body["status"] = first.written.status
    deployment = observed.server_deployment({"metadata": _owned(body, name="smollm2-server")}, "v", "h")
    children = dataclasses.replace(children, deployments={"smollm2-server": deployment})
    del body["spec"]["serving"]
    recorder = Recorder()
    result = _pass(recorder, body, children)
    assert ("Deployment", "smollm2-server") in recorder.deleted and ("Service", "smollm2") in recorder.deleted
    assert result.written is not None and result.written.status["serving"] is None


def test_the_argo_cd_health_check_knows_every_reason_that_needs_a_person() -> None:
    lua = (REPO / "charts/kquant/files/argocd-health.lua").read_text()
    table = lua[lua.index("local needs_a_person = {"):lua.index("}", lua.index("local needs_a_person"))]
    named = {word.split("=")[0].strip() for word in table.split("{", 1)[1].split(",") if "=" in word}
    assert named == {reason.value for reason in findings.STALLED_REASONS}
    assert findings.STALLED_REASONS <= findings.WARNING_REASONS


# -- the plan checked against the served pod's startup log --------------------------------------

SERVER_LOGS = REPO / "tests" / "fixtures" / "server_logs"


def _smollm2_facts() -> dict[str, Any]:
    """The facts of the GGUF the fixture logs were written with (saved beside them by capture.py)."""
    data: dict[str, Any] = json.loads((SERVER_LOGS / "smollm2-facts.json").read_text())
    return data


def _served(body: dict[str, Any], recorder: Recorder, log_name: str | None,
            ready: bool = True) -> tuple[reconcile.Result, observed.Children]:
    """Roll out, then a pass that sees the Deployment rolled out and its pod (Ready or not)."""
    build = _build(body)
    facts = _smollm2_facts()
    children = _built(body, build, facts=facts)
    first = _pass(recorder, body, children, nodes=[_gpu_node(24)])
    assert first.written is not None
    deployment = recorder.made[("Deployment", "smollm2-server")]
    stored = {**deployment, "metadata": {**deployment["metadata"], "generation": 1,
                                         "ownerReferences": [{"uid": body["metadata"]["uid"]}]},
              "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
                         "readyReplicas": 1}}
    digest = deployment["spec"]["template"]["metadata"]["labels"][manifests.DIGEST_LABEL]
    pod = observed.server_pod({"metadata": {"name": "smollm2-server-abc-xyz", "uid": "pod-1",
                                            "labels": {manifests.DIGEST_LABEL: digest}},
                               "spec": {"nodeName": "gpu"},
                               "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}},
                              manifests.DIGEST_LABEL)
    if log_name is not None:
        recorder.logs[pod.name] = (SERVER_LOGS / f"{log_name}.log").read_text()
    children = dataclasses.replace(
        children, deployments={"smollm2-server": observed.server_deployment(
            stored, manifests.VARIANT_LABEL, server_manifests.HASH_ANNOTATION)}, server_pods=(pod,))
    body = {**body, "status": first.written.status}
    return _pass(recorder, body, children, nodes=[_gpu_node(24)]), children


def _plan_body(context: int = 2048) -> dict[str, Any]:
    body = _body()
    body["spec"]["serving"].update({"gpus": 1, "gpuLayers": "auto", "contextSize": context, "parallel": 1})
    return body


def test_the_served_pods_log_verifies_the_plan_once() -> None:
    recorder = Recorder()
    result, children = _served(_plan_body(), recorder, "rpc1-full")
    assert result.written is not None
    verified = _condition(result.written.status, "PlanVerified")
    assert (verified["status"], verified["reason"]) == ("True", Reason.PLAN_HELD), verified["message"]
    check = result.written.status["serving"]["planCheck"]
    assert (check["podUid"], check["gpuProduct"], check["plannedLayers"], check["offloadedLayers"]) == \
        ("pod-1", "T4", 31, 31)
    gpu = check["devices"][0]
    assert gpu["device"] == "GPU0" and gpu["name"].startswith("RPC0 (127.0.0.1:")
    assert abs(gpu["errorRatio"]) < 0.01, gpu  # the memory model matches llama-server on this device
    assert recorder.log_reads == ["smollm2-server-abc-xyz"]
    # the next pass finds the pod's uid in status and reads nothing
    again = _pass(recorder, {**_plan_body(), "status": result.written.status}, children, nodes=[_gpu_node(24)])
    assert recorder.log_reads == ["smollm2-server-abc-xyz"] and again.written is None


def test_fewer_layers_offloaded_than_planned_is_a_warning() -> None:
    """The log of a server that put 20 of the planned 31 layers on the GPU: the silent CPU fallback."""
    recorder = Recorder()
    result, _ = _served(_plan_body(), recorder, "rpc1-partial")
    assert result.written is not None
    verified = _condition(result.written.status, "PlanVerified")
    assert (verified["status"], verified["reason"]) == ("False", Reason.FEWER_LAYERS_OFFLOADED)
    assert "offloaded 20 of the 31 planned layers" in verified["message"]
    assert Reason.FEWER_LAYERS_OFFLOADED in recorder.warnings()
    assert _condition(result.written.status, "Ready")["status"] == "True", "it still serves"


def test_a_cpu_only_server_on_a_gpu_plan_offloaded_nothing() -> None:
    recorder = Recorder()
    result, _ = _served(_plan_body(), recorder, "cpu")
    assert result.written is not None
    verified = _condition(result.written.status, "PlanVerified")
    assert verified["reason"] == Reason.FEWER_LAYERS_OFFLOADED and "offloaded 0 of the 31" in verified["message"]


def test_more_memory_than_predicted_names_the_device_and_the_numbers() -> None:
    """A plan made for 1024 cells against a server that allocated 2048: the KV cache is twice the prediction."""
    recorder = Recorder()
    result, _ = _served(_plan_body(context=1024), recorder, "rpc1-full")
    assert result.written is not None
    verified = _condition(result.written.status, "PlanVerified")
    assert (verified["status"], verified["reason"]) == ("False", Reason.MEMORY_ABOVE_PLAN)
    assert "GPU0 allocated" in verified["message"] and "more than the" in verified["message"]
    assert Reason.MEMORY_ABOVE_PLAN in recorder.warnings()
    gpu = result.written.status["serving"]["planCheck"]["devices"][0]
    assert gpu["measuredBytes"] > gpu["predictedBytes"] and gpu["errorRatio"] > 0.05
    # the excess is kept for the node's GPU product, for the plans that follow
    assert recorder.recorded == [("T4", gpu["measuredBytes"] - gpu["predictedBytes"])]


def test_a_learned_margin_enters_the_plan_and_its_explanation() -> None:
    body = _plan_body()
    build = _build(body)
    children = _built(body, build, facts=_smollm2_facts())
    plain = _pass(Recorder(), body, children, nodes=[_gpu_node(24)])
    learned = _pass(Recorder(margins={"T4": str(300 * 1024 * 1024)}), body, children, nodes=[_gpu_node(24)])
    assert plain.written is not None and learned.written is not None
    assert "learned margin" not in plain.written.status["serving"]["explanation"]
    assert ("learned margin 0.29 GiB for T4 from ConfigMap kquant-system/kquant-margins"
            in learned.written.status["serving"]["explanation"])
    assert "CUDA context and margin 1.29 GiB" in learned.written.status["serving"]["explanation"]


def test_no_check_before_ready_or_without_a_readable_log() -> None:
    recorder = Recorder()
    result, _ = _served(_plan_body(), recorder, "rpc1-full", ready=False)
    assert recorder.log_reads == []
    recorder = Recorder()
    result, _ = _served(_plan_body(), recorder, None)
    assert recorder.log_reads == ["smollm2-server-abc-xyz"]
    assert result.written is not None
    assert not any(c["type"] == "PlanVerified" for c in result.written.status["conditions"])
    assert result.written.status["serving"]["planCheck"]["devices"][0]["predictedBytes"] > 0
