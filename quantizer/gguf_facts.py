"""The facts about a GGUF file that memory planning needs, read from its header alone.

The offload planner must decide how many layers fit on a GPU before anything is scheduled, and the
operator must do that without loading tens of gigabytes of weights. A GGUF header holds everything
needed: the hyperparameters as metadata and every tensor's name, type and shape. gguf-py's
``GGUFReader`` memory-maps the file, so reading the header touches a few megabytes only.

The result, ``ModelFacts``, is embedded in the quantizer's report JSON and read back by the
operator; it therefore is a frozen pydantic model with plain JSON types only.

Split models (``name-00001-of-00003.gguf``) keep their metadata in the first shard and their tensors
spread over all shards; ``read_facts`` reads all shards and sums them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import gguf
import pydantic
from kquant.quantizer import shards as shard_names

BLOCK_RE = re.compile(r"^blk\.(?P<index>\d+)\.")
"""Tensors of a repeating layer (a *block*) start with ``blk.N.``."""

EXPERT_RE = re.compile(r"ffn_(up|down|gate|gate_up)_(ch|)exps")
"""MoE expert tensors: the same pattern llama.cpp's ``--n-cpu-moe`` moves to the CPU."""

OUTPUT_PREFIXES = ("output.", "output_norm.")
"""Tensors llama.cpp places with the output layer (``dev_output``)."""

INPUT_PREFIXES = ("token_embd.", "token_embd_norm.", "position_embd.", "token_types.")
"""Tensors llama.cpp keeps with the input layer, which always stays on the CPU."""

SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    # architecture -> (n_pattern, dense_first), from llama.cpp's models/*.cpp load_swa_pattern calls,
    # used only when the GGUF has a sliding window but no explicit pattern.
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "olmo2": (4, False),
    "exaone4": (4, False),
    "llama4": (4, False),
    "gpt-oss": (2, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
    "afmoe": (4, False),
}


class ModelFacts(pydantic.BaseModel):
    """Hyperparameters and per-layer tensor bytes of one GGUF model (all shards)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    architecture: str
    """``general.architecture``, for example ``llama`` or ``qwen2moe``."""
    name: str | None = None
    """``general.name``, if the file has one."""
    file_type: int | None = None
    """``general.file_type`` (a ``llama_ftype`` code)."""
    block_count: int = pydantic.Field(ge=1)
    """Repeating layers (``{arch}.block_count``); llama.cpp's ``-ngl`` counts these plus one output layer."""
    context_length: int = pydantic.Field(ge=0)
    """The training context (``{arch}.context_length``)."""
    embedding_length: int = pydantic.Field(ge=1)
    vocab_size: int = pydantic.Field(ge=1)
    feed_forward_length: tuple[int, ...]
    """Dense FFN width per layer (0 where a layer has none)."""
    expert_feed_forward_length: int = 0
    head_count: tuple[int, ...]
    """Attention heads per layer (scalar metadata is expanded to every layer)."""
    head_count_kv: tuple[int, ...]
    """KV heads per layer; GQA when smaller than ``head_count``, 0 for layers without attention."""
    key_length: int
    """Per-head K width as the KV cache stores it (for MLA: ``kv_lora_rank`` + rope dims)."""
    value_length: int
    key_length_mla: int | None = None
    value_length_mla: int | None = None
    kv_lora_rank: int | None = None
    sliding_window: int = 0
    """SWA window in tokens, 0 without sliding-window attention."""
    swa_layers: tuple[bool, ...]
    """Which layers use the sliding window (all False without SWA)."""
    expert_count: int = 0
    expert_used_count: int = 0
    expert_shared_count: int = 0
    nextn_predict_layers: int = 0
    layer_bytes: tuple[int, ...]
    """Bytes of every tensor of ``blk.N`` (experts included), per layer."""
    layer_max_tensor_bytes: tuple[int, ...] = ()
    """The largest single tensor of each layer: what CUDA's op offload copies into the compute buffer."""
    layer_expert_bytes: tuple[int, ...]
    """The part of ``layer_bytes`` that ``--n-cpu-moe`` / ``-ot ...exps=CPU`` moves to the CPU."""
    output_bytes: int
    """``output.weight`` and ``output_norm``: what goes with the output layer."""
    token_embd_bytes: int
    """``token_embd.weight`` (always on the CPU; copied to the GPU as the output when tied)."""
    other_bytes: int = 0
    """Tensors outside blocks, input and output (kept on the CPU in this model)."""
    tied_embeddings: bool
    """No ``output.weight``: llama.cpp uses ``token_embd`` as the output projection too."""
    tensor_types: dict[str, int]
    """Tensor count per ggml type name."""
    total_bytes: int
    """Sum of all tensor bytes."""
    file_bytes: int
    """Sum of the files' sizes on disk (what the seed formula divides by)."""
    shards: int = 1

    @property
    def is_mla(self) -> bool:
        """llama.cpp caches only the compressed latent K for MLA models, no V."""
        return bool(self.key_length_mla) and bool(self.value_length_mla)

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0 and any(self.layer_expert_bytes)

    @property
    def output_device_bytes(self) -> int:
        """Weights the output layer puts on its device: a copy of ``token_embd`` when tied."""
        if self.tied_embeddings:
            return self.output_bytes + self.token_embd_bytes
        return self.output_bytes


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    type_name: str
    n_bytes: int
    shape: tuple[int, ...]


