"""How big a build is, from the hub's file list and ``config.json``, before a byte of weights moves.

A build of DeepSeek-R1 downloads 690 GB, writes 1.34 TB of 16-bit GGUF and runs for hours; a
claim, a memory request or a deadline that is too small must be found out before that starts,
not by ENOSPC, the OOM killer or ``DeadlineExceeded`` half-way. Everything here is pure: it
takes the listing (names and sizes, which the hub gives with the commit) and the parsed
``config.json`` (a few kilobytes) and returns a :class:`Sizing`. The quantizer calls it in the
fetch step, before the download, and refuses a claim that is too small; ``kquant plan`` prints
it beside the serving plan; ``bench/build_sizing.py`` prints it for three real models
(docs/sizing.md).

The rules, and why:

* **Parameters** are counted from ``config.json`` (attention, dense and MoE feed-forward,
  MLA projections, embeddings), the way the converter writes tensors; a config this module does
  not understand falls back to the weight bytes over the source's bytes per weight (from
  ``torch_dtype`` / ``quantization_config``). Multi-token-prediction layers
  (``num_nextn_predict_layers``) are in the download but not in the GGUF.
* **Claim** = source + 16-bit GGUF + importance matrix + reference log-probabilities + every
  variant + margin. All of it exists at once: intermediates are removed only after the last
  build. The reference is ``chunks x contextSize x vocabulary`` float16 values
  (``evaluate.build_reference``). A variant is its ``targetSizeGiB``, else parameters times its
  type's bits per weight (a mixed ``_M``/``_L`` type a little more). The margin is 5% + 256 MiB
  (GGUF padding, the report, the files a hub client writes beside a download).
* **Memory** is the largest of the steps' peaks, each bounded by one tensor or one block, never by
  the model: quantize holds one tensor as float32 plus its output buffer (llama.cpp's
  ``llama_model_quantize`` converts a whole tensor, all experts of a layer at once); the converter
  holds a layer's experts while it stacks them; streaming calibration holds one decoder block in
  16 bits plus the activations of every calibration sequence at that block; evaluation memory-maps
  the weights (page cache, reclaimable) and holds one chunk's logits. Plus 2 GiB for Python, torch
  and llama.cpp themselves, and 20% headroom.
* **CPUs** grow with the parameters (4 up to 10B, 8 up to 100B, 16 up to 500B, else 32): quantizing
  is the long CPU step and llama.cpp scales to a few dozen threads. **Threads** equal the CPU
  request, so llama.cpp does not start one thread per core of a large node.
* **Time** is estimated from throughputs (``Throughput``; measured or public figures, in its
  docstrings), and the Job's ``activeDeadlineSeconds`` default is twice the estimate of the longest
  Job (the shared steps plus one variant) plus an hour, capped at the API's 7 days.
* **/tmp**: hub clients' metadata and Python's temporary files, never a model file (those go to the
  claim): 4 GiB.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kquant.quantizer import constants, settings, units

GB = 10**9
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 256 * units.MiB
RUNTIME_BYTES = 2 * units.GiB
"""Python with torch, llama.cpp and the hub client loaded, before any weights."""
MEMORY_HEADROOM = 1.2
TMP_BYTES = 4 * units.GiB
MAX_DEADLINE_SECONDS = 7 * 86400
"""The API's upper bound for ``spec.quantizer.activeDeadlineSeconds``."""
GGUF_BYTES_PER_TOKEN = 24
"""GGUF metadata per vocabulary entry (token text, score, type)."""


DEFAULT_CALIBRATION = settings.Calibration()
DEFAULT_EVALUATION = settings.Evaluation()


@dataclasses.dataclass(frozen=True)
class HubFile:
    """One file of the repository as the hub lists it."""

    name: str
    size: int


