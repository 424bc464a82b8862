"""Step 6: how much a variant lost, measured with llama.cpp itself on held-out text.

Three numbers, all over the same token chunks:

* perplexity of the variant (and of the reference, for the relative gate);
* KL(reference || variant) per token, averaged: the most sensitive of the three, and the one to
  trust on short texts where perplexity is noisy (research: Q4_K_M+imatrix "beat" f16 on ppl);
* top-1 agreement: how often both models pick the same next token.

The reference is the 16-bit GGUF the pipeline converted. Its log-probabilities are computed once
per build and kept on disk as float16 (a memory map; positions x vocabulary), the same idea as
``llama-perplexity --kl-divergence-base``: each variant is then scored without loading two models
at once, which matters when the model barely fits the GPU.

A smoke generation renders the model's own chat template (from its GGUF metadata) and generates
greedily; the prompt is tokenised so that a template that writes BOS itself does not get a second
one from the tokenizer, and the BOS count is reported.

Pure maths (``chunk_tokens``, ``log_softmax``, ``score_chunk``, ``gate``) is separate from the
llama.cpp calls so it can be unit-tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.resources
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import llama_cpp
import numpy as np
import numpy.typing as npt
from kquant.quantizer import gguf_facts, report, settings, space

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

_REF_META = "reference.json"
_REF_TOKENS = "tokens.npy"
_REF_LOGPROBS = "logprobs.npy"


class EvaluateError(Exception):
    """The model could not be loaded or scored."""


def builtin_text(name: str) -> str:
    """A text shipped in ``kquant.quantizer/data`` (``calibration.txt`` or ``heldout.txt``)."""
    return importlib.resources.files("kquant.quantizer").joinpath("data", name).read_text(encoding="utf-8")


def dataset_text(kind: settings.DatasetKind, path: Path | None, builtin: str) -> str:
    if kind is settings.DatasetKind.BUILTIN:
        return builtin_text(builtin)
    assert path is not None  # the spec validator requires it
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvaluateError(f"cannot read dataset file {path}: {exc.strerror}") from None
    if not text.strip():
        raise EvaluateError(f"dataset file {path} is empty")
    return text


# ---------------------------------------------------------------- pure maths


def chunk_tokens(tokens: Sequence[int], context: int, max_chunks: int, bos: int | None) -> list[list[int]]:
    """Cut ``tokens`` into chunks of ``context`` tokens, each starting with BOS when the model uses it.

    A text shorter than one chunk gives one short chunk; at least two tokens are needed to score.
    """
    body = context - (1 if bos is not None else 0)
    prefix = [bos] if bos is not None else []
    chunks = [prefix + list(tokens[i : i + body]) for i in range(0, len(tokens) - body + 1, body)]
    if not chunks and len(tokens) >= 2:
        chunks = [prefix + list(tokens)]
    return chunks[:max_chunks]


def log_softmax(logits: FloatArray) -> FloatArray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: FloatArray = (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class ChunkScore:
    positions: int
    nll: float
    kl: float = 0.0
    agree: int = 0


def score_chunk(logq: FloatArray, targets: Sequence[int], logp: FloatArray | None) -> ChunkScore:
    """Score one chunk: ``logq``/``logp`` are the variant's/reference's log-probs at each position
    that predicts a target (rows), ``targets`` the tokens that followed."""
    n = len(targets)
    idx = np.arange(n)
    nll = float(-logq[idx, np.asarray(targets)].sum())
    if logp is None:
        return ChunkScore(n, nll)
    p = np.exp(logp.astype(np.float32))
    kl = float((p * (logp.astype(np.float32) - logq)).sum())
    agree = int((logp.argmax(axis=1) == logq.argmax(axis=1)).sum())
    return ChunkScore(n, nll, kl, agree)


def gate(metrics: report.Metrics, ev: settings.Evaluation) -> report.Gate:
    """Pass when every threshold given is met; a threshold that cannot be checked fails it."""
    reasons: list[str] = []
    if ev.max_kl_divergence is not None:
        if metrics.kl_divergence is None:
            reasons.append("maxKLDivergence is set, but there is no 16-bit reference to compare with")
        elif metrics.kl_divergence > ev.max_kl_divergence:
            reasons.append(f"KL divergence {metrics.kl_divergence:.4f} > maxKLDivergence {ev.max_kl_divergence}")
    if ev.max_perplexity_increase is not None:
        if metrics.reference_perplexity is None:
            reasons.append("maxPerplexityIncrease is set, but there is no 16-bit reference to compare with")
        else:
            rise = metrics.perplexity / metrics.reference_perplexity - 1
            if rise > ev.max_perplexity_increase:
                reasons.append(
                    f"perplexity {metrics.perplexity:.3f} is {rise:.1%} above the reference "
                    f"{metrics.reference_perplexity:.3f} > maxPerplexityIncrease "
                    f"{ev.max_perplexity_increase:.1%}"
                )
    if ev.min_top1_agreement is not None:
        if metrics.top1_agreement is None:
            reasons.append("minTop1Agreement is set, but there is no 16-bit reference to compare with")
        elif metrics.top1_agreement < ev.min_top1_agreement:
            reasons.append(f"top-1 agreement {metrics.top1_agreement:.3f} < minTop1Agreement {ev.min_top1_agreement}")
    if not math.isfinite(metrics.perplexity):
        reasons.append(f"perplexity is {metrics.perplexity}: the model's output is broken")
    if metrics.smoke is not None and not metrics.smoke.passed:
        reasons.append(
            f"smoke generation failed: {metrics.smoke.bos_count} BOS token(s), text {metrics.smoke.text[:60]!r}"
        )
    return report.Gate(passed=not reasons, reasons=reasons)


# ---------------------------------------------------------------- llama.cpp


@dataclasses.dataclass(frozen=True)
class LlamaEvalSettings:
    """How llama.cpp is loaded to score a model, and how much of the text it scores.

    The reference and every variant are scored with the same settings, so their log-probabilities
    line up chunk by chunk.
    """

    context_size: int
    chunks: int
    threads: int = 0
    gpu_layers: int | None = None
    """``n_gpu_layers``: the operator's plan for the build pod's GPUs; None fits the free GPU
    memory (:func:`fitted_gpu_layers`), which is 0 on a host without GPUs."""

    @classmethod
    def from_spec(cls, ev: settings.Evaluation, threads: int) -> LlamaEvalSettings:
        return cls(ev.context_size, ev.chunks, threads, ev.gpu_layers)


def layers_that_fit(block_bytes: Sequence[int], output_bytes: int, free_bytes: int, reserve_bytes: int) -> int:
    """How many layers llama.cpp's ``n_gpu_layers`` may put on GPUs with ``free_bytes`` free.

    llama.cpp offloads the output layer first (``n_gpu_layers = n_block + 1`` means everything),
    then blocks from the last one down; ``reserve_bytes`` is kept for the KV cache and compute
    buffers. Pure, so the rule is tested without a GPU. The operator's planner, which models
    llama.cpp's memory in detail, overrides this through ``spec.evaluation.gpuLayers``.
    """
    budget = free_bytes - reserve_bytes - output_bytes
    if budget < 0:
        return 0
    layers = 1
    for size in reversed(block_bytes):
        if size > budget:
            break
        budget -= size
        layers += 1
    return layers


def _free_gpu_bytes() -> int:
    """Free memory over every GPU this process sees; 0 when llama.cpp has no GPU backend."""
    if not llama_cpp.llama_supports_gpu_offload():
        return 0
    try:
        import torch  # the quantizer image has it; only a GPU host gets here

        if not torch.cuda.is_available():
            return 0
        return sum(int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count()))
    except ImportError:
        return 0


def fitted_gpu_layers(model: Path, scoring: LlamaEvalSettings) -> int:
    """``scoring.gpu_layers`` when set, else the layers of ``model`` that fit the free GPU memory."""
    if scoring.gpu_layers is not None:
        return scoring.gpu_layers
    free = _free_gpu_bytes()
    if free == 0:
        return 0
    facts = gguf_facts.read_facts(model)
    # KV cache in f16 for one context (an upper bound: full-width K and V per block), the logits
    # of one context twice (llama.cpp's and the copy this module reads) and a compute margin.
    kv = 2 * 2 * scoring.context_size * facts.embedding_length * facts.block_count
    reserve = kv + 2 * 4 * scoring.context_size * facts.vocab_size + 512 * 2**20
    return layers_that_fit(facts.layer_bytes, facts.output_device_bytes, free, reserve)


@contextlib.contextmanager
def load(model: Path, scoring: LlamaEvalSettings, *, logits_all: bool = True) -> Iterator[Any]:
    """A ``llama_cpp.Llama`` for ``model``, closed afterwards; a load failure is an EvaluateError."""
    try:
        llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=scoring.context_size,
            n_batch=scoring.context_size,
            n_ubatch=scoring.context_size,
            logits_all=logits_all,
            # memory-mapped weights: on the host they are page cache, not this process's memory
            use_mmap=True,
            n_gpu_layers=fitted_gpu_layers(model, scoring),
            n_threads=scoring.threads or None,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise EvaluateError(f"llama.cpp could not load {model.name}: {exc}") from None
    try:
        yield llm
    finally:
        llm.close()
        release_freed_memory()


def release_freed_memory() -> None:
    """Give the heap that llama.cpp freed back to the kernel (glibc's ``malloc_trim``).

    Without it, what a closed model and its context freed stays in the process's malloc arenas:
    anonymous memory that a memory limit cannot reclaim, carried into the next step (publish
    measured 0.176 bytes per 16-bit byte that way, bench/build_memory.py). Other C libraries
    have no such call: nothing to do there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _bos(llm: Any) -> int | None:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return int(llm.token_bos()) if llama_cpp.llama_vocab_get_add_bos(vocab) else None


def _chunk_logprobs(llm: Any, chunk: Sequence[int]) -> FloatArray:
    llm.reset()
    llm.eval(list(chunk))
    return log_softmax(np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float32))


