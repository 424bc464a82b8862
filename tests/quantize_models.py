"""Small random-weight GGUF models for the quantizer's tests and benchmarks.

Widths are multiples of 256 so every K- and IQ-type applies (SmolLM2's 576-wide rows make them
fall back). The weights are random but not featureless: norm weights are log-normal per channel,
so some input columns carry far more energy than others, as in trained models; that is what an
importance matrix exists to capture. The MoE variant is llama.cpp's Mixtral layout (llama
architecture with ``ffn_*_exps`` tensors and a router), which llama.cpp loads and quantizes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gguf
import gguf_models
import numpy as np
import numpy.typing as npt


@dataclasses.dataclass(frozen=True)
class RandomModel:
    n_embd: int = 256
    n_ff: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_vocab: int = 512
    n_expert: int = 0
    n_expert_used: int = 0
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _write_header(writer: gguf.GGUFWriter, spec: RandomModel) -> None:
    writer.add_name("kquant-random")
    writer.add_context_length(512)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(1)
    if spec.n_expert:
        writer.add_expert_count(spec.n_expert)
        writer.add_expert_used_count(spec.n_expert_used)
    gguf_models.write_vocab(writer, spec.n_vocab, ranked_scores=True)
    writer.add_add_bos_token(True)


def write_random_llama(path: Path, spec: RandomModel = RandomModel()) -> Path:
    """Write an f16 llama-architecture GGUF (Mixtral-style MoE when ``spec.n_expert``) to ``path``."""
    rng = np.random.default_rng(spec.seed)

    def matrix(*shape: int) -> npt.NDArray[np.float16]:
        # numpy shape is (..., rows, cols); ggml stores it reversed, cols first
        values: npt.NDArray[np.float16] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16)
        return values

    def norm() -> npt.NDArray[np.float32]:
        return rng.lognormal(0.0, 0.6, spec.n_embd).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    _write_header(writer, spec)
    kv = spec.n_head_kv * spec.head_dim
    writer.add_tensor("token_embd.weight", (rng.standard_normal((spec.n_vocab, spec.n_embd))).astype(np.float16))
    for i in range(spec.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        if spec.n_expert:
            writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", matrix(spec.n_expert, spec.n_embd).astype(np.float32))
            writer.add_tensor(f"blk.{i}.ffn_gate_exps.weight", matrix(spec.n_expert, spec.n_ff, spec.n_embd))
            writer.add_tensor(f"blk.{i}.ffn_up_exps.weight", matrix(spec.n_expert, spec.n_ff, spec.n_embd))
            writer.add_tensor(f"blk.{i}.ffn_down_exps.weight", matrix(spec.n_expert, spec.n_embd, spec.n_ff))
        else:
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(spec.n_ff, spec.n_embd))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(spec.n_ff, spec.n_embd))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(spec.n_embd, spec.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", (3 * matrix(spec.n_vocab, spec.n_embd)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def synthetic_imatrix_values(path: Path, seed: int = 1) -> dict[str, tuple[npt.NDArray[np.float32], int]]:
    """Plausible imatrix vectors for every 2-D weight of a GGUF: log-normal per column, one vector
    per expert for ``_exps`` tensors. Returns name -> (values, number of matrices)."""
    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(path)
    out: dict[str, tuple[npt.NDArray[np.float32], int]] = {}
    for tensor in reader.tensors:
        shape = [int(n) for n in tensor.shape]
        if len(shape) < 2 or "norm" in tensor.name or "gate_inp" in tensor.name or tensor.name == "token_embd.weight":
            continue
        n_mat = shape[2] if len(shape) > 2 else 1
        out[tensor.name] = (rng.lognormal(0.0, 1.0, shape[0] * n_mat).astype(np.float32), n_mat)
    return out


def write_tiny_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, saved as a Hugging Face tokenizer."""
    import tokenizers
    import transformers

    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "quantization keeps the important columns"] * 20
    model.train_from_iterator(text, trainer)
    fast: Any = transformers.PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>")  # type: ignore[no-untyped-call]
    fast.save_pretrained(folder)


def write_random_hf(folder: Path, model_type: str, **config: int) -> Path:
    """A tiny random Hugging Face model (``llama``, ``mixtral`` or ``qwen2_moe``) with a tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 320,
        "max_position_embeddings": 256,
    } | config
    cfg = transformers.AutoConfig.for_model(model_type, **base)
    model: Any = transformers.AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, base["vocab_size"])
    return folder


def cached_f16_gguf(hf_dir: Path, name: str) -> Path:
    """``hf_dir`` converted to f16 once by the pipeline's converter, cached next to part A's fixtures
    under ``~/.cache/kquant/fixtures/gguf/<name>.f16.gguf`` (written under a temporary name)."""
    from kquant.quantizer import convert, settings

    root = Path.home() / ".cache" / "kquant" / "fixtures" / "gguf"
    out = root / f"{name}.f16.gguf"
    if not out.is_file():
        convert.convert(hf_dir, out, settings.ConvertType.F16)
    return out


def write_random_hf_like(folder: Path, tokenizer_dir: Path, **config: float) -> Path:
    """A random llama whose widths are multiples of 256, using ``tokenizer_dir``'s tokenizer (so the
    converter recognises its pre-tokenizer); embeddings are tied, as in SmolLM2."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    base = {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 12,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "initializer_range": 0.1,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    } | config
    cfg = transformers.LlamaConfig(**base)
    model: Any = transformers.LlamaForCausalLM(cfg)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(folder)
    return folder
