"""Step 6 for a bitsandbytes variant: the same measurement as ``evaluate``, with transformers.

llama.cpp cannot read a bnb folder, so both sides of the comparison run in transformers: the
16-bit safetensors model is the reference, scored once per build into the same on-disk form as
the GGUF reference (``reference.json``, ``tokens.npy``, float16 ``logprobs.npy``), and each bnb
variant is scored against it chunk by chunk. The text, its chunking (``evaluate.chunk_tokens``:
``evaluation.contextSize`` and ``chunks``), the scores (``evaluate.score_chunk``) and the gate
(``evaluate.gate``) are the GGUF path's own, so a bnb variant's perplexity and KL mean what a GGUF
variant's do; the tokenizer is the model's Hugging Face one, so the numbers of the two paths are
comparable across variants of one format, not token for token across formats.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from kquant.quantizer import bnb, evaluate, report, settings

log = logging.getLogger(__name__)


def _bos(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one to a plain text, as llama.cpp's ``add_bos`` flag says."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True).input_ids
    return int(bos) if probe and probe[0] == bos else None


def _chunks(tokenizer: Any, text: str, scoring: evaluate.LlamaEvalSettings) -> list[list[int]]:
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    chunks = evaluate.chunk_tokens(tokens, scoring.context_size, scoring.chunks, _bos(tokenizer))
    if not chunks:
        raise evaluate.EvaluateError(f"the held-out text has {len(tokens)} tokens; at least 2 are needed")
    return chunks


def _logprobs(model: Any, chunk: Sequence[int]) -> evaluate.FloatArray:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor([list(chunk)], dtype=torch.long, device=device)
        logits = model(ids).logits[0, : len(chunk) - 1].float()
        out: evaluate.FloatArray = torch.log_softmax(logits, dim=-1).cpu().numpy().astype(np.float32)
    return out


def _set_threads(scoring: evaluate.LlamaEvalSettings) -> None:
    import torch

    if scoring.threads:
        torch.set_num_threads(scoring.threads)


def build_reference(
    source_dir: Path,
    text: str,
    out_dir: Path,
    scoring: evaluate.LlamaEvalSettings,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Score ``text`` with the 16-bit model in ``source_dir``; keep tokens and log-probs on disk."""
    import torch

    _set_threads(scoring)
    meta_path, tokens_path, logprobs_path = evaluate.reference_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = bnb.load_tokenizer(source_dir)
    chunks = _chunks(tokenizer, text, scoring)
    # float32 on a CPU: bfloat16 matmuls there are emulated and slower, and the reference should not round
    dtype = torch.float32 if bnb.device_map() == "cpu" else "auto"
    model = bnb.load_causal_lm(source_dir, dtype=dtype)
    vocab = int(model.config.vocab_size)
    parameters = sum(int(p.numel()) for p in model.parameters())
    positions = sum(len(c) - 1 for c in chunks)
    logprobs_path.unlink(missing_ok=True)
    evaluate.check_reference_space(out_dir, evaluate.reference_bytes(positions, vocab), positions, vocab)
    logprobs = np.lib.format.open_memmap(logprobs_path, mode="w+", dtype=np.float16, shape=(positions, vocab))
    row, nll = 0, 0.0
    for i, chunk in enumerate(chunks):
        lp = _logprobs(model, chunk)[:, :vocab]
        nll += evaluate.score_chunk(lp, chunk[1:], None).nll
        logprobs[row : row + len(lp)] = lp
        row += len(lp)
        if progress is not None:
            progress((i + 1) / len(chunks))
    logprobs.flush()
    del logprobs, model
    np.save(tokens_path, np.concatenate([np.asarray(c, dtype=np.int32) for c in chunks]))
    meta = {"lengths": [len(c) for c in chunks], "perplexity": math.exp(nll / positions),
            "positions": positions, "vocab": vocab, "parameters": parameters}  # fmt: skip
    meta_path.write_text(json.dumps(meta))


def evaluate_folder(
    folder: Path,
    ref_dir: Path,
    scoring: evaluate.LlamaEvalSettings,
    ev: settings.Evaluation,
    progress: Callable[[float], None] | None = None,
) -> report.Metrics:
    """Score the bnb folder against the reference in ``ref_dir``, then a smoke generation."""
    _set_threads(scoring)
    meta_path, tokens_path, logprobs_path = evaluate.reference_outputs(ref_dir)
    meta = json.loads(meta_path.read_text())
    flat = np.load(tokens_path)
    bounds = np.cumsum([0, *meta["lengths"]])
    chunks = [flat[a:b].tolist() for a, b in itertools.pairwise(bounds)]
    ref = np.load(logprobs_path, mmap_mode="r")
    model = bnb.load_causal_lm(folder)
    if int(model.config.vocab_size) != meta["vocab"]:
        raise evaluate.EvaluateError(
            f"{folder.name} has {model.config.vocab_size} tokens in its vocabulary, the reference {meta['vocab']}"
        )
    total = evaluate.ChunkScore(0, 0.0)
    row = 0
    for i, chunk in enumerate(chunks):
        lq = _logprobs(model, chunk)[:, : meta["vocab"]]
        s = evaluate.score_chunk(lq, chunk[1:], np.asarray(ref[row : row + len(lq)]))
        total = evaluate.ChunkScore(
            total.positions + s.positions, total.nll + s.nll, total.kl + s.kl, total.agree + s.agree
        )
        row += len(lq)
        if progress is not None:
            progress(0.9 * (i + 1) / len(chunks))
    smoke = smoke_generate(model, bnb.load_tokenizer(folder), ev.smoke_prompt, ev.smoke_tokens)
    n = max(total.positions, 1)
    return report.Metrics(
        tokens=total.positions,
        # the 16-bit model's count: a packed 4-bit tensor holds two weights per element
        parameters=meta.get("parameters"),
        perplexity=math.exp(total.nll / n),
        reference_perplexity=meta.get("perplexity"),
        kl_divergence=total.kl / n,
        top1_agreement=total.agree / n,
        smoke=smoke,
    )


def smoke_generate(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> report.SmokeResult:
    """Greedy generation through the tokenizer's chat template (plain text when it has none)."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt).input_ids
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], device=device), max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    generated = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    bos = tokenizer.bos_token_id
    count = evaluate.leading_bos(ids, bos) if bos is not None else 0
    return report.SmokeResult(
        prompt=prompt, text=generated, prompt_tokens=len(ids), bos_count=count,
        passed=bool(generated.strip()) and count <= 1,
    )  # fmt: skip