REFERENCE_HEADER_BYTES = 4096
"""Room for the ``.npy`` header, ``tokens.npy`` beyond its tokens, and ``reference.json``."""


def reference_bytes(positions: int, vocab: int) -> int:
    """On-disk size of the reference log-probabilities: float16, one row per scored position
    (``logprobs.npy``), plus the tokens (int32) and the small files."""
    return positions * vocab * 2 + (positions + 1) * 4 + REFERENCE_HEADER_BYTES


def reference_bytes_at_most(chunks: int, context_size: int, vocab: int) -> int:
    """The most :func:`reference_bytes` can be for ``chunks`` chunks of ``context_size`` tokens
    (a shorter text scores fewer positions): what sizing reserves before anything is written."""
    return reference_bytes(chunks * (context_size - 1), vocab)


def check_reference_space(folder: Path, needed: int, positions: int, vocab: int) -> None:
    """Refuse to write reference log-probabilities that cannot fit, naming the spec fields."""
    free = space.free_bytes(folder)
    if free < needed:
        raise EvaluateError(
            f"the reference log-probabilities need {space.gib(needed)} ({positions} positions x "
            f"{vocab} tokens x 2 bytes) in {folder}, but it has {space.gib(free)} free; lower "
            "spec.evaluation.chunks or spec.evaluation.contextSize, or grow spec.storage.pvc.size"
        )