def read_facts(path: Path) -> ModelFacts:
    """Read ``ModelFacts`` from a GGUF file (or all shards of a split one) without loading weights."""
    paths = shard_names.siblings(Path(path))
    metadata: dict[str, Any] = {}
    tensors: list[_Tensor] = []
    for index, shard in enumerate(paths):
        reader = gguf.GGUFReader(shard)
        if index == 0:
            metadata = {name: _field_value(field) for name, field in reader.fields.items()}
            metadata["__tokens__"] = _token_count(reader)
        tensors.extend(
            _Tensor(t.name, t.tensor_type.name, int(t.n_bytes), tuple(int(d) for d in t.shape))
            for t in reader.tensors
        )
    file_bytes = sum(p.stat().st_size for p in paths)
    return facts_from_header(metadata, tensors, file_bytes=file_bytes, shards=len(paths), source=str(path))


def _field_value(field: Any) -> Any:
    """A scalar, string or list from a ``ReaderField``; big string arrays (the vocabulary) are skipped."""
    types = list(field.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return None  # token lists are counted separately; reading them costs seconds
        return [v.item() if hasattr(v, "item") else v for v in field.contents()]
    value = field.contents()
    return value.item() if hasattr(value, "item") else value


def _token_count(reader: Any) -> int | None:
    field = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    return len(field.data) if field is not None else None


def facts_from_header(
    metadata: dict[str, Any],
    tensors: Sequence[_Tensor] | Iterable[_Tensor],
    *,
    file_bytes: int,
    shards: int = 1,
    source: str = "GGUF",
) -> ModelFacts:
    """Pure part of ``read_facts``: turn decoded metadata and tensor records into ``ModelFacts``."""
    tensors = list(tensors)
    arch = _require(metadata, gguf.Keys.General.ARCHITECTURE, source)
    llm, attn = gguf.Keys.LLM, gguf.Keys.Attention

    def key_name(template: str) -> str:
        """The metadata key of this architecture, from one of gguf-py's ``{arch}.…`` templates."""
        return template.format(arch=arch)

    def key(template: str, default: Any = None) -> Any:
        return metadata.get(key_name(template), default)

    n_layer = int(_require(metadata, key_name(llm.BLOCK_COUNT), source))
    n_embd = int(_require(metadata, key_name(llm.EMBEDDING_LENGTH), source))
    head_count = _per_layer(key(attn.HEAD_COUNT, 0), n_layer, key_name(attn.HEAD_COUNT))
    head_count_kv = _per_layer(
        key(attn.HEAD_COUNT_KV, None) if key(attn.HEAD_COUNT_KV) is not None else head_count,
        n_layer,
        key_name(attn.HEAD_COUNT_KV),
    )
    n_head_max = max(head_count) if head_count else 0
    default_head = n_embd // n_head_max if n_head_max else 0
    key_length = int(key(attn.KEY_LENGTH, default_head))
    value_length = int(key(attn.VALUE_LENGTH, default_head))

    by_name = {t.name: t for t in tensors}
    token_embd = by_name.get("token_embd.weight")
    vocab = key(llm.VOCAB_SIZE) or metadata.get("__tokens__")
    if not vocab and token_embd is not None:
        vocab = token_embd.shape[-1]
    if not vocab:
        raise ValueError(
            f"{source}: cannot tell the vocabulary size (no {key_name(llm.VOCAB_SIZE)}, token list or token_embd)"
        )

    layer_bytes = [0] * n_layer
    layer_expert = [0] * n_layer
    layer_max = [0] * n_layer
    output_bytes = token_embd_bytes = other_bytes = 0
    type_counts: dict[str, int] = {}
    for t in tensors:
        type_counts[t.type_name] = type_counts.get(t.type_name, 0) + 1
        block = BLOCK_RE.match(t.name)
        if block:
            il = int(block["index"])
            if il >= n_layer:
                raise ValueError(f"{source}: tensor {t.name} is beyond {arch}.block_count = {n_layer}")
            layer_bytes[il] += t.n_bytes
            layer_max[il] = max(layer_max[il], t.n_bytes)
            if EXPERT_RE.search(t.name):
                layer_expert[il] += t.n_bytes
        elif t.name.startswith(OUTPUT_PREFIXES):
            output_bytes += t.n_bytes
        elif t.name == "token_embd.weight":
            token_embd_bytes += t.n_bytes
        else:
            other_bytes += t.n_bytes

    sliding_window = int(key(attn.SLIDING_WINDOW, 0) or 0)
    swa_layers = _swa_layers(arch, n_layer, sliding_window, key(attn.SLIDING_WINDOW_PATTERN))
    ff = key(llm.FEED_FORWARD_LENGTH, 0)
    return ModelFacts(
        architecture=arch,
        name=metadata.get(gguf.Keys.General.NAME),
        file_type=metadata.get(gguf.Keys.General.FILE_TYPE),
        block_count=n_layer,
        context_length=int(key(llm.CONTEXT_LENGTH, 0)),
        embedding_length=n_embd,
        vocab_size=int(vocab),
        feed_forward_length=_per_layer(ff, n_layer, key_name(llm.FEED_FORWARD_LENGTH)),
        expert_feed_forward_length=int(key(llm.EXPERT_FEED_FORWARD_LENGTH, 0) or 0),
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=key_length,
        value_length=value_length,
        key_length_mla=key(attn.KEY_LENGTH_MLA),
        value_length_mla=key(attn.VALUE_LENGTH_MLA),
        kv_lora_rank=key(attn.KV_LORA_RANK),
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        expert_count=int(key(llm.EXPERT_COUNT, 0) or 0),
        expert_used_count=int(key(llm.EXPERT_USED_COUNT, 0) or 0),
        expert_shared_count=int(key(llm.EXPERT_SHARED_COUNT, 0) or 0),
        nextn_predict_layers=int(key(llm.NEXTN_PREDICT_LAYERS, 0) or 0),
        layer_bytes=tuple(layer_bytes),
        layer_max_tensor_bytes=tuple(layer_max),
        layer_expert_bytes=tuple(layer_expert),
        output_bytes=output_bytes,
        token_embd_bytes=token_embd_bytes,
        other_bytes=other_bytes,
        tied_embeddings="output.weight" not in by_name,
        tensor_types=dict(sorted(type_counts.items())),
        total_bytes=sum(t.n_bytes for t in tensors),
        file_bytes=file_bytes,
        shards=shards,
    )


def _require(metadata: dict[str, Any], name: str, source: str) -> Any:
    if metadata.get(name) is None:
        raise ValueError(f"{source}: GGUF metadata key {name} is missing")
    return metadata[name]


def _per_layer(value: Any, n_layer: int, name: str) -> tuple[int, ...]:
    """llama.cpp's ``get_key_or_arr``: a scalar applies to every layer, an array must have one per layer."""
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ValueError(f"{name} has {len(value)} entries, but the model has {n_layer} layers")
        return tuple(int(v) for v in value)
    return (int(value or 0),) * n_layer


def _swa_layers(arch: str, n_layer: int, window: int, pattern: Any) -> tuple[bool, ...]:
    """Which layers are SWA, following llama.cpp's ``load_swa_pattern`` / ``set_swa_pattern``."""
    if window <= 0:
        return (False,) * n_layer
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise ValueError(
                f"{gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)} has {len(pattern)} entries, "
                f"but the model has {n_layer} layers"
            )
        return tuple(bool(v) for v in pattern)
    if arch not in SWA_PATTERNS and not isinstance(pattern, int):
        # An architecture this table does not know: assume full attention everywhere, which
        # over-estimates the KV cache rather than risking an out-of-memory at load time.
        return (False,) * n_layer
    n_pattern, dense_first = SWA_PATTERNS.get(arch, (0, False))
    if isinstance(pattern, int):
        n_pattern = pattern
    return swa_pattern(n_layer, n_pattern, dense_first)


def swa_pattern(n_layer: int, n_pattern: int, dense_first: bool) -> tuple[bool, ...]:
    """``llama_hparams::set_swa_pattern``: every ``n_pattern``-th layer uses full attention."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
