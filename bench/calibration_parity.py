"""Calibration and evaluation, old path against new, on SmolLM2-135M-Instruct.

1. The importance matrix from the former torch path (``imatrix.compute_imatrix``: the whole
   Hugging Face model in float32 on the CPU) and from ``llama-imatrix`` on the converted f16 GGUF
   (``imatrix.run_llama_imatrix``, what the pipeline now runs), over the same text windows (the torch
   path cuts them as llama-imatrix does). Each runs as a child process, measured for wall time and
   peak memory (tests/fixtures/memory_limit.py). Printed: per-tensor relative L2 distance of the
   importance vectors (goal <= 1e-2 for every tensor) and the row counts.
2. Q4_K_M quantized with each matrix, scored against the f16 reference: KL, perplexity, top-1
   (goal: the new KL within 5% of the old).
3. The reference: f16 (default) against ``evaluation.reference: Q8_0``; the Q8_0 model's own KL from
   f16, and the Q4_K_M variant's KL measured against each.

    .venv/bin/python -P bench/calibration_parity.py [--chunks 8] [--context 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures import hf_models, memory_limit, smollm2
from kquant.quantizer import (
    constants,
    evaluate,
    imatrix,
    quantize,
    quantize_job,
    settings,
)

MiB = 2**20


def child(code: str) -> memory_limit.Usage:
    usage = memory_limit.run([sys.executable, "-P", "-c", textwrap.dedent(code)], env=os.environ)
    if usage.returncode != 0:
        raise SystemExit(usage.output[-3000:])
    return usage


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def score(model: Path, ref: Path, text: str, scoring: evaluate.LlamaEvalSettings) -> tuple[float, float, float]:
    m = evaluate.evaluate(model, ref, text, scoring, settings.Evaluation())
    assert m.kl_divergence is not None and m.top1_agreement is not None
    return m.kl_divergence, m.perplexity, m.top1_agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=8, help="calibration windows")
    parser.add_argument("--context", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-chunks", type=int, default=8)
    args = parser.parse_args()
    hf = smollm2.hf_dir()
    f16 = hf_models.cached_f16_gguf(hf, "smollm2")
    calibration = evaluate.builtin_text("calibration.txt")
    heldout = evaluate.builtin_text("heldout.txt")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text_file = work / "calibration.txt"
        text_file.write_text(calibration, encoding="utf-8")
        old_path, new_path = work / "torch.imatrix.gguf", work / "llama.imatrix.gguf"
        old = child(f"""
            from pathlib import Path
            from kquant.quantizer import imatrix
            text = Path({str(text_file)!r}).read_text(encoding="utf-8")
            data = imatrix.compute_imatrix(Path({str(hf)!r}), [text], chunks={args.chunks},
                                           context_size={args.context}, device="cpu")
            imatrix.write_gguf(data, Path({str(old_path)!r}))
        """)
        new = child(f"""
            import os
            from pathlib import Path
            from kquant.quantizer import imatrix
            imatrix.run_llama_imatrix(Path({str(f16)!r}), Path({str(text_file)!r}), Path({str(new_path)!r}),
                                      chunks={args.chunks}, context_size={args.context}, threads=os.cpu_count() or 1)
        """)
        a, b = imatrix.read_gguf(old_path), imatrix.read_gguf(new_path)
        common = sorted(set(a) & set(b))
        dist = {name: rel_l2(a[name], b[name]) for name in common}
        worst = sorted(dist, key=dist.__getitem__, reverse=True)
        f16_mib = f16.stat().st_size / MiB
        print(f"== 1. importance matrix, {args.chunks} windows x {args.context} tokens, f16 GGUF {f16_mib:.0f} MiB")
        print(f"{'path':<34} {'wall s':>7} {'peak anon MiB':>14} {'peak rss MiB':>13} {'tensors':>8} {'rows':>6}")
        for label, usage, data in (("torch, whole model (old)", old, a), ("llama-imatrix on the GGUF (new)", new, b)):
            rows = int(next(iter(data.counts.values())).sum())
            print(
                f"{label:<34} {usage.seconds:>7.1f} {usage.peak_anon_bytes / MiB:>14.0f} "
                f"{usage.peak_rss_bytes / MiB:>13.0f} {len(data):>8} {rows:>6}"
            )
        print(
            f"tensors in both: {len(common)}; only torch: {sorted(set(a) - set(b))[:3]}; "
            f"only llama-imatrix: {sorted(set(b) - set(a))[:3]}"
        )
        within = sum(1 for d in dist.values() if d <= 1e-2)
        print(
            f"relative L2 per tensor: max {dist[worst[0]]:.2e} ({worst[0]}), median "
            f"{float(np.median(list(dist.values()))):.2e}; {within}/{len(dist)} <= 1e-2"
        )
        for name in worst[:3]:
            print(f"  {name:<32} {dist[name]:.2e}")

        scoring = evaluate.LlamaEvalSettings(context_size=512, chunks=args.eval_chunks, threads=os.cpu_count() or 0)
        ref = work / "ref-f16"
        evaluate.build_reference(f16, heldout, ref, scoring)
        job = quantize_job.QuantizeJob(file_type=constants.FileType.Q4_K_M, nthread=os.cpu_count() or 0)
        results = {}
        for label, data in (("torch", a), ("llama-imatrix", b)):
            out = work / f"q4km-{label}.gguf"
            quantize.quantize(f16, out, job, data)
            results[label] = (out, score(out, ref, heldout, scoring))
        print(f"\n== 2. Q4_K_M with each importance matrix, {args.eval_chunks} x 512 held-out tokens vs f16")
        print(f"{'imatrix':<14} {'KL':>9} {'ppl':>8} {'top-1':>6}")
        for label, (_, (kl, ppl, top1)) in results.items():
            print(f"{label:<14} {kl:>9.5f} {ppl:>8.3f} {top1:>6.3f}")
        kl_old, kl_new = results["torch"][1][0], results["llama-imatrix"][1][0]
        print(f"KL new / old = {kl_new / kl_old:.3f} (goal within 5%: {abs(kl_new / kl_old - 1) <= 0.05})")

        reference_section(f16, work, heldout, scoring, ref, results["llama-imatrix"], args.eval_chunks)


def reference_section(
    f16: Path,
    work: Path,
    heldout: str,
    scoring: evaluate.LlamaEvalSettings,
    ref: Path,
    new: tuple[Path, tuple[float, float, float]],
    eval_chunks: int,
) -> None:
    """Section 3: the Q8_0 reference option against the f16 reference."""
    q8 = work / "ref-q8_0.gguf"
    quantize.quantize(f16, q8, quantize_job.QuantizeJob(file_type=constants.FileType.Q8_0), None)
    ref_q8 = work / "ref-q8"
    evaluate.build_reference(q8, heldout, ref_q8, scoring)
    q8_kl, q8_ppl, q8_top1 = score(q8, ref, heldout, scoring)
    variant = new[0]
    kl_f16 = new[1][0]
    kl_q8, _, _ = score(variant, ref_q8, heldout, scoring)
    size = evaluate.reference_bytes(eval_chunks * 511, 49152)
    print("\n== 3. reference F16 vs Q8_0 (spec.evaluation.reference)")
    print(f"Q8_0 model vs f16: KL {q8_kl:.6f}, ppl {q8_ppl:.3f}, top-1 {q8_top1:.3f}")
    print(
        f"Q4_K_M (llama-imatrix) KL vs f16 reference {kl_f16:.5f}, vs Q8_0 reference {kl_q8:.5f} "
        f"({kl_q8 / kl_f16 - 1:+.1%})"
    )
    print(
        f"reference log-probabilities for {eval_chunks} chunks of 512: {size / MiB:.1f} MiB "
        f"(positions x vocab x 2 bytes); at the API's 10,000 chunks x 512 with DeepSeek's "
        f"129,280 tokens: {evaluate.reference_bytes_at_most(10_000, 512, 129_280) / 2**40:.2f} TiB"
    )


if __name__ == "__main__":
    main()