def build_reference(
    model: Path, text: str, out_dir: Path, scoring: LlamaEvalSettings, progress: Callable[[float], None] | None = None
) -> None:
    """Tokenise ``text`` with the reference model, score it, keep tokens and log-probs on disk.

    The size of the log-probabilities is known once the text is tokenised and is checked against
    the free space before a byte of it is written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with load(model, scoring) as llm:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        chunks = chunk_tokens(tokens, scoring.context_size, scoring.chunks, _bos(llm))
        if not chunks:
            raise EvaluateError(f"the held-out text has {len(tokens)} tokens; at least 2 are needed")
        positions = sum(len(c) - 1 for c in chunks)
        vocab = int(llm.n_vocab())
        stale = out_dir / _REF_LOGPROBS
        stale.unlink(missing_ok=True)  # a partial file of an earlier attempt is not free space
        check_reference_space(out_dir, reference_bytes(positions, vocab), positions, vocab)
        logprobs = np.lib.format.open_memmap(
            out_dir / _REF_LOGPROBS, mode="w+", dtype=np.float16, shape=(positions, vocab)
        )
        row, nll = 0, 0.0
        for i, chunk in enumerate(chunks):
            lp = _chunk_logprobs(llm, chunk)
            nll += score_chunk(lp, chunk[1:], None).nll
            logprobs[row : row + len(lp)] = lp
            row += len(lp)
            if progress is not None:
                progress((i + 1) / len(chunks))
        logprobs.flush()
        del logprobs
        lengths = [len(c) for c in chunks]
        np.save(out_dir / _REF_TOKENS, np.concatenate([np.asarray(c, dtype=np.int32) for c in chunks]))
        meta = {
            "lengths": lengths,
            "perplexity": math.exp(nll / positions),
            "positions": positions,
            "vocab": vocab,
        }
        (out_dir / _REF_META).write_text(json.dumps(meta))


def reference_outputs(out_dir: Path) -> tuple[Path, ...]:
    return (out_dir / _REF_META, out_dir / _REF_TOKENS, out_dir / _REF_LOGPROBS)


def evaluate(
    model: Path,
    ref_dir: Path | None,
    text: str,
    scoring: LlamaEvalSettings,
    ev: settings.Evaluation,
    *,
    progress: Callable[[float], None] | None = None,
) -> report.Metrics:
    """Score ``model`` against the reference in ``ref_dir`` (or alone when there is none)."""
    with load(model, scoring) as llm:
        if ref_dir is not None:
            meta = json.loads((ref_dir / _REF_META).read_text())
            flat = np.load(ref_dir / _REF_TOKENS)
            bounds = np.cumsum([0, *meta["lengths"]])
            chunks = [flat[a:b].tolist() for a, b in itertools.pairwise(bounds)]
            ref = np.load(ref_dir / _REF_LOGPROBS, mmap_mode="r")
            if int(llm.n_vocab()) != meta["vocab"]:
                raise EvaluateError(
                    f"{model.name} has {llm.n_vocab()} tokens in its vocabulary, the reference {meta['vocab']}"
                )
        else:
            tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
            chunks = chunk_tokens(tokens, scoring.context_size, scoring.chunks, _bos(llm))
            ref, meta = None, {}
        total = ChunkScore(0, 0.0)
        row = 0
        for i, chunk in enumerate(chunks):
            lq = _chunk_logprobs(llm, chunk)
            lp = None if ref is None else np.asarray(ref[row : row + len(lq)])
            s = score_chunk(lq, chunk[1:], lp)
            total = ChunkScore(total.positions + s.positions, total.nll + s.nll, total.kl + s.kl, total.agree + s.agree)
            row += len(lq)
            if progress is not None:
                progress(0.9 * (i + 1) / len(chunks))
        smoke = smoke_generate(llm, ev.smoke_prompt, ev.smoke_tokens)
        parameters = int(llama_cpp.llama_model_n_params(llm.model))
    n = max(total.positions, 1)
    return report.Metrics(
        tokens=total.positions,
        parameters=parameters,
        perplexity=math.exp(total.nll / n),
        reference_perplexity=meta.get("perplexity"),
        kl_divergence=None if ref is None else total.kl / n,
        top1_agreement=None if ref is None else total.agree / n,
        smoke=smoke,
    )


def render_chat(template: str, prompt: str, bos_text: str, eos_text: str) -> str:
    """The model's own chat template with one user message and the generation prompt."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        bos_token=bos_text,
        eos_token=eos_text,
        raise_exception=raise_exception,
    )


