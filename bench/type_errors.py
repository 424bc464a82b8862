"""Measure each llama.cpp type's relative quantization error, the numbers in recipes.RELATIVE_ERROR.

A random f16 llama model (tests/fixtures/gguf_models.py, Gaussian weights) is quantized by llama.cpp
in-process with every block tensor forced to one type, once without and once with a log-normal
importance matrix; the result is dequantized with gguf-py and compared with the source:

    plain    = sum (w - q)^2 / sum w^2                      (quantized without an imatrix)
    weighted = sum_j imp_j (w - q)_j^2 / sum_j imp_j w_j^2   (quantized with it)

Types that llama.cpp refuses without an imatrix report the imatrix run in both columns.

    .venv/bin/python -P bench/type_errors.py
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
from kquant.quantizer import constants, imatrix, quantize, quantize_job, recipes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures import gguf_models

T = constants.TensorType
TYPES = [*recipes.CANDIDATES, T.TQ1_0, T.TQ2_0, T.MXFP4, T.Q4_1, T.Q5_1, T.F16, T.BF16]


def blocks(path: Path) -> dict[str, tuple[npt.NDArray[np.float32], int]]:
    """Every block weight of ``path`` dequantized to float32, with its ggml type code."""
    reader = gguf.GGUFReader(path)
    out = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) >= 2:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            out[tensor.name] = (np.asarray(values, dtype=np.float32), int(tensor.tensor_type))
    return out


def errors(
    source: dict[str, tuple[npt.NDArray[np.float32], int]],
    result: dict[str, tuple[npt.NDArray[np.float32], int]],
    weights: imatrix.ImatrixData,
) -> tuple[float, float]:
    num = den = wnum = wden = 0.0
    for name, (w, _) in source.items():
        q = result[name][0].reshape(w.shape)
        imp = weights.column_importance(name)
        diff2 = (w - q) ** 2
        num += float(diff2.sum())
        den += float((w * w).sum())
        wnum += float((diff2 * imp).sum())
        wden += float((w * w * imp).sum())
    return num / den, wnum / wden


def main() -> None:
    spec = dataclasses.replace(gguf_models.QUANTIZABLE, n_embd=1024, n_ff=2048, n_layer=2, n_head=8, n_head_kv=4)
    with tempfile.TemporaryDirectory() as tmp:
        src = gguf_models.write_model(Path(tmp) / "f16.gguf", spec)
        synthetic = gguf_models.synthetic_imatrix_values(src)
        data = imatrix.ImatrixData(
            means={name: values for name, (values, _) in synthetic.items()},
            counts={name: np.full(n, 512, dtype=np.int64) for name, (_, n) in synthetic.items()},
            chunk_count=1,
            chunk_size=512,
        )
        source = blocks(src)
        print(f"{'type':<8} {'bpw':>6} {'plain':>10} {'weighted':>10} {'seconds':>8}")
        for tensor_type in TYPES:
            job = quantize_job.QuantizeJob(
                file_type=constants.FileType.Q8_0, overrides=((r"^blk\.", tensor_type),), nthread=2
            )
            dst = Path(tmp) / f"{tensor_type}.gguf"
            start = time.perf_counter()
            quantize.quantize(src, dst, job, data)
            weighted_run = errors(source, blocks(dst), data)
            seconds = time.perf_counter() - start
            if constants.TENSOR_TYPES[tensor_type].needs_imatrix:
                plain = weighted_run[0]
            else:
                quantize.quantize(src, dst, job, None)
                plain = errors(source, blocks(dst), data)[0]
            bpw = constants.TENSOR_TYPES[tensor_type].bits_per_weight
            print(f"{tensor_type:<8} {bpw:>6.3f} {plain:>10.3e} {weighted_run[1]:>10.3e} {seconds:>8.2f}")
            dst.unlink()


if __name__ == "__main__":
    main()
