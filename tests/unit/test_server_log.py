"""The startup-log parser against logs of the pinned llama-server (``tests/fixtures/server_logs``).

The logs were written by ``tests/fixtures/server_logs/capture.py``: SmolLM2-135M (Q4_1) on the CPU,
and with one or two ggml-rpc-servers on loopback standing in for GPUs. The expected figures are the
ones those logs print (MiB with two decimals), so a parser that misreads a line, mixes up the two
RPC devices or keeps --fit's dry run fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kquant.operator.planner import server_log

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "server_logs"
MiB = server_log.MiB


def read(name: str) -> server_log.ServerLog:
    return server_log.parse((LOGS / f"{name}.log").read_text())


def mib(n: int) -> float:
    return round(n / MiB, 2)


def test_cpu_only_server_has_no_device_and_offloads_nothing() -> None:
    log = read("cpu")
    assert log.devices == ()
    assert (log.offloaded_layers, log.total_layers) == (0, 31)
    assert (mib(log.host.model), mib(log.host.kv), mib(log.host.compute)) == (92.10, 45.00, 15.51)
    assert log.host.description.startswith("Intel(R) Xeon(R)")
    assert log.host.free is not None and log.host.free > 0


def test_one_rpc_device_full_offload() -> None:
    log = read("rpc1-full")
    assert [d.name for d in log.devices] == ["RPC0"]
    rpc = log.devices[0]
    assert rpc.description.startswith("127.0.0.1:")
    assert (mib(rpc.model), mib(rpc.kv), mib(rpc.compute)) == (92.10, 45.00, 14.38)
    assert (log.offloaded_layers, log.total_layers) == (31, 31)
    # tied embeddings: the input copy of token_embd stays mapped on the host
    assert (mib(log.host.model), mib(log.host.kv), mib(log.host.compute)) == (28.69, 0.0, 4.26)
    assert rpc.free == 24105 * MiB and rpc.total_memory == 24105 * MiB


def test_partial_offload_counts_layers_and_splits_kv() -> None:
    log = read("rpc1-partial")
    assert (log.offloaded_layers, log.total_layers) == (20, 31)
    rpc = log.devices[0]
    assert (mib(rpc.model), mib(rpc.kv), mib(rpc.compute)) == (68.85, 28.50, 13.26)
    assert mib(log.host.kv) == 16.50


def test_two_rpc_devices_are_told_apart_by_endpoint() -> None:
    """llama.cpp names both buffers ``RPC0[endpoint]``; the second device is the one with -ts 2."""
    log = read("rpc2-split")
    assert [d.name for d in log.devices] == ["RPC0", "RPC1"]
    first, second = log.devices
    assert first.description != second.description
    assert (mib(first.model), mib(first.kv), mib(first.compute)) == (23.25, 16.50, 24.91)
    assert (mib(second.model), mib(second.kv), mib(second.compute)) == (68.85, 28.50, 24.91)
    assert log.pipeline_parallel


def test_fit_dry_run_is_not_counted() -> None:
    """With llama.cpp's --fit on, a no-alloc pass prints zero-byte buffers first; only the real load counts."""
    log = read("rpc1-fit")
    assert (mib(log.devices[0].model), mib(log.devices[0].kv)) == (92.10, 45.00)
    assert log.offloaded_layers == 31


CUDA_LOG = """\
0.00.010.001 I cmn  common_param: device_info:
0.00.010.002 I cmn  common_param:   - CUDA0   : NVIDIA H100 80GB HBM3 (81089 MiB, 80521 MiB free)
0.00.010.003 I cmn  common_param:   - CPU     : AMD EPYC 9654 96-Core Processor (1547000 MiB, 1500000 MiB free)
0.00.041.817 I llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:05.0) - 80521 MiB free
0.00.158.728 I load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
0.00.211.643 I load_tensors: offloaded 20/31 layers to GPU
0.00.211.649 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
0.00.211.651 I load_tensors:        CUDA0 model buffer size =    68.85 MiB
0.00.420.703 I llama_kv_cache:        CPU KV buffer size =    16.50 MiB
0.00.435.080 I llama_kv_cache:      CUDA0 KV buffer size =    28.50 MiB
0.00.459.816 I sched_reserve:      CUDA0 compute buffer size =   113.26 MiB
0.00.459.845 I sched_reserve:  CUDA_Host compute buffer size =     5.01 MiB
"""


def test_cuda_buffers_and_pinned_host_memory() -> None:
    """The CUDA build's names, in the format strings of the pinned source (``CUDA_Host`` is host memory)."""
    log = server_log.parse(CUDA_LOG)
    assert [d.name for d in log.devices] == ["CUDA0"]
    cuda = log.devices[0]
    assert cuda.description == "NVIDIA H100 80GB HBM3"
    assert (mib(cuda.model), mib(cuda.kv), mib(cuda.compute)) == (68.85, 28.50, 113.26)
    assert cuda.free == 80521 * MiB and cuda.total_memory == 81089 * MiB
    assert mib(log.host.compute) == 5.01


def test_a_log_before_the_model_loaded_is_refused() -> None:
    head = (LOGS / "rpc1-full.log").read_text().split("load_tensors: loading")[0]
    with pytest.raises(server_log.LogError, match="offloaded N/M layers"):
        server_log.parse(head)


def test_a_gpu_layer_count_without_a_device_is_no_offload() -> None:
    """A CPU build given -ngl 20 prints 'offloaded 20/31 layers to GPU' and keeps them all on the CPU."""
    text = (LOGS / "cpu.log").read_text().replace("offloaded 0/31", "offloaded 20/31")
    assert server_log.parse(text).offloaded_layers == 0
