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
from fixtures.gguf_models import Shape, shape_facts
from kquant.operator import builds, config, findings, manifests, observed, reconcile
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
                 config_maps: dict[str, list[str]] | None = None) -> None:
        self.foreign = foreign or set()
        self.refuse = refuse or {}
        self.config_maps = config_maps or {}
        self.made: dict[tuple[str, str], manifests.Manifest] = {}
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
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

    def event(self, qm: api.QuantizedModel, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def delete(self, manifest: manifests.Manifest) -> bool:
        self.deleted.append((manifest["kind"], manifest["metadata"]["name"]))
        return self.made.pop((manifest["kind"], manifest["metadata"]["name"]), None) is not None

    def config_map_keys(self, namespace: str, name: str) -> list[str] | None:
        return self.config_maps.get(name)

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
    view = reconcile.ClusterView(nodes=nodes or [], pods=[])
    return reconcile.reconcile(recorder, body, children or observed.Children(), view)


def _owned(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"ownerReferences": [{"uid": body["metadata"]["uid"]}], **extra}


def _job(body: dict[str, Any], name: str, **status: Any) -> observed.BuildJob:
    return observed.build_job({"metadata": _owned(body, name=name, uid="job-uid"), "status": status})


def _report(build: builds.Build, gate: bool = True, facts: dict[str, Any] | None = None) -> str:
    variant = report.VariantReport(name=build.variant, digest=build.digest, type="Q8_0", recipe="uniform",
                                   size_bytes=144_000_000, path=f"/var/lib/kquant/{build.digest}/q8.gguf",
                                   gate_passed=gate, facts=facts,
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
    children = observed.Children.collect(configmaps=[configmap], jobs=[_job(body, build.name)],
                                         claims=["smollm2-storage"], owner="uid-1")
    recorder = Recorder()
    result = _pass(recorder, body, children)
    assert result.written is not None
    quantized = _condition(result.written.status, "Quantized")
    assert quantized["reason"] == Reason.BUILD_FAILED and "no-such-branch" in quantized["message"]
    assert result.written.status["phase"] == "Failed"
    assert Reason.BUILD_FAILED in recorder.warnings()


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
