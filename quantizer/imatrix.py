"""The importance matrix: how strongly each input column of every weight matrix is driven.

llama.cpp's quantizers minimise a weighted error, ``sum_j w_j * (W_ij - Q(W)_ij)^2``, and the
importance matrix supplies the weights ``w_j``: the mean of ``x_j^2`` over every row ``x`` that
reached the matrix on calibration text.

The pipeline computes it with llama.cpp's own evaluator, ``llama-imatrix``, on the converted GGUF
(:func:`run_llama_imatrix`): the file is memory-mapped, so the host holds the weights as page
cache, not as the process's memory, whatever the model's size, and GPUs get the layers that fit.
The former torch path (:func:`compute_imatrix`: the whole Hugging Face model loaded, float32 on a
CPU) stays for the parity bench (bench/calibration_parity.py) and its tests; docs/quantizer.md
gives the measurements behind the choice.

Layout, as in llama.cpp: for a dense matrix the vector has one value per input column. For a
merged expert tensor (``blk.N.ffn_*_exps.weight``, shape ``[n_expert, rows, cols]``) the
per-expert vectors are concatenated, expert 0 first, and ``counts`` has one row count per expert;
an expert no calibration token was routed to gets all ones (what llama-quantize uses).

**A GGUF-only source** (an already quantized GGUF such as ``unsloth/DeepSeek-R1-GGUF``) has no
16-bit weights: the pipeline does not calibrate it (:data:`GGUF_ONLY_NOTE`, recorded in the log),
and :func:`compute_imatrix` refuses such a folder with :class:`ImatrixUnavailableError`. Statistics
from a dequantized model would describe its quantization error and would only feed a
requantization, which compounds errors.

The file format (``write_gguf``/``read_gguf``) is llama.cpp's: for each tensor ``<name>.in_sum2``
(F32, ``[cols, n_matrices]``, raw sums of squares) and ``<name>.counts`` (F32, ``[1, n_matrices]``)
plus ``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count`` and
``imatrix.chunk_size``; ``llama-quantize --imatrix`` reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
from kquant.quantizer import llama_tools, untrusted

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
CountArray = npt.NDArray[np.int64]

GGUF_ONLY_NOTE = (
    "the source is a GGUF file without 16-bit weights, so no importance matrix is computed and the "
    "calibrate step is skipped: statistics from a dequantized model would describe its quantization "
    "error, would only feed a requantization, and a model the size of DeepSeek-R1 would need over a "
    "terabyte of memory to dequantize"
)

# The metadata keys are gguf-py's (``gguf.Keys.IMatrix``); the tensor suffixes it does not name.
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"

# Hugging Face model_type -> gguf-py architecture name, where they differ beyond underscores.
# Mistral and Mixtral are converted as llama by llama.cpp's converter.
_ARCH_BY_MODEL_TYPE = {
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gemma3_text": "gemma3",
    "phimoe": "phimoe",
}
_EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<index>\d+)\.(?P<tail>[^.]+)$")


class ImatrixError(RuntimeError):
    """An importance matrix could not be computed, read or written."""


class ImatrixUnavailableError(ImatrixError):
    """The source has no 16-bit weights to calibrate on (see :data:`GGUF_ONLY_NOTE`)."""


@dataclasses.dataclass(frozen=True)
class ImatrixData(Mapping[str, FloatArray]):
    """GGUF tensor name -> mean of ``x^2`` per input column (experts concatenated), plus provenance.

    It is a read-only mapping of those vectors, which is what ``llama_model_quantize`` takes.
    """

    means: Mapping[str, FloatArray]
    counts: Mapping[str, CountArray]
    """Rows seen per matrix: one entry for a dense tensor, one per expert for an ``_exps`` tensor."""
    chunk_count: int
    chunk_size: int
    datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, vector in self.means.items():
            count = self.counts.get(name)
            if count is None or count.size == 0 or vector.size % count.size:
                raise ImatrixError(
                    f"imatrix entry {name}: {vector.size} values do not split into "
                    f"{0 if count is None else count.size} equal matrices"
                )

    def __getitem__(self, name: str) -> FloatArray:
        return self.means[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.means)

    def __len__(self) -> int:
        return len(self.means)

    def column_importance(self, name: str) -> FloatArray:
        """Per-column importance of one tensor, averaged over its experts (what recipes weigh)."""
        vector = self.means[name]
        averaged: FloatArray = vector.reshape(self.counts[name].size, -1).mean(axis=0, dtype=np.float32)
        return averaged


def from_sums(
    sums: Mapping[str, FloatArray],
    counts: Mapping[str, CountArray],
    *,
    chunk_count: int,
    chunk_size: int,
    datasets: tuple[str, ...] = (),
) -> ImatrixData:
    """Divide raw sums of squares by their row counts, llama.cpp's way (a matrix with no rows gets 1)."""
    values: dict[str, FloatArray] = {}
    for name, total in sums.items():
        count = np.asarray(counts[name], dtype=np.int64)
        per_matrix = np.asarray(total, dtype=np.float64).reshape(count.size, -1)
        safe = np.where(count > 0, count, 1).astype(np.float64)[:, None]
        means = np.where(count[:, None] > 0, per_matrix / safe, 1.0)
        values[name] = means.astype(np.float32).reshape(-1)
    return ImatrixData(
        means=values,
        counts={name: np.asarray(c, dtype=np.int64) for name, c in counts.items()},
        chunk_count=chunk_count,
        chunk_size=chunk_size,
        datasets=datasets,
    )