@dataclasses.dataclass(frozen=True)
class Throughput:
    """What the time estimate assumes. Deliberately conservative: the deadline is twice the estimate."""

    download_bytes_per_second: float = 200e6
    """Hub to a cloud node over HTTPS, one file at a time (huggingface_hub reaches 200-500 MB/s)."""
    disk_bytes_per_second: float = 400e6
    """Sequential write to a network block volume, and the converter's single-threaded throughput."""
    hash_bytes_per_second: float = 1.0e9
    """sha256 of one thread with SHA extensions (the fetch's verification, the publish step per shard)."""
    quantize_weights_per_core_second: float = 5e6
    """K-quants and legacy types in llama.cpp's quantizer, per thread, from a 16-bit source: a 70B
    Q4_K_M takes 10-15 minutes on 16 threads as commonly reported (70e9 / 900 s / 16 = 4.9M/s), and
    the source's pages must come off the volume too. bench/quantize_overhead.py measures this
    machine (docs/sizing.md)."""
    iq_quantize_weights_per_core_second: float = 1e6
    """IQ1/IQ2/IQ3 types search a lattice per block with an importance matrix: several times slower."""
    cpu_flops_per_core: float = 2e10
    """Effective float32 matrix FLOP/s per core for llama.cpp or torch inference on a server CPU."""
    gpu_flops: float = 1e14
    """Effective dense FLOP/s of one data-centre GPU (an H100 reaches 3-5x this on large batches)."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The ``config.json`` numbers that size a model (Hugging Face names)."""

    model_type: str
    n_layer: int  # num_hidden_layers
    hidden: int  # hidden_size
    ffn: int  # intermediate_size
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads
    head_dim: int  # head_dim, else hidden_size / num_attention_heads
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    n_expert: int = 0  # n_routed_experts / num_local_experts / num_experts
    n_expert_used: int = 0  # num_experts_per_tok
    n_expert_shared: int = 0  # n_shared_experts
    moe_ffn: int = 0  # moe_intermediate_size
    n_dense_lead: int = 0  # first_k_dense_replace
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope: int = 0  # qk_nope_head_dim
    qk_rope: int = 0  # qk_rope_head_dim
    v_head: int = 0  # v_head_dim
    n_nextn: int = 0  # num_nextn_predict_layers: in the download, not in the GGUF
    source_bytes_per_weight: float = 2.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        """Read the numbers; KeyError/ValueError when a required one is missing."""
        cfg = dict(config.get("text_config") or {}) | {k: v for k, v in config.items() if k != "text_config"}
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        n_expert = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        return cls(
            model_type=str(cfg.get("model_type", "")),
            n_layer=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            ffn=int(cfg.get("intermediate_size") or 4 * hidden),
            n_head=heads,
            n_head_kv=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            n_expert=n_expert,
            n_expert_used=int(cfg.get("num_experts_per_tok") or 0),
            n_expert_shared=int(cfg.get("n_shared_experts") or 0),
            moe_ffn=int(cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if n_expert else 0) or 0),
            n_dense_lead=int(cfg.get("first_k_dense_replace") or 0) if n_expert else 0,
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
            qk_nope=int(cfg.get("qk_nope_head_dim") or 0),
            qk_rope=int(cfg.get("qk_rope_head_dim") or 0),
            v_head=int(cfg.get("v_head_dim") or 0),
            n_nextn=int(cfg.get("num_nextn_predict_layers") or 0),
            source_bytes_per_weight=source_bytes_per_weight(cfg),
        )

    # ---------------------------------------------------------------- parameter counts

    @property
    def attention(self) -> int:
        """Weights of one layer's attention (norms included)."""
        e = self.hidden
        if self.kv_lora_rank:  # MLA (DeepSeek-V2/V3): low-rank q and kv projections
            q_head = self.qk_nope + self.qk_rope
            q = e * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_head * q_head
            if not self.q_lora_rank:
                q = e * self.n_head * q_head
            kv = e * (self.kv_lora_rank + self.qk_rope) + self.kv_lora_rank
            kv += self.kv_lora_rank * self.n_head * (self.qk_nope + self.v_head)
            return q + kv + self.n_head * self.v_head * e + e
        q = e * self.n_head * self.head_dim
        kv = 2 * e * self.n_head_kv * self.head_dim
        return q + kv + self.n_head * self.head_dim * e + e

    def is_moe_layer(self, il: int) -> bool:
        return self.n_expert > 0 and il >= self.n_dense_lead

    def ffn_weights(self, il: int, *, active: bool = False) -> int:
        """Weights of layer ``il``'s feed-forward part (all experts, or those one token uses)."""
        e = self.hidden
        if not self.is_moe_layer(il):
            return 3 * e * self.ffn + e
        experts = self.n_expert_used if active else self.n_expert
        return (experts + self.n_expert_shared) * 3 * e * self.moe_ffn + e * self.n_expert + e

    def block(self, il: int) -> int:
        return self.attention + self.ffn_weights(il)

    @property
    def embeddings(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        """Weights the GGUF holds (no multi-token-prediction layers)."""
        return self.embeddings + sum(self.block(il) for il in range(self.n_layer))

    @property
    def active_parameters(self) -> int:
        """Weights one token passes through: what inference FLOPs scale with."""
        layers = sum(self.attention + self.ffn_weights(il, active=True) for il in range(self.n_layer))
        return layers + self.vocab * self.hidden

    @property
    def largest_block(self) -> int:
        return max(self.block(il) for il in range(self.n_layer))

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest tensor the GGUF holds: llama.cpp stacks a layer's experts into one."""
        sizes = [self.vocab * self.hidden, self.hidden * self.ffn, self.n_head * self.head_dim * self.hidden]
        if self.n_expert:
            sizes.append(self.n_expert * self.hidden * self.moe_ffn)
        return max(sizes)


CONFIG_KEYS = frozenset({
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "n_routed_experts",
    "num_local_experts", "num_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
    "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "num_nextn_predict_layers", "torch_dtype", "dtype",
})
"""The ``config.json`` keys the sizing reads (``Architecture.from_config``, ``source_bytes_per_weight``)."""


def trim_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Only the numbers that size a model, as scalars: what the sizing Job hands the operator.

    A repository's config.json is the author's text (it can be large, and nests what it likes);
    the operator parses no more of it than the rules need, and a ConfigMap stays small."""
    def scalars(part: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in part.items()
                if k in CONFIG_KEYS and (v is None or isinstance(v, (bool, int, float, str)))
                and (not isinstance(v, str) or len(v) <= 64)}  # fmt: skip

    out = scalars(config)
    text = config.get("text_config")
    if isinstance(text, Mapping):
        out["text_config"] = scalars(text)
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping) and isinstance(quant.get("quant_method"), str):
        out["quantization_config"] = {"quant_method": str(quant["quant_method"])[:32]}
    return out


def source_bytes_per_weight(config: Mapping[str, Any]) -> float:
    """Bytes per weight of the safetensors: FP8 (``quantization_config.quant_method: fp8``) is one."""
    quant = config.get("quantization_config") or {}
    if isinstance(quant, Mapping) and str(quant.get("quant_method", "")).lower() == "fp8":
        return 1.0
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}.get(dtype, 2.0)


def converted_bytes_per_weight(convert_type: settings.ConvertType) -> float:
    """Bytes per weight of the GGUF ``convert_hf_to_gguf.py --outtype`` writes (``auto``: 16 bits)."""
    return {settings.ConvertType.F32: 4.0, settings.ConvertType.Q8_0: 34 / 32}.get(convert_type, 2.0)


def gguf_bytes_from_shapes(
    tensors: Sequence[tuple[str, tuple[int, ...]]], convert_type: settings.ConvertType
) -> int:
    """The converter's output size from the safetensors headers' shapes: matrices at the output type,
    vectors (norms, biases) as float32, FP8 block scales (``*_scale_inv``) dropped as the converter
    folds them into the weights."""
    per_weight = converted_bytes_per_weight(convert_type)
    total = 0.0
    for name, shape in tensors:
        if name.endswith(("_scale_inv", ".weight_scale", ".input_scale")):
            continue
        n = math.prod(shape) if shape else 1
        total += n * (4.0 if len(shape) <= 1 else per_weight)
    return int(total)


BNB_BITS_PER_WEIGHT = 4.5
"""A bnb 4-bit folder's bits per weight: 4-bit codes, one scale per 64 weights (quantized again with
double quantization) and the embeddings, norms and head that bitsandbytes leaves in 16 bits."""


def bnb_memory_bytes(parameters: int, bytes_per_weight: float) -> int:
    """A bnb variant's peak: transformers holds the whole 16-bit model to score the reference (no
    layer streaming), so the build pod's memory, or its GPUs' with ``device_map="auto"``, must hold it."""
    return int(parameters * bytes_per_weight)


def variant_bytes(variant: settings.VariantSpec, parameters: int) -> int:
    """A variant's file size: its budget when it has one, else parameters at its type's bits per weight."""
    if variant.format.is_bnb:
        return int(parameters * BNB_BITS_PER_WEIGHT / 8)
    if variant.target_size_bytes is not None:
        return variant.target_size_bytes
    if variant.target_bits_per_weight is not None:
        return int(parameters * variant.target_bits_per_weight / 8)
    base = constants.FILE_TYPES[variant.gguf_type].base
    bpw = constants.TENSOR_TYPES[base].bits_per_weight
    # _M and _L mixes raise attention and ffn_down a type or two, as llama.cpp's rules do.
    mixed = 1.08 if str(variant.type).endswith(("_M", "_L")) else 1.0
    return int(parameters * bpw / 8 * mixed)


def is_slow_type(variant: settings.VariantSpec) -> bool:
    if variant.format.is_bnb:
        return False
    return str(constants.FILE_TYPES[variant.gguf_type].base).startswith("IQ")


@dataclasses.dataclass(frozen=True)
class Sizing:
    """What one model's builds need; every size in bytes."""

    parameters: int
    active_parameters: int
    source_bytes: int
    source_files: int
    base_bytes: int
    """The 16-bit GGUF."""
    base_shards: int
    imatrix_bytes: int
    reference_bytes: int
    variant_bytes: dict[str, int]
    margin_bytes: int
    claim_bytes: int
    memory_bytes: int
    memory_peaks: dict[str, int]
    """Each step's peak, before runtime and headroom: which step sets the request."""
    cpus: int
    tmp_bytes: int
    seconds: dict[str, float]
    """Estimated wall time per step (``variant:<name>`` for each variant's quantize+evaluate+publish)."""
    deadline_seconds: int
    gpus: int = 0

    @property
    def threads(self) -> int:
        """llama.cpp's threads: the CPU request, never the node's core count."""
        return self.cpus

    @property
    def largest_step(self) -> str:
        """The step whose peak sets the memory request."""
        return max(self.memory_peaks.items(), key=lambda item: item[1])[0]

    @property
    def work_bytes(self) -> int:
        """What lives in the work folder (download, 16-bit GGUF, imatrix, reference)."""
        return self.source_bytes + self.base_bytes + self.imatrix_bytes + self.reference_bytes

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def lines(self) -> list[str]:
        """The sizing for people: one line per item."""
        gib = units.GiB
        out = [
            f"parameters          {self.parameters / 1e9:.1f}B ({self.active_parameters / 1e9:.1f}B active per token)",
            f"source              {self.source_bytes / gib:.1f} GiB in {self.source_files} files",
            f"16-bit GGUF         {self.base_bytes / gib:.1f} GiB in {self.base_shards} shard(s)",
            f"reference logits    {self.reference_bytes / gib:.2f} GiB",
        ]
        out += [f"variant {name:<11} {n / gib:.1f} GiB" for name, n in self.variant_bytes.items()]
        out += [
            f"margin              {self.margin_bytes / gib:.1f} GiB",
            f"claim               {claim_quantity(self)} (spec.storage.pvc.size at least this)",
            f"memory request      {memory_quantity(self)} (largest step: {self.largest_step})",
            f"cpu request         {self.cpus} (threads {self.threads})",
            f"/tmp sizeLimit      {self.tmp_bytes // gib}Gi",
            f"estimated time      {self.total_seconds / 3600:.1f} h "
            + "(" + ", ".join(f"{k} {v / 3600:.1f} h" for k, v in self.seconds.items()) + ")",
            f"activeDeadline      {self.deadline_seconds} s ({self.deadline_seconds / 3600:.1f} h)",
        ]
        return out


