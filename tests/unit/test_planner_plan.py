"""The planner's decisions on synthetic models: pure, no GGUF file and no GPU."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import gguf
import pytest
from kquant.operator.planner import __main__ as cli
from kquant.operator.planner import memory, plan
from kquant.quantizer import constants

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures import gguf_models

MiB = memory.MiB
GiB = memory.GiB
TINY = gguf_models.shape_facts(gguf_models.Shape())
EXACT = plan.PlannerSettings(backend=memory.Backend.RPC, cuda_context_bytes=0, margin_bytes=0)
CTX = memory.ContextSettings(4096)


def request(gpus: tuple[int, ...], **kw: object) -> plan.PlanRequest:
    base = plan.PlanRequest(facts=TINY, context=CTX, gpu_memory=gpus, settings=EXACT)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_a_big_gpu_takes_everything() -> None:
    p = plan.plan(request((1 * GiB,)))
    assert p.fits and p.full_offload
    assert p.gpu_layers == p.total_layers == 9
    assert p.host.model == TINY.token_embd_bytes  # the input layer always stays on the CPU
    assert p.smallest_fit is None
    args = p.server_args()
    assert args[:2] == ("--n-gpu-layers", "9")
    assert "--fit" in args and args[args.index("--fit") + 1] == "off"
    assert "--tensor-split" not in args


@pytest.mark.parametrize(("budget_mib", "ngl"), [(100, 1), (103, 2), (119, 4), (150, 8), (170, 9)])
def test_partial_offload_is_output_first_then_whole_blocks(budget_mib: int, ngl: int) -> None:
    # output 31.25 MiB + logits buffer 63.5 MiB first, then 7.75 MiB (block + its KV) per -ngl step
    p = plan.plan(request((budget_mib * MiB,)))
    assert p.fits
    assert p.gpu_layers == ngl
    assert p.predicted_gpu_bytes[0] <= budget_mib * MiB
    if ngl < 9:
        fit = p.smallest_fit
        assert fit is not None
        # more of these GPUs, or one bigger GPU
        budget = budget_mib * MiB
        assert fit.memory_per_gpu <= budget if fit.gpus > 1 else fit.memory_per_gpu > budget
        assert f"full offload needs {fit.gpus} GPU(s)" in p.explanation
        bigger = plan.plan(request((budget_mib * MiB + 8 * MiB,)))
        assert bigger.gpu_layers > ngl  # the choice is the largest that fits, not just any


def test_nothing_fits_names_the_smallest_configuration() -> None:
    p = plan.plan(request((64 * MiB,)))
    assert not p.fits
    assert p.gpu_layers == 0
    assert "does not fit" in p.explanation
    assert p.smallest_fit is not None
    assert p.smallest_fit.gpus == 1
    assert p.smallest_fit.memory_per_gpu == plan.plan(request((1 * GiB,))).predicted_gpu_bytes[0]


def test_smallest_fit_counts_gpus_of_the_node_size() -> None:
    big = gguf_models.shape_facts(gguf_models.Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                                                    n_ff=14336, n_vocab=128256))  # fmt: skip
    settings = plan.PlannerSettings()
    ctx = memory.ContextSettings(8192)
    fit = plan.smallest_fit(big, ctx, settings, gpu_memory=8 * GiB)
    assert fit.gpus == 3  # ~15 GiB of F16 weights + KV + overheads over 8 GiB cards
    assert fit.memory_per_gpu <= 8 * GiB
    one = plan.smallest_fit(big, ctx, settings)
    assert one.gpus == 1 and one.memory_per_gpu > 15 * GiB


def test_cuda_overheads_are_reserved_per_gpu() -> None:
    settings = dataclasses.replace(EXACT, cuda_context_bytes=300 * MiB, margin_bytes=200 * MiB)
    p = plan.plan(request((700 * MiB,), settings=settings))
    assert p.full_offload
    assert p.predicted_gpu_bytes[0] == p.devices[0].total + 500 * MiB
    tight = plan.plan(request((640 * MiB,), settings=settings))
    assert not tight.full_offload


def test_two_gpus_split_layers_so_each_fits() -> None:
    # Neither GPU holds the whole model (156.75 MiB); with the layers split over two GPUs llama.cpp
    # turns on pipeline parallelism, which keeps 4 copies of each GPU's inputs.
    gpus = (80 * MiB, 160 * MiB)
    p = plan.plan(request(gpus))
    assert p.fits and p.full_offload and p.pipeline_parallel, p.explanation
    assert "pipeline parallelism on" in p.explanation
    assert "--override-tensor" not in p.server_args()
    # Smaller GPUs: the pipelined buffers do not fit, the plain ones do; a tensor override that
    # matches nothing turns pipeline parallelism off (llama.cpp has no switch of its own).
    smaller = plan.plan(request((60 * MiB, 120 * MiB)))
    assert smaller.fits and smaller.full_offload and not smaller.pipeline_parallel, smaller.explanation
    assert "pipeline parallelism off" in smaller.explanation
    args = smaller.server_args()
    assert args[args.index("--override-tensor") + 1] == plan.NO_PIPELINE_OVERRIDE
    assert all(d.total <= b for d, b in zip(smaller.devices, (60 * MiB, 120 * MiB), strict=True))
    # Smaller still: partial offload (the output layer and its logits take the second GPU).
    partial = plan.plan(request((50 * MiB, 100 * MiB)))
    assert partial.fits and partial.gpu_layers == 5 and partial.tensor_split == (4.0, 1.0)
    assert len(p.tensor_split) == 2
    assert all(d.total <= b for d, b in zip(p.devices, gpus, strict=True))
    assert p.devices[1].model >= TINY.output_bytes  # the output layer is on the last GPU
    args = p.server_args()
    assert args[args.index("--tensor-split") + 1] == ",".join(str(int(s)) for s in p.tensor_split)


def test_fixed_gpu_layers_are_checked_not_changed() -> None:
    p = plan.plan(request((100 * MiB,), gpu_layers=9))
    assert p.gpu_layers == 9 and not p.fits
    assert "gpuLayers 9 was asked for" in p.explanation
    with pytest.raises(ValueError, match=r"gpuLayers is 10, but the model has 9 layers \(8 blocks and"):
        plan.plan(request((1 * GiB,), gpu_layers=10))


def test_require_full_offload() -> None:
    strict = dataclasses.replace(EXACT, require_full_offload=True)
    assert not plan.plan(request((130 * MiB,), settings=strict)).fits
    assert plan.plan(request((1 * GiB,), settings=strict)).fits


def test_context_is_reduced_only_when_asked() -> None:
    big_ctx = memory.ContextSettings(65536)
    kept = plan.plan(request((200 * MiB,), context=big_ctx))
    assert kept.context.context == 65536 and not kept.full_offload
    asked = dataclasses.replace(EXACT, reduce_context=True)
    reduced = plan.plan(request((200 * MiB,), context=big_ctx, settings=asked))
    assert reduced.full_offload and reduced.fits
    assert 2048 <= reduced.context.context < 65536
    assert reduced.explanation.startswith("context reduced from 65536 to")


def test_moe_keeps_attention_on_the_gpu_and_experts_on_the_host() -> None:
    moe = gguf_models.shape_facts(gguf_models.Shape(n_expert=8, n_expert_used=2))
    full = plan.plan(request((4 * GiB,), facts=moe))
    assert full.full_offload
    # A GPU that holds everything but a few layers' experts: --n-cpu-moe beats dropping layers,
    # since only 2 of 8 experts are read per token.
    budget = full.devices[0].total - 3 * moe.layer_expert_bytes[0]
    p = plan.plan(request((budget,), facts=moe))
    assert p.fits
    assert p.gpu_layers == 9 and p.n_cpu_moe == 3, p.explanation
    assert "--n-cpu-moe" in p.server_args()
    assert "experts of the first 3 blocks stay in host memory" in p.explanation
    no_moe = dataclasses.replace(EXACT, moe_on_cpu=False)
    dropped = plan.plan(request((budget,), facts=moe, settings=no_moe))
    assert dropped.n_cpu_moe == 0 and dropped.gpu_layers < 9


def test_seed_formula_is_selectable() -> None:
    seed_settings = dataclasses.replace(EXACT, planner=plan.PlannerKind.SEED)
    p = plan.plan(request((100 * MiB,), settings=seed_settings))
    assert p.planner is plan.PlannerKind.SEED
    assert p.gpu_layers == 100 * MiB * 4 // TINY.file_bytes  # floor(VRAM / size * (8 - 4))
    assert "seed formula" in p.explanation


def test_cpu_only_plan() -> None:
    p = plan.plan(request(()))
    assert p.gpu_layers == 0 and p.devices == ()
    assert p.host.model == TINY.total_bytes


def test_request_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="tensorSplit has 1 entries, but the pod gets 2 GPU"):
        plan.plan(request((GiB, GiB), tensor_split=(1.0,)))
    with pytest.raises(ValueError, match="contextSize is 0"):
        memory.ContextSettings(0)


def test_dry_run_prints_a_plan(tmp_path: Path) -> None:
    facts_json = tmp_path / "facts.json"
    facts_json.write_text(TINY.model_dump_json())
    out = cli.dry_run([str(facts_json), "--dry-run", "--gpu", "130MiB", "-c", "4096", "--backend", "rpc",
                       "--cuda-context", "0", "--margin", "0"])  # fmt: skip
    assert "fits: -ngl 5" in out
    assert "llama-server --n-gpu-layers 5 --ctx-size 4096" in out
    as_json = json.loads(cli.dry_run([str(facts_json), "--gpu", "8GiB", "--gpus", "2", "--json",
                                      "-ctk", "q8_0", "-ctv", "q8_0"]))  # fmt: skip
    assert as_json["gpuLayers"] == 9 and as_json["fits"] is True
    assert as_json["args"][as_json["args"].index("--cache-type-k") + 1] == constants.CacheType.Q8_0.value
    assert cli.parse_size("24GiB") == 24 * GiB and cli.parse_size("81559MiB") == 81559 * MiB


def test_fewest_gpus_for_a_node_pool() -> None:
    big = gguf_models.shape_facts(gguf_models.Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                                                    n_ff=14336, n_vocab=128256))  # fmt: skip
    ctx = memory.ContextSettings(8192)
    p = plan.fewest_gpus(big, ctx, 8 * GiB, available=4)
    assert p.fits and p.full_offload
    assert len(p.gpu_memory) == 3
    assert all(b <= 8 * GiB for b in p.predicted_gpu_bytes)
    short = plan.fewest_gpus(big, ctx, 8 * GiB, available=2)
    assert len(short.gpu_memory) == 2 and not short.full_offload
    assert short.smallest_fit is not None and short.smallest_fit.gpus == 3
    as_dict = plan.plan_to_dict(p)
    assert as_dict["gpus"] == 3 and as_dict["fullOffload"] is True
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_several_gpus_share_the_layers_evenly() -> None:
    shape = gguf_models.Shape(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_vocab=128256,
                              weight_type=gguf.GGMLQuantizationType.Q4_K)  # fmt: skip
    big = gguf_models.shape_facts(shape)
    ctx = memory.ContextSettings(8192, constants.CacheType.Q8_0, constants.CacheType.Q8_0, parallel=4)
    p = plan.plan(plan.PlanRequest(big, ctx, (24 * GiB,) * 4))
    assert p.fits and p.full_offload and p.pipeline_parallel
    totals = [d.total for d in p.devices]
    assert min(totals) > 0.9 * max(totals), [t / GiB for t in totals]
    assert sum(p.tensor_split) == 81


def test_zero_gpu_layers_on_several_gpus_plans_everything_on_the_host() -> None:
    p = plan.plan(dataclasses.replace(request((24 * GiB, 24 * GiB)), gpu_layers=0))
    assert p.gpu_layers == 0
    assert all(d.model == 0 for d in p.devices)
    assert p.host.model > 0
