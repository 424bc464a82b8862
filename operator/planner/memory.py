"""How much memory llama.cpp allocates on each device for a given layer placement.

This is a model of the llama.cpp that llama-cpp-python 0.3.36 vendors, checked against that
version's ``llama-fit-params`` (``tests/integration/test_planner_vs_llamacpp.py``,
``bench/offload_accuracy.py``). The rules, with the llama.cpp function they copy:

* **Placement** (``llama_model::load_tensors``): the input layer (``token_embd``) always stays on the
  CPU. ``-ngl k`` puts layers ``n_layer + 1 - k .. n_layer`` on GPUs, where index ``n_layer`` is the
  output layer, so the output layer goes first, then the *last* blocks. ``--tensor-split`` cuts
  that range by cumulative proportions. With tied embeddings, the output device gets its own copy
  of ``token_embd``.
* **KV cache** (``llama_kv_cache``): each layer's K and V rows sit on that layer's device;
  ``n_ctx`` is padded to 256; without a unified cache every slot gets ``pad256(n_ctx / n_seq)``
  cells; SWA layers keep ``pad256(min(n_ctx, n_swa * n_seq + n_ubatch))`` cells; MLA keeps K only.
* **Compute buffer** (``ggml_gallocr`` peak over the reserve graph of ``n_ubatch`` tokens): the
  largest live set of activations among the phases that run on a device: attention (with the
  ``KQ`` matrix when flash attention is off), feed-forward (experts too), and the output logits;
  the attention masks stay live throughout. CUDA's op offload additionally copies the largest CPU
  weight into the GPU's buffer when the model is only partly offloaded.
* **Untracked**: the CUDA context, cuBLAS workspaces and kernels (hundreds of MiB, more on bigger
  GPUs), plus a safety margin; both are planner settings, not modelled here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from kquant.quantizer import constants, gguf_facts

MiB = 1024 * 1024
GiB = 1024 * MiB
CPU = -1
"""Device index for the host in layer placements."""

F32 = 4
"""Bytes per activation: llama.cpp keeps intermediate activations in f32."""


class Backend(enum.StrEnum):
    """Which GPU backend the compute buffer is modelled for."""

    CUDA = "cuda"
    """CUDA op offload: a partly offloaded model streams CPU weights through the GPU buffer."""
    RPC = "rpc"
    """ggml-rpc (and other backends without op offload), as used by the CPU-only accuracy tests."""


@dataclasses.dataclass(frozen=True)
class ContextSettings:
    """The llama.cpp context parameters that change memory (``-c -np -kvu -ctk -ctv -fa -ub -b``)."""

    context: int
    """``-c``: total KV cells over all slots (before llama.cpp pads them to 256)."""
    cache_type_k: constants.CacheType = constants.CacheType.F16
    cache_type_v: constants.CacheType = constants.CacheType.F16
    parallel: int = 1
    """``-np``: server slots, i.e. sequences that share the cache."""
    kv_unified: bool = True
    """``-kvu``: one cache stream shared by all slots (the server's default with ``-np auto``)."""
    flash_attention: bool = True
    ubatch: int = 512
    """``-ub``: tokens per compute step; the compute buffer is sized for this many."""
    swa_full: bool = False
    """``--swa-full``: SWA layers keep the full context."""
    outputs: int | None = None
    """Rows of logits the compute graph is reserved for. llama-server asks for one per slot
    (``n_outputs_max = -np``: it samples one token per sequence), so its output layer's buffer is
    a few rows; None is a whole ubatch, what ``llama-fit-params`` and ``llama-cli`` reserve."""

    def __post_init__(self) -> None:
        if self.context < 1:
            raise ValueError(f"contextSize is {self.context}, but it must be at least 1")
        if self.parallel < 1:
            raise ValueError(f"parallel is {self.parallel}, but it must be at least 1")
        if self.ubatch < 1:
            raise ValueError(f"ubatch is {self.ubatch}, but it must be at least 1")
        if self.outputs is not None and self.outputs < 1:
            raise ValueError(f"outputs is {self.outputs}, but it must be at least 1 (or None: a whole ubatch)")
        quantized_v = constants.TENSOR_TYPES[self.cache_type_v.tensor_type].block_size > 1
        if quantized_v and not self.flash_attention:
            raise ValueError(
                f"cacheTypeV is {self.cache_type_v}, but a quantized V cache needs flash attention"
            )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where llama.cpp puts the layers: ``-ngl``, ``-ts`` and ``--n-cpu-moe``."""

    gpu_layers: int
    """``-ngl`` in llama.cpp's meaning: 1 = output layer only, ``n_layer + 1`` = everything."""
    tensor_split: tuple[float, ...] = (1.0,)
    """``-ts``: one proportion per GPU (the number of entries is the number of GPUs)."""
    n_cpu_moe: int = 0
    """``--n-cpu-moe N``: the experts of blocks ``0 .. N-1`` stay in host memory."""
    pipelined: bool | None = None
    """Pipeline parallelism: None follows llama.cpp's rule (``pipeline_parallel``); False models the
    fallback llama.cpp takes when the pipelined compute buffers fail to allocate."""

    @property
    def n_devices(self) -> int:
        return len(self.tensor_split)


@dataclasses.dataclass(frozen=True)
class DeviceBytes:
    """One device's bytes in llama.cpp's ``common_memory_breakdown_print`` columns."""

    model: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.model + self.kv + self.compute


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted allocation per GPU and on the host for one placement."""

    devices: tuple[DeviceBytes, ...]
    host: DeviceBytes
    layer_device: tuple[int, ...]
    """Device of blocks ``0 .. n_layer-1`` and then the output layer; ``CPU`` (-1) for the host."""
    pipelined: bool = False
    """Whether the compute buffers were modelled with pipeline parallelism (4 input copies)."""


def pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def row_bytes(cache_type: constants.CacheType, n_elements: int) -> int:
    """Bytes of one KV row (``ggml_row_size``) of ``n_elements`` values in ``cache_type``."""
    return constants.TENSOR_TYPES[cache_type.tensor_type].row_bytes(n_elements)


def kv_cells(facts: gguf_facts.ModelFacts, settings: ContextSettings, swa: bool) -> int:
    """Cells of one layer's cache over all streams, as ``llama_context`` and ``llama_kv_cache`` size it."""
    n_ctx = pad(settings.context, 256)
    if settings.kv_unified:
        n_stream, n_ctx_seq = 1, n_ctx
    else:
        n_stream, n_ctx_seq = settings.parallel, pad(n_ctx // settings.parallel, 256)
    size = n_ctx_seq
    if swa and not settings.swa_full:
        seqs = settings.parallel if settings.kv_unified else 1
        size = pad(min(n_ctx_seq, facts.sliding_window * seqs + settings.ubatch), 256)
    return size * n_stream


def kv_cells_per_stream(facts: gguf_facts.ModelFacts, settings: ContextSettings, swa: bool) -> int:
    """Cells one attention step sees: the mask and KQ span one stream (one slot unless unified)."""
    streams = 1 if settings.kv_unified else settings.parallel
    return kv_cells(facts, settings, swa) // streams


def kv_layer_bytes(facts: gguf_facts.ModelFacts, settings: ContextSettings, il: int) -> int:
    """KV cache bytes of block ``il`` (0 for a layer without attention)."""
    n_head_kv = facts.head_count_kv[il]
    if n_head_kv == 0:
        return 0
    cells = kv_cells(facts, settings, facts.swa_layers[il])
    k = row_bytes(settings.cache_type_k, facts.key_length * n_head_kv)
    v = 0 if facts.is_mla else row_bytes(settings.cache_type_v, facts.value_length * n_head_kv)
    return cells * (k + v)


def layer_devices(n_layer: int, placement: Placement) -> tuple[int, ...]:
    """``load_tensors``' ``get_layer_buft_list`` for blocks ``0..n_layer-1`` and the output (``n_layer``)."""
    ngl = placement.gpu_layers
    if ngl < 0:
        raise ValueError(f"gpuLayers is {ngl}, but it must be 0 or more (the planner resolves auto)")
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    total = sum(placement.tensor_split)
    if total <= 0 or any(s < 0 for s in placement.tensor_split):
        raise ValueError(f"tensorSplit is {list(placement.tensor_split)}, but it needs non-negative parts")
    bounds: list[float] = []
    running = 0.0
    for share in placement.tensor_split:
        running += share
        bounds.append(running / total)
    devices: list[int] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            devices.append(CPU)
            continue
        x = (il - i_gpu_start) / act
        # std::upper_bound: the first bound strictly greater than x
        device = next((i for i, b in enumerate(bounds) if b > x), len(bounds) - 1)
        devices.append(device)
    return tuple(devices)


def _attention_bytes(facts: gguf_facts.ModelFacts, settings: ContextSettings, il: int, u: int) -> int:
    """Peak activations inside block ``il``'s attention for ``u`` tokens."""
    n_head = facts.head_count[il]
    n_head_kv = facts.head_count_kv[il]
    if n_head == 0:
        return 0
    e = facts.embedding_length
    if facts.is_mla:
        # Absorbed MLA: per head the latent query (kv_lora_rank + rope), the latent result
        # (kv_lora_rank) and its projection to value_length_mla, beside 4 residual rows (measured).
        per_head = 2 * facts.key_length + (facts.value_length_mla or 0)
        base = (4 * e + n_head * per_head) * u * F32
    else:
        residual = 2 * e * u * F32  # the block input and its norm
        q = n_head * facts.key_length * u * F32
        kv_new = n_head_kv * (facts.key_length + facts.value_length) * u * F32
        out = 2 * n_head * facts.value_length * u * F32  # the attention result and its merged-heads copy
        base = residual + q + kv_new + out  # 5.5 x n_embd per token for GQA 4, as measured
    if settings.flash_attention:
        return base
    cells = kv_cells_per_stream(facts, settings, facts.swa_layers[il])
    kq = cells * u * n_head * F32  # KQ and, in place, its softmax
    return base + kq


def _ffn_bytes(facts: gguf_facts.ModelFacts, il: int, u: int, rows: int) -> int:
    """Peak activations inside block ``il``'s feed-forward (dense or MoE) for ``u`` tokens."""
    e = facts.embedding_length
    residual = 2 * e * u * F32
    dense = 3 * facts.feed_forward_length[il] * u * F32  # gate, up and the activated product
    if facts.layer_expert_bytes[il] == 0 or facts.expert_count == 0:
        # ggml-alloc's best-fit allocator leaves holes the size of a residual row between these;
        # measured peaks are 3 n_ff plus ``rows`` x n_embd per token (see ``_block_bytes``).
        return rows * e * u * F32 + dense
    used = max(facts.expert_used_count, 1)
    n_ff_exp = facts.expert_feed_forward_length or facts.feed_forward_length[il]
    router = 3 * facts.expert_count * u * F32  # logits, probabilities, selection
    experts = (3 * n_ff_exp + e) * used * u * F32  # gate, up, product and down per chosen expert
    shared = 3 * n_ff_exp * max(facts.expert_shared_count, 0) * u * F32
    return residual + router + experts + shared


def _mask_bytes(facts: gguf_facts.ModelFacts, settings: ContextSettings, u: int) -> int:
    """The KQ mask inputs (one for full and one for SWA layers), kept live through all blocks."""
    elem = 2 if settings.flash_attention else F32
    total = 0
    kinds = {facts.swa_layers[il] for il in range(facts.block_count) if facts.head_count_kv[il]}
    for swa in kinds:
        total += kv_cells_per_stream(facts, settings, swa) * u * elem
    return total


SCHED_COPIES = 4
"""``GGML_SCHED_MAX_COPIES``: input copies per device when pipeline parallelism is on."""


def pipeline_parallel(layer_device: Sequence[int], n_devices: int, n_cpu_moe: int) -> bool:
    """llama_context's rule: several GPUs, everything offloaded, layer split, no tensor overrides.

    (CUDA and RPC devices both support the async compute and events it needs.) ``--n-cpu-moe`` is
    a tensor override, so it turns pipeline parallelism off.
    """
    return n_devices > 1 and CPU not in layer_device and n_cpu_moe == 0


def device_compute(
    facts: gguf_facts.ModelFacts,
    settings: ContextSettings,
    layers: Sequence[int],
    *,
    has_output: bool,
    first: bool = True,
    pipelined: bool = False,
) -> int:
    """The compute buffer of one GPU that runs ``layers`` (and the output layer if ``has_output``).

    Without pipeline parallelism: the masks plus the largest block's activations, or the logits.
    With it, every split's inputs exist once per copy: the masks where blocks run and the hidden
    state (twice after the first GPU: the incoming rows and the residual).
    """
    u = _ubatch(settings)
    e = facts.embedding_length
    row = e * u * F32
    masks = _mask_bytes(facts, settings, u)
    logits = (facts.vocab_size + e) * _outputs(settings) * F32  # output norm and the logits per output row
    rows = 3 if has_output or pipelined else 2
    body = max((_block_bytes(facts, settings, il, u, rows) for il in layers), default=0)
    if has_output and layers and facts.is_mla:
        # deepseek2 graphs leave holes in the allocator before the logits: measured 0-5 hidden rows
        # beyond the logits when blocks share the output GPU (more with larger vocabularies); 2 rows
        # keep every measured case within 6%.
        logits += 2 * row
    if not pipelined:
        best = masks + body if layers else 0
        return max(best, logits) if has_output else best
    if not layers and not has_output:
        return 0
    inputs = (masks if layers else 0) + (row if first else 2 * row)
    return SCHED_COPIES * inputs + (max(body, logits) if has_output else body)


def _ubatch(settings: ContextSettings) -> int:
    return min(settings.ubatch, pad(settings.context, 256))


def _outputs(settings: ContextSettings) -> int:
    """Output rows of the reserved graph: the last block keeps only those before the output norm."""
    u = _ubatch(settings)
    return u if settings.outputs is None else min(settings.outputs, u)


def _block_bytes(facts: gguf_facts.ModelFacts, settings: ContextSettings, il: int, u: int, rows: int) -> int:
    """Peak activations of block ``il``: its attention or its feed-forward.

    ``rows``: hidden-state rows the dense feed-forward keeps live beside gate, up and their product,
    as measured: 4 on the CPU, 3 on the GPU that also holds the output layer (or any GPU with
    pipeline parallelism), 2 on other GPUs.
    """
    return max(_attention_bytes(facts, settings, il, u), _ffn_bytes(facts, il, u, rows))


def compute_bytes(
    facts: gguf_facts.ModelFacts,
    settings: ContextSettings,
    layer_device: Sequence[int],
    n_devices: int,
    backend: Backend = Backend.CUDA,
    n_cpu_moe: int = 0,
    pipelined: bool | None = None,
) -> tuple[tuple[int, ...], int]:
    """Compute buffer per GPU and on the host, for a placement given as ``layer_devices``' result."""
    n_layer = facts.block_count
    u = _ubatch(settings)
    e = facts.embedding_length
    row = e * u * F32  # one hidden state for the whole ubatch
    masks = _mask_bytes(facts, settings, u)
    # Without flash attention: the row indices that scatter new V values into the transposed V
    # cache (int64 per value), an input like the masks.
    v_idxs = 0
    if not settings.flash_attention:
        v_width = max((facts.value_length * h for h in facts.head_count_kv), default=0)
        v_idxs = u * v_width * 8
    pp = pipeline_parallel(layer_device, n_devices, n_cpu_moe) and pipelined is not False
    copies = SCHED_COPIES if pp else 1
    first_gpu = min((d for d in layer_device if d != CPU), default=0)
    gpu = [
        device_compute(
            facts,
            settings,
            [il for il in range(n_layer) if layer_device[il] == d],
            has_output=layer_device[n_layer] == d,
            first=d == first_gpu,
            pipelined=pp,
        )
        for d in range(n_devices)
    ]
    # The host runs its blocks, the output layer when it is not offloaded (keeping the final
    # residual row beside the logits), and always holds the inputs once per copy: masks, V row
    # indices and the embedding rows, plus the rows' copy handed to the first device.
    cpu_layers = [il for il in range(n_layer) if layer_device[il] == CPU]
    host = copies * (masks + row + v_idxs) + row
    if cpu_layers:
        host = max(host, masks + max(_block_bytes(facts, settings, il, u, 4) for il in cpu_layers))
    if layer_device[n_layer] == CPU:
        host = max(host, (facts.vocab_size + 2 * e) * _outputs(settings) * F32)
    moe_on_cpu = [il for il in range(min(n_cpu_moe, n_layer)) if facts.layer_expert_bytes[il]]
    if moe_on_cpu:
        # Experts in host memory run their matrix products on the CPU, one split at a time: the
        # routed rows plus the gate and up results of the chosen experts are live together.
        used = max(facts.expert_used_count, 1)
        n_ff_exp = max(facts.expert_feed_forward_length or facts.feed_forward_length[il] for il in moe_on_cpu)
        host = max(host, masks + (e + 2 * n_ff_exp * used) * u * F32)
    if backend is Backend.CUDA and any(d != CPU for d in layer_device):
        # Op offload: matrix products (MUL_MAT_ID too) with weights in host memory run on the GPU
        # when a ubatch has 32 tokens or more, after a copy of the weight into the first GPU's
        # compute buffer: whole CPU layers, and the experts --n-cpu-moe keeps in host memory.
        on_host = [il for il in range(n_layer) if layer_device[il] == CPU or il in moe_on_cpu]
        gpu[0] += max((facts.layer_max_tensor_bytes[il] for il in on_host), default=0)
    return tuple(gpu), host


def breakdown(
    facts: gguf_facts.ModelFacts,
    settings: ContextSettings,
    placement: Placement,
    backend: Backend = Backend.CUDA,
) -> MemoryBreakdown:
    """Model, KV and compute bytes per GPU and on the host for one placement."""
    n_layer = facts.block_count
    if placement.n_cpu_moe < 0 or placement.n_cpu_moe > n_layer:
        raise ValueError(f"nCpuMoe is {placement.n_cpu_moe}, but it must be between 0 and {n_layer}")
    devices = layer_devices(n_layer, placement)
    n_dev = placement.n_devices
    model = [0] * n_dev
    kv = [0] * n_dev
    host_model = facts.token_embd_bytes + facts.other_bytes
    host_kv = 0
    for il in range(n_layer):
        d = devices[il]
        weights = facts.layer_bytes[il]
        experts = facts.layer_expert_bytes[il] if il < placement.n_cpu_moe else 0
        layer_kv = kv_layer_bytes(facts, settings, il)
        host_model += experts
        if d == CPU:
            host_model += weights - experts
            host_kv += layer_kv
        else:
            model[d] += weights - experts
            kv[d] += layer_kv
    out = devices[n_layer]
    if out == CPU:
        host_model += facts.output_bytes
    else:
        model[out] += facts.output_device_bytes
    gpu_compute, host_compute = compute_bytes(
        facts, settings, devices, n_dev, backend, placement.n_cpu_moe, placement.pipelined
    )
    return MemoryBreakdown(
        devices=tuple(DeviceBytes(model[d], kv[d], gpu_compute[d]) for d in range(n_dev)),
        host=DeviceBytes(host_model, host_kv, host_compute),
        pipelined=pipeline_parallel(devices, n_dev, placement.n_cpu_moe) and placement.pipelined is not False,
        layer_device=devices,
    )