def leading_bos(tokens: Sequence[int], bos: int) -> int:
    count = 0
    for t in tokens:
        if t != bos:
            break
        count += 1
    return count


def smoke_generate(llm: Any, prompt: str, max_tokens: int) -> report.SmokeResult:
    """Greedy generation through the chat template; BOS is added only if the template did not."""
    bos_id, eos_id = int(llm.token_bos()), int(llm.token_eos())
    add_bos = _bos(llm) is not None
    bos_text = llm.detokenize([bos_id], special=True).decode(errors="replace") if bos_id >= 0 else ""
    eos_text = llm.detokenize([eos_id], special=True).decode(errors="replace") if eos_id >= 0 else ""
    template = llm.metadata.get("tokenizer.chat_template")
    text = render_chat(template, prompt, bos_text, eos_text) if template else prompt
    template_has_bos = bool(bos_text) and text.startswith(bos_text)
    tokens = llm.tokenize(text.encode(), add_bos=add_bos and not template_has_bos, special=True)
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
        if llm.token_eos() == tok or len(out) >= max_tokens:
            break
        out.append(tok)
    generated = llm.detokenize(out).decode(errors="replace")
    count = leading_bos(tokens, bos_id)
    return report.SmokeResult(
        prompt=prompt,
        text=generated,
        prompt_tokens=len(tokens),
        bos_count=count,
        passed=bool(generated.strip()) and count <= 1,
    )