def listing_from_json(data: Any) -> list[HubFile]:
    """The files of a listing as the hub API returns it (``{"siblings": [{"rfilename", "size"}]}``,
    from ``/api/models/<repo>?blobs=true``) or a plain list of ``{"name", "size"}``."""
    items = data.get("siblings") if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise ValueError("a file listing is a list of {name, size} or the hub's {siblings: [...]}")
    files = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"listing entry {i} is {type(item).__name__}, not an object with name and size")
        name = item.get("name") or item.get("rfilename")
        size = item.get("size")
        if not isinstance(name, str) or not isinstance(size, int) or size < 0:
            raise ValueError(f"listing entry {i} ({item!r:.80}) needs a name and a size in bytes")
        files.append(HubFile(name, size))
    return files


def select(files: Sequence[HubFile], patterns: Sequence[str] | None) -> list[HubFile]:
    """The files the build fetches: as ``fetch.select_files`` (all when there are no patterns)."""
    if not patterns:
        return list(files)
    return [f for f in files if any(fnmatch.fnmatch(f.name, p) for p in patterns)]


def to_dict(s: Sizing) -> dict[str, Any]:
    """The sizing as JSON, with the quantities a manifest would carry."""
    data = dataclasses.asdict(s)
    data |= {"threads": s.threads, "claim": claim_quantity(s), "memory": memory_quantity(s),
             "totalSeconds": round(s.total_seconds)}  # fmt: skip
    return data


