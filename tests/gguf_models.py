"""Write small random-weight GGUF models of chosen shapes that llama.cpp loads.

Tests and benchmarks need GGUFs whose shapes they control (GQA, MoE, tied embeddings, sliding
window) without downloading weights. ``write_model`` writes one with gguf-py: a llama-architecture
model (dense or Mixtral-style MoE, optionally with tied embeddings) or an ``olmo2`` model with a
sliding window (llama.cpp's olmo2 makes three of every four layers SWA). The vocabulary is a
SentencePiece-style list (special tokens, the 256 byte tokens, then filler pieces), enough for
llama.cpp's vocabulary loader.

Weights are random but cheap: a small random block is tiled to fill each tensor, so a 100 MiB model
takes well under a second of NumPy work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
from kquant.quantizer import gguf_facts


@dataclasses.dataclass(frozen=True)
class Shape:
    """The hyperparameters of a test model."""

    arch: str = "llama"
    """``llama`` (dense or MoE), ``olmo2`` (sliding window when ``sliding_window`` > 0) or
    ``deepseek2`` (MLA: the KV cache holds the compressed latent only; MoE with shared experts)."""
    n_layer: int = 8
    n_embd: int = 512
    n_head: int = 8
    n_head_kv: int = 2
    n_ff: int = 1536
    n_vocab: int = 32000
    n_ctx_train: int = 32768
    n_expert: int = 0
    n_expert_used: int = 0
    tied: bool = False
    sliding_window: int = 0
    weight_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F16
    name: str = "kquant-test"
    # deepseek2 (MLA) only:
    q_lora_rank: int = 384
    kv_lora_rank: int = 128
    qk_rope: int = 32
    qk_nope: int = 64
    v_head: int = 64
    n_expert_shared: int = 1
    n_ff_exp: int = 256
    n_dense_lead: int = 1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _random(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 array of ``shape`` filled by tiling a small random block (fast for big tensors)."""
    n = int(np.prod(shape))
    block = (rng.standard_normal(min(n, 65536)) * 0.02).astype(np.float32)
    reps = -(-n // block.size)
    return np.tile(block, reps)[:n].reshape(shape)


def _add(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
         rng: np.random.Generator) -> None:  # fmt: skip
    """Add a tensor; ``shape`` is NumPy order (rows last-but-one), the reverse of ggml's ``ne``."""
    data = _random(shape, rng)
    if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_vocab(writer: gguf.GGUFWriter, n_vocab: int, ranked_scores: bool = False) -> None:
    """A SentencePiece-style vocabulary: specials, the 256 byte tokens, then filler pieces.
    ``ranked_scores`` gives the filler pieces falling scores, as a trained SentencePiece model has."""
    if n_vocab < 259 + 3:
        raise ValueError(f"n_vocab is {n_vocab}, but the test vocabulary needs at least 262 tokens")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * 259 + [-float(i) if ranked_scores else 0.0 for i in range(n_vocab - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def _add_block(writer: gguf.GGUFWriter, shape: Shape, i: int, rng: np.random.Generator) -> None:
    """The tensors of block ``i``: attention, norms and a dense or MoE feed-forward."""
    wt = shape.weight_type
    f32 = gguf.GGMLQuantizationType.F32
    e = shape.n_embd
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    b = f"blk.{i}"
    _add(writer, f"{b}.attn_q.weight", (q_dim, e), wt, rng)
    _add(writer, f"{b}.attn_k.weight", (kv_dim, e), wt, rng)
    _add(writer, f"{b}.attn_v.weight", (kv_dim, e), wt, rng)
    _add(writer, f"{b}.attn_output.weight", (e, q_dim), wt, rng)
    if shape.arch == "olmo2":
        _add(writer, f"{b}.attn_q_norm.weight", (q_dim,), f32, rng)
        _add(writer, f"{b}.attn_k_norm.weight", (kv_dim,), f32, rng)
        _add(writer, f"{b}.post_attention_norm.weight", (e,), f32, rng)
        _add(writer, f"{b}.post_ffw_norm.weight", (e,), f32, rng)
    else:
        _add(writer, f"{b}.attn_norm.weight", (e,), f32, rng)
        _add(writer, f"{b}.ffn_norm.weight", (e,), f32, rng)
    if shape.n_expert:
        x = shape.n_expert
        _add(writer, f"{b}.ffn_gate_inp.weight", (x, e), f32, rng)
        _add(writer, f"{b}.ffn_gate_exps.weight", (x, shape.n_ff, e), wt, rng)
        _add(writer, f"{b}.ffn_up_exps.weight", (x, shape.n_ff, e), wt, rng)
        _add(writer, f"{b}.ffn_down_exps.weight", (x, e, shape.n_ff), wt, rng)
    else:
        _add(writer, f"{b}.ffn_gate.weight", (shape.n_ff, e), wt, rng)
        _add(writer, f"{b}.ffn_up.weight", (shape.n_ff, e), wt, rng)
        _add(writer, f"{b}.ffn_down.weight", (e, shape.n_ff), wt, rng)


def _add_mla_block(writer: gguf.GGUFWriter, s: Shape, i: int, rng: np.random.Generator) -> None:
    """A deepseek2 block with MLA attention (split ``attn_k_b``/``attn_v_b``) and a dense or MoE FFN."""
    wt, f32 = s.weight_type, gguf.GGMLQuantizationType.F32
    e, h = s.n_embd, s.n_head
    b = f"blk.{i}"
    _add(writer, f"{b}.attn_norm.weight", (e,), f32, rng)
    _add(writer, f"{b}.attn_q_a_norm.weight", (s.q_lora_rank,), f32, rng)
    _add(writer, f"{b}.attn_kv_a_norm.weight", (s.kv_lora_rank,), f32, rng)
    _add(writer, f"{b}.attn_q_a.weight", (s.q_lora_rank, e), wt, rng)
    _add(writer, f"{b}.attn_q_b.weight", (h * (s.qk_nope + s.qk_rope), s.q_lora_rank), wt, rng)
    _add(writer, f"{b}.attn_kv_a_mqa.weight", (s.kv_lora_rank + s.qk_rope, e), wt, rng)
    _add(writer, f"{b}.attn_k_b.weight", (h, s.kv_lora_rank, s.qk_nope), wt, rng)
    _add(writer, f"{b}.attn_v_b.weight", (h, s.v_head, s.kv_lora_rank), wt, rng)
    _add(writer, f"{b}.attn_output.weight", (e, h * s.v_head), wt, rng)
    _add(writer, f"{b}.ffn_norm.weight", (e,), f32, rng)
    if i < s.n_dense_lead:
        _add(writer, f"{b}.ffn_gate.weight", (s.n_ff, e), wt, rng)
        _add(writer, f"{b}.ffn_up.weight", (s.n_ff, e), wt, rng)
        _add(writer, f"{b}.ffn_down.weight", (e, s.n_ff), wt, rng)
        return
    x, f, shared = s.n_expert, s.n_ff_exp, s.n_ff_exp * s.n_expert_shared
    _add(writer, f"{b}.ffn_gate_inp.weight", (x, e), f32, rng)
    _add(writer, f"{b}.ffn_gate_exps.weight", (x, f, e), wt, rng)
    _add(writer, f"{b}.ffn_up_exps.weight", (x, f, e), wt, rng)
    _add(writer, f"{b}.ffn_down_exps.weight", (x, e, f), wt, rng)
    _add(writer, f"{b}.ffn_gate_shexp.weight", (shared, e), wt, rng)
    _add(writer, f"{b}.ffn_up_shexp.weight", (shared, e), wt, rng)
    _add(writer, f"{b}.ffn_down_shexp.weight", (e, shared), wt, rng)


def _mla_metadata(writer: gguf.GGUFWriter, s: Shape) -> None:
    """deepseek2's keys as convert_hf_to_gguf writes them for MLA: one KV head of the latent width."""
    writer.add_head_count_kv(1)
    writer.add_key_length(s.kv_lora_rank + s.qk_rope)
    writer.add_value_length(s.kv_lora_rank)
    writer.add_key_length_mla(s.qk_nope + s.qk_rope)
    writer.add_value_length_mla(s.v_head)
    writer.add_q_lora_rank(s.q_lora_rank)
    writer.add_kv_lora_rank(s.kv_lora_rank)
    writer.add_rope_dimension_count(s.qk_rope)
    writer.add_leading_dense_block_count(s.n_dense_lead)
    writer.add_expert_feed_forward_length(s.n_ff_exp)
    writer.add_expert_shared_count(s.n_expert_shared)
    writer.add_expert_count(s.n_expert)
    writer.add_expert_used_count(s.n_expert_used or 2)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)


def write_model(path: Path, shape: Shape, seed: int = 0) -> Path:
    """Write ``shape`` as a GGUF file at ``path`` and return the path."""
    if shape.arch not in ("llama", "olmo2", "deepseek2"):
        raise ValueError(f"arch is {shape.arch!r}, but only 'llama', 'olmo2' and 'deepseek2' are supported")
    if shape.arch == "deepseek2" and (shape.n_expert < 1 or shape.n_layer in (26, 27)):
        raise ValueError("deepseek2 test models need n_expert >= 1 and n_layer other than 26 or 27 (lite)")
    if shape.arch == "olmo2" and shape.n_expert:
        raise ValueError("olmo2 test models are dense; set n_expert to 0")
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), shape.arch)
    hd = shape.head_dim
    writer.add_name(shape.name)
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    if shape.arch == "deepseek2":
        _mla_metadata(writer, shape)
    else:
        writer.add_head_count_kv(shape.n_head_kv)
        writer.add_rope_dimension_count(hd)
        if shape.n_expert:
            writer.add_expert_count(shape.n_expert)
            writer.add_expert_used_count(shape.n_expert_used or 2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    if shape.sliding_window:
        writer.add_sliding_window(shape.sliding_window)
    write_vocab(writer, shape.n_vocab)

    wt = shape.weight_type
    f32 = gguf.GGMLQuantizationType.F32
    e, v = shape.n_embd, shape.n_vocab
    _add(writer, "token_embd.weight", (v, e), wt, rng)
    _add(writer, "output_norm.weight", (e,), f32, rng)
    if not shape.tied:
        _add(writer, "output.weight", (v, e), wt, rng)
    for i in range(shape.n_layer):
        if shape.arch == "deepseek2":
            _add_mla_block(writer, shape, i, rng)
        else:
            _add_block(writer, shape, i, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_layer_bytes(shape: Shape) -> int:
    """Bytes of one block of ``shape`` as written by ``write_model`` (a check for readers)."""
    if shape.arch == "deepseek2":
        raise ValueError("expected_layer_bytes knows llama and olmo2 blocks only; read deepseek2 files instead")
    info = gguf.GGML_QUANT_SIZES[shape.weight_type]
    e = shape.n_embd
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim

    def matrix(rows: int, cols: int) -> int:
        return rows * (cols // info[0]) * info[1]

    attn = matrix(q_dim, e) + 2 * matrix(kv_dim, e) + matrix(e, q_dim)
    norms = (q_dim + kv_dim + 2 * e) * 4 if shape.arch == "olmo2" else 2 * e * 4
    if shape.n_expert:
        ffn = shape.n_expert * (2 * matrix(shape.n_ff, e) + matrix(e, shape.n_ff)) + shape.n_expert * e * 4
    else:
        ffn = 2 * matrix(shape.n_ff, e) + matrix(e, shape.n_ff)
    return attn + norms + ffn


def shape_facts(shape: Shape, **overrides: object) -> gguf_facts.ModelFacts:
    """The ``ModelFacts`` that ``read_facts`` returns for ``write_model(shape)``, without a file.

    Pure planner tests use it (with ``overrides`` for fields a GGUF writer here cannot make, such
    as MLA); ``test_gguf_facts`` checks it against a written file.
    """
    info = gguf.GGML_QUANT_SIZES[shape.weight_type]
    n = shape.n_layer
    layer = expected_layer_bytes(shape)
    row = shape.n_embd // info[0] * info[1]  # one row of n_embd weights
    ffn_matrix = shape.n_ff * row
    expert = shape.n_expert * 3 * ffn_matrix
    attn_matrix = shape.n_head * shape.head_dim * row
    biggest = shape.n_expert * ffn_matrix if shape.n_expert else max(ffn_matrix, attn_matrix)
    embd = shape.n_vocab * row
    output = shape.n_embd * 4 + (0 if shape.tied else embd)
    swa = (False,) * n
    if shape.arch == "olmo2" and shape.sliding_window:
        swa = gguf_facts.swa_pattern(n, 4, False)
    fields: dict[str, object] = {
        "architecture": shape.arch,
        "name": shape.name,
        "file_type": 1,
        "block_count": n,
        "context_length": shape.n_ctx_train,
        "embedding_length": shape.n_embd,
        "vocab_size": shape.n_vocab,
        "feed_forward_length": (shape.n_ff,) * n,
        "head_count": (shape.n_head,) * n,
        "head_count_kv": (shape.n_head_kv,) * n,
        "key_length": shape.head_dim,
        "value_length": shape.head_dim,
        "sliding_window": shape.sliding_window,
        "swa_layers": swa,
        "expert_count": shape.n_expert,
        "expert_used_count": (shape.n_expert_used or 2) if shape.n_expert else 0,
        "layer_bytes": (layer,) * n,
        "layer_max_tensor_bytes": (biggest,) * n,
        "layer_expert_bytes": (expert,) * n,
        "output_bytes": output,
        "token_embd_bytes": embd,
        "tied_embeddings": shape.tied,
        "tensor_types": {},
        "total_bytes": layer * n + output + embd,
        "file_bytes": layer * n + output + embd + 4 * 1024 * 1024,
    }
    fields.update(overrides)
    return gguf_facts.ModelFacts.model_validate(fields)