# ---------------------------------------------------------------------------------------------
# llama.cpp's imatrix GGUF format
# ---------------------------------------------------------------------------------------------


def write_gguf(data: ImatrixData, path: Path) -> None:
    """Write ``data`` in llama.cpp's imatrix GGUF format, under a temporary name renamed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch="imatrix")
    # GGUFWriter always records an architecture; llama.cpp's imatrix files carry none.
    for kv in writer.kv_data:
        kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(data.datasets))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, data.chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, data.chunk_size)
    for name in sorted(data.means):  # llama.cpp sorts too, so files compare byte for byte
        count = np.asarray(data.counts[name], dtype=np.int64)
        means = np.asarray(data.means[name], dtype=np.float64).reshape(count.size, -1)
        sums = (means * count[:, None]).astype(np.float32)  # a matrix without rows stores 0
        writer.add_tensor(name + SUFFIX_SUMS, sums)
        writer.add_tensor(name + SUFFIX_COUNTS, count.astype(np.float32).reshape(count.size, 1))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    partial.replace(path)


def read_gguf(path: Path) -> ImatrixData:
    """Read an imatrix GGUF written by :func:`write_gguf` or by llama.cpp's ``llama-imatrix``."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as err:
        raise ImatrixError(f"imatrix file {path} is not a readable GGUF file: {err}") from err
    fields = reader.fields
    kind = fields.get(gguf.Keys.General.TYPE)
    if kind is not None and kind.contents() != gguf.GGUFType.IMATRIX:
        raise ImatrixError(
            f"{path} has {gguf.Keys.General.TYPE} = {kind.contents()!r}, expected {gguf.GGUFType.IMATRIX!r}"
        )
    sums: dict[str, FloatArray] = {}
    counts: dict[str, CountArray] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(SUFFIX_SUMS):
            sums[tensor.name.removesuffix(SUFFIX_SUMS)] = np.asarray(tensor.data, dtype=np.float32).ravel()
        elif tensor.name.endswith(SUFFIX_COUNTS):
            raw = np.asarray(tensor.data, dtype=np.float64).ravel()
            counts[tensor.name.removesuffix(SUFFIX_COUNTS)] = np.rint(raw).astype(np.int64)
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise ImatrixError(f"imatrix file {path}: {unpaired[0]} has sums or counts but not both")
    if not sums:
        raise ImatrixError(f"imatrix file {path} holds no {SUFFIX_SUMS} tensors")
    keys = gguf.Keys.IMatrix

    def number(key: str) -> int:
        return int(fields[key].contents()) if key in fields else 0

    return from_sums(
        sums,
        counts,
        chunk_count=number(keys.CHUNK_COUNT),
        chunk_size=number(keys.CHUNK_SIZE),
        datasets=tuple(fields[keys.DATASETS].contents()) if keys.DATASETS in fields else (),
    )