def claim_quantity(s: Sizing) -> str:
    return f"{math.ceil(s.claim_bytes / units.GiB)}Gi"


def memory_quantity(s: Sizing) -> str:
    return f"{math.ceil(s.memory_bytes / units.GiB)}Gi"


def cpus_for(parameters: int) -> int:
    for limit, cpus in ((10e9, 4), (100e9, 8), (500e9, 16)):
        if parameters <= limit:
            return cpus
    return 32


def memory_peaks(
    largest_tensor: int, largest_block: int, calibration_activations: int, logits: int, bnb_bytes: int
) -> dict[str, int]:
    """Each step's peak in bytes; ``bnb`` only when a bnb variant is built (``bnb_bytes`` > 0)."""
    peaks = {
        # one tensor as float32 plus llama.cpp's output work buffer of the same size
        "quantize": largest_tensor * 8,
        # a layer's experts held while stacked, in 16 bits, and the stacked copy
        "convert": largest_tensor * 2 * 2,
        # one block in 16 bits, its largest tensor as float32, every sequence's activations in and out
        "calibrate": largest_block * 2 + largest_tensor * 4 + calibration_activations * 4 * 2,
        # one chunk's logits for every position (float32), the reference rows, llama.cpp's buffers
        "evaluate": logits * 4 * 2 + 512 * units.MiB,
    }
    if bnb_bytes:
        peaks["bnb"] = bnb_bytes
    return peaks


