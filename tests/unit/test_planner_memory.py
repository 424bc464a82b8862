"""The memory model against the numbers llama.cpp 0.3.36 printed for the research notes' tiny model.

``research/offload-experiments.md`` measured a random llama model (8 blocks, n_embd 512, 8 heads,
2 KV heads, n_ff 1536, vocab 32000, F16) with ``llama-fit-params`` on an RPC device. These tests
pin the model to those measurements (MiB as llama.cpp rounds them) and to llama.cpp's rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from kquant.operator.planner import memory
from kquant.quantizer import constants

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures import gguf_models

MiB = memory.MiB
C = constants.CacheType
TINY = gguf_models.shape_facts(gguf_models.Shape())
RPC = memory.Backend.RPC


def mib(n: int) -> float:
    return n / MiB


def test_kv_bytes_per_layer_follow_the_cache_type() -> None:
    f16 = memory.ContextSettings(4096)
    assert memory.kv_layer_bytes(TINY, f16, 0) == 2 * MiB  # 4096 cells * 2 * 128 values * 2 B
    q8 = memory.ContextSettings(8192, C.Q8_0, C.Q8_0)
    assert sum(memory.kv_layer_bytes(TINY, q8, il) for il in range(8)) == 17 * MiB
    q4 = memory.ContextSettings(8192, C.Q4_0, C.Q4_0)
    assert sum(memory.kv_layer_bytes(TINY, q4, il) for il in range(8)) == 9 * MiB
    mixed = memory.ContextSettings(4096, C.Q8_0, C.F16)
    assert memory.kv_layer_bytes(TINY, mixed, 0) == 4096 * (128 * 34 // 32 + 128 * 2)


@pytest.mark.parametrize(
    ("ctx", "parallel", "unified", "cells"),
    [
        (4096, 1, True, 4096),
        (4000, 1, True, 4096),  # padded to 256
        (5000, 4, True, 5120),  # unified: one stream of pad256(n_ctx)
        (5000, 4, False, 5120),  # 4 streams of pad256(5120 / 4) = 1280
        (4000, 3, False, 4608),  # n_ctx 4096 -> 3 streams of pad256(1365) = 1536
    ],
)
def test_kv_cells_pad_like_llama_context(ctx: int, parallel: int, unified: bool, cells: int) -> None:
    settings = memory.ContextSettings(ctx, parallel=parallel, kv_unified=unified)
    assert memory.kv_cells(TINY, settings, swa=False) == cells


def test_swa_layers_keep_window_plus_ubatch() -> None:
    shape = gguf_models.Shape(arch="olmo2", sliding_window=1024)
    facts = gguf_models.shape_facts(shape)
    settings = memory.ContextSettings(32768)
    assert memory.kv_cells(facts, settings, swa=True) == 1536  # pad256(1024 + 512)
    assert memory.kv_cells(facts, settings, swa=False) == 32768
    four = memory.ContextSettings(32768, parallel=4)
    assert memory.kv_cells(facts, four, swa=True) == 4608  # pad256(1024 * 4 + 512)
    assert memory.kv_cells(facts, memory.ContextSettings(1024), swa=True) == 1024  # never above n_ctx
    full = memory.ContextSettings(32768, swa_full=True)
    assert memory.kv_cells(facts, full, swa=True) == 32768
    per_layer = [memory.kv_layer_bytes(facts, settings, il) for il in range(8)]
    assert per_layer[3] == per_layer[7] == 32768 * 256 * 2
    assert per_layer[0] == 1536 * 256 * 2


def test_mla_caches_the_latent_k_only() -> None:
    facts = gguf_models.shape_facts(
        gguf_models.Shape(n_head_kv=1),
        key_length=576, value_length=512, key_length_mla=192, value_length_mla=128, kv_lora_rank=512,
    )  # fmt: skip
    settings = memory.ContextSettings(4096)
    assert memory.kv_layer_bytes(facts, settings, 0) == 4096 * 576 * 2


def test_layers_without_kv_heads_cache_nothing() -> None:
    facts = gguf_models.shape_facts(gguf_models.Shape(), head_count_kv=(0, 2, 2, 2, 2, 2, 2, 2))
    assert memory.kv_layer_bytes(facts, memory.ContextSettings(4096), 0) == 0


def test_quantized_v_needs_flash_attention() -> None:
    with pytest.raises(ValueError, match="cacheTypeV is q4_0, but a quantized V cache needs flash attention"):
        memory.ContextSettings(4096, C.Q4_0, C.Q4_0, flash_attention=False)
    memory.ContextSettings(4096, C.Q8_0, C.F16, flash_attention=False)  # a quantized K alone is fine


def test_ngl_counts_the_output_layer_first() -> None:
    n = 8
    assert memory.layer_devices(n, memory.Placement(0)) == (memory.CPU,) * 9
    assert memory.layer_devices(n, memory.Placement(1)) == (memory.CPU,) * 8 + (0,)
    assert memory.layer_devices(n, memory.Placement(3)) == (memory.CPU,) * 6 + (0, 0, 0)
    assert memory.layer_devices(n, memory.Placement(9)) == (0,) * 9
    assert memory.layer_devices(n, memory.Placement(99)) == (0,) * 9


def test_tensor_split_cuts_the_offloaded_range_in_order() -> None:
    assert memory.layer_devices(4, memory.Placement(5, (3.0, 2.0))) == (0, 0, 0, 1, 1)
    assert memory.layer_devices(4, memory.Placement(3, (1.0, 1.0))) == (memory.CPU, memory.CPU, 0, 0, 1)
    assert memory.layer_devices(4, memory.Placement(5, (0.0, 1.0))) == (1,) * 5


# (ngl, RPC0 model, RPC0 KV, RPC0 compute, Host model, Host KV, Host compute) in MiB, -c 4096 -fa on
MEASURED = [
    (0, 0, 0, 0, 108, 16, 64),
    (1, 31, 0, 63, 77, 16, 17),
    (2, 37, 2, 63, 71, 14, 17),
    (5, 54, 8, 63, 54, 8, 17),
    (8, 71, 14, 63, 37, 2, 17),
    (9, 77, 16, 63, 31, 0, 6),
]


@pytest.mark.parametrize("row", MEASURED, ids=[f"ngl{r[0]}" for r in MEASURED])
def test_breakdown_matches_llama_fit_params(row: tuple[int, ...]) -> None:
    ngl, model, kv, compute, host_model, host_kv, host_compute = row
    bd = memory.breakdown(TINY, memory.ContextSettings(4096), memory.Placement(ngl), RPC)
    gpu = bd.devices[0]
    # llama.cpp prints whole MiB, truncated; weights and KV are exact, compute within 2.5 MiB.
    assert int(mib(gpu.model)) == model
    assert int(mib(gpu.kv)) == kv
    assert int(mib(bd.host.model)) == host_model
    assert int(mib(bd.host.kv)) == host_kv
    assert mib(gpu.compute) == pytest.approx(compute, abs=2.5)
    assert mib(bd.host.compute) == pytest.approx(host_compute, abs=2.5)


@pytest.mark.parametrize(("ctx", "fa", "measured"), [(4096, False, 77), (4096, True, 64), (8192, False, 149),
                                                      (8192, True, 64)])  # fmt: skip
def test_compute_grows_with_context_only_without_flash_attention(ctx: int, fa: bool, measured: int) -> None:
    bd = memory.breakdown(TINY, memory.ContextSettings(ctx, flash_attention=fa), memory.Placement(0), RPC)
    assert mib(bd.host.compute) == pytest.approx(measured, rel=0.05)


def test_ubatch_scales_the_logits_buffer() -> None:
    settings = memory.ContextSettings(8192, ubatch=2048)
    bd = memory.breakdown(TINY, settings, memory.Placement(0), RPC)
    assert mib(bd.host.compute) == pytest.approx(258, rel=0.05)  # 32000 * 2048 * 4 B of logits


def test_tied_embeddings_put_a_copy_on_the_output_device() -> None:
    tied = gguf_models.shape_facts(gguf_models.Shape(tied=True))
    settings = memory.ContextSettings(4096)
    bd = memory.breakdown(tied, settings, memory.Placement(1), RPC)
    assert bd.devices[0].model == tied.token_embd_bytes + tied.output_bytes
    assert bd.host.model == tied.token_embd_bytes + 8 * tied.layer_bytes[0]  # the original stays


def test_n_cpu_moe_moves_experts_of_the_first_blocks_to_the_host() -> None:
    moe = gguf_models.shape_facts(gguf_models.Shape(n_expert=4, n_expert_used=2))
    settings = memory.ContextSettings(4096)
    every = memory.breakdown(moe, settings, memory.Placement(9), RPC)
    three = memory.breakdown(moe, settings, memory.Placement(9, n_cpu_moe=3), RPC)
    moved = 3 * moe.layer_expert_bytes[0]
    assert every.devices[0].model - three.devices[0].model == moved
    assert three.host.model - every.host.model == moved
    assert three.devices[0].kv == every.devices[0].kv  # attention and KV stay on the GPU
    with pytest.raises(ValueError, match="nCpuMoe is 9, but it must be between 0 and 8"):
        memory.breakdown(moe, settings, memory.Placement(9, n_cpu_moe=9), RPC)


def test_cuda_op_offload_adds_the_biggest_cpu_weight_at_partial_offload() -> None:
    settings = memory.ContextSettings(4096)
    rpc = memory.breakdown(TINY, settings, memory.Placement(5), RPC)
    cuda = memory.breakdown(TINY, settings, memory.Placement(5), memory.Backend.CUDA)
    assert cuda.devices[0].compute - rpc.devices[0].compute == TINY.layer_max_tensor_bytes[0]
    full_rpc = memory.breakdown(TINY, settings, memory.Placement(9), RPC)
    full_cuda = memory.breakdown(TINY, settings, memory.Placement(9), memory.Backend.CUDA)
    assert full_cuda.devices[0].compute == full_rpc.devices[0].compute


def test_negative_gpu_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="gpuLayers is -1"):
        memory.layer_devices(8, memory.Placement(-1))


BENCH_DENSE = gguf_models.shape_facts(
    gguf_models.Shape(n_layer=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, n_vocab=32000)
)
# llama-fit-params -ngl 99 -ts 1,1[,1] -fa on on RPC devices (MiB, two decimals): pipeline parallelism
PIPELINED = [
    (2048, (1.0, 1.0), (38.54, 88.55), 18.05),
    (8192, (1.0, 1.0), (62.54, 112.55), 42.05),
    (2048, (1.0, 1.0, 1.0), (38.54, 46.54, 88.55), 18.05),
]


@pytest.mark.parametrize(("ctx", "split", "gpus", "host"), PIPELINED)
def test_pipeline_parallelism_keeps_four_copies_of_the_inputs(
    ctx: int, split: tuple[float, ...], gpus: tuple[float, ...], host: float
) -> None:
    settings = memory.ContextSettings(ctx)
    bd = memory.breakdown(BENCH_DENSE, settings, memory.Placement(17, split), RPC)
    assert [round(mib(d.compute), 1) for d in bd.devices] == pytest.approx(gpus, rel=0.05)
    assert mib(bd.host.compute) == pytest.approx(host, rel=0.05)
    # Partial offload or --n-cpu-moe turn it off: no copies.
    partial = memory.breakdown(BENCH_DENSE, settings, memory.Placement(16, split), RPC)
    assert mib(partial.devices[0].compute) < gpus[0] - 10
    assert not memory.pipeline_parallel(partial.layer_device, len(split), 0)


@pytest.mark.parametrize(
    ("cache", "bytes_per_32"),
    [(C.F32, 128), (C.F16, 64), (C.BF16, 64), (C.Q8_0, 34), (C.Q4_0, 18), (C.Q4_1, 20), (C.Q5_0, 22),
     (C.Q5_1, 24), (C.IQ4_NL, 18)],
)  # fmt: skip
def test_every_cache_type_has_its_row_size(cache: C, bytes_per_32: int) -> None:
    settings = memory.ContextSettings(1024, cache, cache)  # flash attention is on, so a quantized V is allowed
    values = 2 * 64  # 2 KV heads of 64
    assert memory.kv_layer_bytes(TINY, settings, 0) == 1024 * 2 * values // 32 * bytes_per_32


def test_cuda_op_offload_copies_host_experts_too() -> None:
    moe = gguf_models.shape_facts(gguf_models.Shape(n_expert=4, n_expert_used=2))
    settings = memory.ContextSettings(4096)
    placement = memory.Placement(9, n_cpu_moe=2)
    rpc = memory.breakdown(moe, settings, placement, RPC)
    cuda = memory.breakdown(moe, settings, placement, memory.Backend.CUDA)
    # one whole expert tensor (all experts of ffn_up, say) passes through the GPU's compute buffer
    assert cuda.devices[0].compute - rpc.devices[0].compute == moe.layer_max_tensor_bytes[0]


def test_llama_server_reserves_one_logits_row_per_slot() -> None:
    """llama-server sets n_outputs_max to --parallel: the output GPU's buffer holds a few logits rows,
    not a ubatch of them (SmolLM2 on an RPC device: 14.38 MiB measured, tests/fixtures/server_logs)."""
    full = memory.Placement(9)
    batch = memory.breakdown(TINY, memory.ContextSettings(4096), full, RPC)
    server = memory.breakdown(TINY, memory.ContextSettings(4096, parallel=2, outputs=2), full, RPC)
    logits_rows = (TINY.vocab_size + TINY.embedding_length) * memory.F32
    assert batch.devices[0].compute == max(batch.devices[0].compute, 512 * logits_rows)
    assert server.devices[0].compute < batch.devices[0].compute
    assert server.devices[0].compute >= 2 * logits_rows
    with pytest.raises(ValueError, match="outputs is 0"):
        memory.ContextSettings(4096, outputs=0)