# ---------------------------------------------------------------------------------------------
# computing it with llama.cpp's llama-imatrix (what the pipeline runs)
# ---------------------------------------------------------------------------------------------

_SHORT_TEXT = re.compile(r"tokenizes to only (\d+) tokens")
_CHUNKS = re.compile(r"computing over (\d+) chunks")
_CHUNK_DONE = re.compile(r"\[(\d+)\]-?[\d.]+(?:e[+-]?\d+)?,")
MIN_CONTEXT = 16


def run_llama_imatrix(
    model: Path,
    text_file: Path,
    out: Path,
    *,
    chunks: int,
    context_size: int,
    threads: int = 0,
    gpu_layers: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> ImatrixData:
    """``llama-imatrix`` on the converted GGUF ``model``: up to ``chunks`` windows of
    ``context_size`` tokens of ``text_file``, written to ``out`` and read back.

    Why this and not torch: the GGUF is memory-mapped, so host memory holds one model's weights
    as page cache (reclaimable) plus one context's activations, whatever the model's size, and
    GPUs get what llama.cpp fits (or ``gpu_layers`` from the operator's plan). Every architecture
    llama.cpp runs is covered with its own graph (DeepSeek's MLA and routed experts included), and
    ``*_exps`` tensors get one count per expert from the routing ids. See docs/quantizer.md.

    llama-imatrix needs at least two windows of text; a shorter text is scored in two windows of
    half its length (logged) rather than refused, as the torch path scored one short window.
    """
    if chunks < 1 or context_size < 2:
        raise ImatrixError(f"chunks is {chunks} and contextSize is {context_size}; need >= 1 and >= 2")
    try:
        tool = llama_tools.find("llama-imatrix")
    except llama_tools.ToolError as exc:
        raise ImatrixError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    ctx = context_size
    for _ in range(2):
        partial.unlink(missing_ok=True)
        on_line = _ChunkProgress(chunks, progress)
        cmd: list[str | Path] = [
            tool, "-m", model, "-f", text_file, "-o", partial,
            "-c", str(ctx), "--chunks", str(chunks),
            # one window per batch: llama-imatrix keeps logits for every token of a batch
            # (batch x vocabulary x 4 bytes; 2048 x 129,280 x 4 = 1 GiB for DeepSeek at the default)
            "-b", str(ctx), "-ub", str(ctx),
            *llama_tools.thread_args(threads), *llama_tools.gpu_args(gpu_layers),
        ]  # fmt: skip
        try:
            llama_tools.run(cmd, on_line=on_line, what=f"llama-imatrix on {model.name}")
            break
        except llama_tools.ToolError as exc:
            short = _SHORT_TEXT.search(str(exc))
            if short is None or ctx <= MIN_CONTEXT:
                partial.unlink(missing_ok=True)
                raise ImatrixError(str(exc)) from None
            ctx = max(MIN_CONTEXT, int(short[1]) // 2)
            log.info("the calibration text has %s tokens, under two windows: windows of %d tokens", short[1], ctx)
    if not partial.is_file():
        raise ImatrixError(f"llama-imatrix on {model.name} wrote no {partial.name}")
    data = read_gguf(partial)
    partial.replace(out)
    if progress is not None:
        progress(1.0)
    return data


class _ChunkProgress:
    """Turns llama-imatrix's ``computing over N chunks`` and ``[k]ppl,`` output into fractions."""

    def __init__(self, chunks: int, progress: Callable[[float], None] | None) -> None:
        self.total = chunks
        self.progress = progress

    def __call__(self, line: str) -> None:
        if (m := _CHUNKS.search(line)) is not None:
            self.total = max(1, int(m[1]))
        done = [int(d) for d in _CHUNK_DONE.findall(line)]
        if done and self.progress is not None:
            self.progress(min(1.0, max(done) / self.total))


# ---------------------------------------------------------------------------------------------
# computing it with torch (the former path: kept for the parity bench and tests, see
# bench/calibration_parity.py; it loads the whole model, so the pipeline no longer runs it)
# ---------------------------------------------------------------------------------------------


def compute_imatrix(
    hf_dir: Path,
    texts: Sequence[str],
    *,
    chunks: int,
    context_size: int,
    device: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> ImatrixData:
    """Run ``chunks`` windows of ``context_size`` tokens of ``texts`` through the model in ``hf_dir``.

    Every ``nn.Linear`` except ``lm_head`` gets a forward pre-hook that adds up ``x^2`` per input
    column and counts rows, as llama.cpp's ``tools/imatrix`` does for each matrix multiplication
    (it leaves the output matrix out by default, too). Names are mapped to GGUF names with gguf-py's
    tensor name map. The model runs on ``device``, by default the GPU when torch sees one.
    Raises :class:`ImatrixUnavailableError` for a folder without Hugging Face weights.
    """
    if not (hf_dir / "config.json").is_file():
        raise ImatrixUnavailableError(f"{hf_dir} has no config.json: {GGUF_ONLY_NOTE}")
    if chunks < 1 or context_size < 2:
        raise ImatrixError(f"chunks is {chunks} and contextSize is {context_size}; need >= 1 and >= 2")
    # torch and transformers take seconds to import and only this step needs them
    import torch
    import transformers

    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if target.startswith("cuda") else torch.float32
    # The folder comes from an untrusted repository: its auto_map code is never imported.
    untrusted.forbid_remote_code()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=False)
    model.to(target).eval()
    windows = _windows(tokenizer, texts, chunks, context_size)
    namer = _GgufNamer(model.config)
    collector = _Collector(namer)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            handles.append(module.register_forward_pre_hook(collector.hook(name)))
        elif _is_fused_experts(module):
            handles.append(module.register_forward_pre_hook(collector.experts_hook(name), with_kwargs=True))
    try:
        with torch.inference_mode():
            for done, window in enumerate(windows, start=1):
                model(torch.tensor([window], device=target))
                if progress is not None:
                    progress(done / len(windows))
    finally:
        for handle in handles:
            handle.remove()
    return collector.result(chunk_count=len(windows), chunk_size=context_size)


def _windows(tokenizer: Any, texts: Sequence[str], chunks: int, context_size: int) -> list[list[int]]:
    """Cut the joined texts into up to ``chunks`` windows exactly as ``llama-imatrix`` does, so
    the two paths see the same tokens: tokenise everything once (with BOS first when the
    vocabulary adds one), slice windows of ``context_size`` tokens, and overwrite the first token
    of each window with BOS. Text too short for one full window gives one short window.
    """
    ids: list[int] = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ImatrixError("the calibration text is empty")
    with_special: list[int] = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and bool(with_special) and with_special[0] == bos
    if add_bos:
        ids = [bos, *ids]
    n_windows = max(1, min(chunks, len(ids) // context_size))
    windows = [ids[i * context_size : (i + 1) * context_size] for i in range(n_windows)]
    return [[bos, *w[1:]] if add_bos else w for w in windows]


class _GgufNamer:
    """Hugging Face module name -> (GGUF tensor name, expert index or None, expert count)."""

    def __init__(self, config: Any) -> None:
        model_type = str(getattr(config, "model_type", ""))
        arch_name = _ARCH_BY_MODEL_TYPE.get(model_type, model_type.replace("_", ""))
        arches = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
        if arch_name not in arches:
            raise ImatrixError(f"model_type {model_type!r} has no llama.cpp architecture in gguf-py")
        n_blocks = int(getattr(config, "num_hidden_layers", 0)) + 8  # slack for extra (MTP) blocks
        self.map = gguf.get_tensor_name_map(arches[arch_name], n_blocks)
        self.n_expert = int(
            next(
                (
                    getattr(config, key)
                    for key in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(config, key, None)
                ),
                1,
            )
        )

    def name(self, module_name: str) -> tuple[str, int | None]:
        expert: int | None = None
        key = module_name
        match = _EXPERT.match(module_name)
        if match is not None:
            key, expert = f"{match['head']}.{match['tail']}", int(match["index"])
        mapped = self.map.get_name(key + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            raise ImatrixError(f"no GGUF name for layer {module_name} (looked up as {key})")
        return mapped, expert


_LAYER = re.compile(r"layers\.(\d+)\.")


def _is_fused_experts(module: Any) -> bool:
    """transformers 5 keeps a layer's experts as 3-D ``gate_up_proj``/``down_proj`` parameters
    (no ``nn.Linear`` per expert), run by one module called with the routing decisions."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return getattr(gate_up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(module, "act_fn")


class _Collector:
    """Sums of ``x^2`` and row counts per GGUF tensor, kept on the model's device until the end."""

    def __init__(self, namer: _GgufNamer) -> None:
        self.namer = namer
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, np.ndarray[Any, np.dtype[np.int64]]] = {}

    def hook(self, module_name: str) -> Callable[[Any, tuple[Any, ...]], None]:
        gguf_name, expert = self.namer.name(module_name)
        n_matrices = self.namer.n_expert if expert is not None else 1
        slot = expert or 0

        def record(module: Any, args: tuple[Any, ...]) -> None:
            if not args:
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if x.shape[0] > 0:
                self._add(gguf_name, n_matrices, slot, x)

        return record

    def _add(self, gguf_name: str, n_matrices: int, slot: int, x: Any) -> None:
        if gguf_name not in self.sums:
            self.sums[gguf_name] = x.new_zeros((n_matrices, x.shape[1]))
            self.counts[gguf_name] = np.zeros(n_matrices, dtype=np.int64)
        self.sums[gguf_name][slot] += (x * x).sum(dim=0)
        self.counts[gguf_name][slot] += x.shape[0]

    def experts_hook(self, module_name: str) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], None]:
        """Per-expert statistics for fused experts: the rows routed to each expert are its
        gate/up inputs; its down input, ``act(gate) * up``, is recomputed from the weights."""
        layer = _LAYER.search(module_name + ".")
        if layer is None:
            raise ImatrixError(f"cannot tell the layer of expert module {module_name}")
        block = f"blk.{layer.group(1)}"
        # The converter splits gate_up into ffn_gate_exps and ffn_up_exps (some versions keep a fused
        # ffn_gate_up_exps); llama.cpp ignores entries for tensors a file does not have.
        gate_up_names = [f"{block}.{stem}.weight" for stem in ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps")]
        down_name = f"{block}.ffn_down_exps.weight"

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            import torch

            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
            hidden, top_k = values[0], values[1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            n_expert = module.gate_up_proj.shape[0]
            top_k = top_k.reshape(hidden.shape[0], -1)
            for expert in range(n_expert):
                rows = (top_k == expert).any(dim=-1).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                x = hidden[rows]
                for name in gate_up_names:
                    self._add(name, n_expert, expert, x.float())
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
                self._add(down_name, n_expert, expert, (module.act_fn(gate) * up).float())

        return record

    def result(self, *, chunk_count: int, chunk_size: int) -> ImatrixData:
        sums = {name: total.double().cpu().numpy().reshape(-1) for name, total in self.sums.items()}
        return from_sums(sums, self.counts, chunk_count=chunk_count, chunk_size=chunk_size)