def size_build(
    files: Sequence[HubFile],
    config: Mapping[str, Any] | None,
    variants: Sequence[settings.VariantSpec],
    *,
    calibration: settings.Calibration = DEFAULT_CALIBRATION,
    evaluation: settings.Evaluation = DEFAULT_EVALUATION,
    convert_type: settings.ConvertType = settings.ConvertType.AUTO,
    shard_bytes: int = settings.DEFAULT_SHARD_BYTES,
    cpus: int | None = None,
    gpus: int = 0,
    throughput: Throughput = Throughput(),
) -> Sizing:
    """Size the builds of ``variants`` from the listing ``files`` and ``config`` (None: a GGUF source,
    sized by its bytes alone). ``cpus`` fixes the CPU count (a user's request) instead of the rule."""
    source_bytes = sum(f.size for f in files)
    weight_bytes = sum(f.size for f in files if f.name.endswith((".safetensors", ".gguf", ".bin"))) or source_bytes
    arch = None
    if config is not None:
        try:
            arch = Architecture.from_config(config)
        except (KeyError, TypeError, ValueError):
            arch = None
    if arch is not None:
        parameters, active, vocab, hidden = arch.parameters, arch.active_parameters, arch.vocab, arch.hidden
        largest_tensor, largest_block = arch.largest_tensor, arch.largest_block
    else:
        per_weight = source_bytes_per_weight(config or {}) if config is not None else 0.6  # a GGUF: ~4.5 bpw
        parameters = int(weight_bytes / per_weight)
        active, vocab, hidden = parameters, 150_000, 4096
        largest_tensor = largest_block = parameters // 20

    base_bytes = 0
    if config is not None:  # safetensors: converted to GGUF
        base_bytes = int(parameters * converted_bytes_per_weight(convert_type)) + vocab * GGUF_BYTES_PER_TOKEN
    n_layer = arch.n_layer if arch else 1
    imatrix_bytes = 0 if calibration.chunks == 0 or arch is None else n_layer * hidden * 4 * 16
    positions = evaluation.chunks * evaluation.context_size
    reference_bytes = positions * vocab * 2 + positions * 4 if config is not None else 0
    by_variant = {v.name: variant_bytes(v, parameters) for v in variants}
    subtotal = source_bytes + base_bytes + imatrix_bytes + reference_bytes + sum(by_variant.values())
    margin = int(subtotal * MARGIN_FRACTION) + MARGIN_BYTES
    claim = subtotal + margin

    cal_tokens = calibration.chunks * calibration.context_size
    bnb_bytes = (
        bnb_memory_bytes(parameters, source_bytes_per_weight(config or {})) if any(v.format.is_bnb for v in variants)
        else 0
    )  # fmt: skip
    peaks = memory_peaks(largest_tensor, largest_block, cal_tokens * hidden, evaluation.context_size * vocab, bnb_bytes)
    memory = int((max(peaks.values()) + RUNTIME_BYTES) * MEMORY_HEADROOM)
    cores = cpus if cpus else cpus_for(parameters)

    tp = throughput
    compute = gpus * tp.gpu_flops if gpus else cores * tp.cpu_flops_per_core
    seconds: dict[str, float] = {
        "fetch": source_bytes / tp.download_bytes_per_second + source_bytes / tp.hash_bytes_per_second,
    }
    if config is not None:
        seconds["convert"] = base_bytes / tp.disk_bytes_per_second
        # streaming calibration reads every block once and runs every calibration token through it
        seconds["calibrate"] = base_bytes / tp.disk_bytes_per_second + 2 * active * cal_tokens / compute
        seconds["reference"] = base_bytes / tp.disk_bytes_per_second + 2 * active * positions / compute
    variant_seconds: list[float] = []
    for v in variants:
        rate = tp.iq_quantize_weights_per_core_second if is_slow_type(v) else tp.quantize_weights_per_core_second
        size = by_variant[v.name]
        shards_written = max(1, math.ceil(base_bytes / shard_bytes)) if base_bytes else 1
        t = (
            parameters / (rate * cores)
            + size / tp.disk_bytes_per_second  # evaluation pages the variant in once
            + 2 * active * positions / compute
            + size / (tp.hash_bytes_per_second * min(cores, shards_written))
        )
        seconds[f"variant:{v.name}"] = t
        variant_seconds.append(t)
    shared = sum(t for k, t in seconds.items() if not k.startswith("variant:"))
    longest_job = shared + max(variant_seconds, default=0.0)
    deadline = min(MAX_DEADLINE_SECONDS, int(math.ceil((2 * longest_job + 3600) / 3600) * 3600))
    return Sizing(
        parameters=parameters,
        active_parameters=active,
        source_bytes=source_bytes,
        source_files=len(files),
        base_bytes=base_bytes,
        base_shards=max(1, math.ceil(base_bytes / shard_bytes)) if base_bytes else 0,
        imatrix_bytes=imatrix_bytes,
        reference_bytes=reference_bytes,
        variant_bytes=by_variant,
        margin_bytes=margin,
        claim_bytes=claim,
        memory_bytes=memory,
        memory_peaks=peaks,
        cpus=cores,
        tmp_bytes=TMP_BYTES,
        seconds=seconds,
        deadline_seconds=deadline,
        gpus=gpus,
    )
