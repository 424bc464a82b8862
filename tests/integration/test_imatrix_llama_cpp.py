"""The imatrix GGUF format against llama.cpp's own tools, built from the same vendored source.

``llama-imatrix`` writes a file that :func:`imatrix.read_gguf` must read, and ``llama-quantize
--imatrix`` must accept a file that :func:`imatrix.write_gguf` wrote and produce the same tensors
as the in-process quantizer given the same data. The binaries come from the llama-cpp-python
0.3.36 sdist's ``vendor/llama.cpp`` (``cmake --build <build> --target llama-imatrix
llama-quantize`` in ``~/.cache/kquant/llama.cpp/0.3.36/bin`` (hack/build-llama.sh), or ``KQUANT_LLAMA_BIN``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixtures import gguf_models
from kquant.quantizer import constants, evaluate, imatrix, quantize, quantize_job

BIN = Path(
    os.environ.get("KQUANT_LLAMA_BIN", Path.home() / ".cache" / "kquant" / "llama.cpp" / "0.3.36" / "bin")
)


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{path} is not built: run hack/build-llama.sh")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_models.write_model(tmp_path_factory.mktemp("m") / "f16.gguf", gguf_models.QUANTIZABLE)


def tensor_data(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_llama_imatrix_output_reads_back(model: Path, tmp_path: Path) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text(evaluate.builtin_text("calibration.txt"))
    out = tmp_path / "llama-imatrix.gguf"
    done = subprocess.run(
        [tool("llama-imatrix"), "-m", model, "-f", text, "-o", out, "-c", "128", "--chunks", "2", "-t", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = imatrix.read_gguf(out)
    assert data.chunk_count == 2
    assert data.chunk_size == 128
    assert data.datasets == (str(text),)
    assert data["blk.0.ffn_down.weight"].size == 512
    assert data.counts["blk.0.ffn_down.weight"].tolist() == [256]
    assert float(data["blk.0.attn_q.weight"].min()) > 0.0
    # the in-process quantizer and llama-quantize agree when given llama-imatrix's numbers
    quantize.quantize(
        model, tmp_path / "ours.gguf", quantize_job.QuantizeJob(file_type=constants.FileType.IQ2_XS, nthread=2), data
    )
    cli = tmp_path / "cli.gguf"
    done = subprocess.run(
        [tool("llama-quantize"), "--imatrix", out, model, cli, "IQ2_XS", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert tensor_data(tmp_path / "ours.gguf") == tensor_data(cli)


def test_llama_quantize_reads_our_file(model: Path, tmp_path: Path) -> None:
    values = gguf_models.synthetic_imatrix_values(model)
    data = imatrix.ImatrixData(
        means={name: v for name, (v, _) in values.items()},
        counts={name: np.full(n, 300, dtype=np.int64) for name, (_, n) in values.items()},
        chunk_count=3,
        chunk_size=100,
        datasets=("synthetic.txt",),
    )
    path = tmp_path / "ours.imatrix.gguf"
    imatrix.write_gguf(data, path)
    cli = tmp_path / "cli.gguf"
    done = subprocess.run(
        [tool("llama-quantize"), "--imatrix", path, model, cli, "Q4_K_M", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "loaded 29 importance matrix entries" in done.stdout + done.stderr
    # llama-quantize divides the stored sums by the counts in float32; reading the file back does the
    # same, so both sides quantize with bit-identical weights
    back = imatrix.read_gguf(path)
    quantize.quantize(
        model, tmp_path / "ours.gguf", quantize_job.QuantizeJob(file_type=constants.FileType.Q4_K_M, nthread=2), back
    )
    assert tensor_data(tmp_path / "ours.gguf") == tensor_data(cli)
