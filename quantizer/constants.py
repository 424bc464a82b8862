"""The one table of llama.cpp quantization types that kquant offers.

Everything that needs to know about a quantization type (the API's list of valid types, the
recipes that mix types per tensor, the offload planner's byte counts) reads it from here, so a
new llama.cpp type is added in one place. Two kinds of names exist in llama.cpp and both live here:

* a *tensor type* (``ggml_type``) is how one tensor is stored: a block of ``block_size`` weights
  takes ``type_size`` bytes;
* a *file type* (``llama_ftype``) is what ``llama-quantize`` is asked for: a default tensor type
  plus llama.cpp's own per-tensor rules (``Q4_K_M`` keeps some tensors at ``Q6_K``, for example).

The codes and block layouts are gguf-py's (``gguf.GGMLQuantizationType``, ``gguf.LlamaFileType``,
``gguf.GGML_QUANT_SIZES``), the package that reads and writes every GGUF here, so they are not
restated. This module keeps what gguf-py does not know: which types kquant offers (the API's
enums), which need an importance matrix, llama.cpp's fallback for rows a block does not divide,
each file type's base tensor type and nominal bits per weight, and the KV cache types. A type
gguf-py does not have fails at import, not at quantize time; a unit test checks the codes against
llama-cpp-python's, the ABI they are handed to.
"""

from __future__ import annotations

import dataclasses
import enum

import gguf


class TensorType(enum.StrEnum):
    """A ggml tensor type, by its llama.cpp name."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    Q2_K = "Q2_K"
    Q3_K = "Q3_K"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"
    IQ1_S = "IQ1_S"
    IQ1_M = "IQ1_M"
    IQ2_XXS = "IQ2_XXS"
    IQ2_XS = "IQ2_XS"
    IQ2_S = "IQ2_S"
    IQ3_XXS = "IQ3_XXS"
    IQ3_S = "IQ3_S"
    IQ4_NL = "IQ4_NL"
    IQ4_XS = "IQ4_XS"
    TQ1_0 = "TQ1_0"
    TQ2_0 = "TQ2_0"
    MXFP4 = "MXFP4"


@dataclasses.dataclass(frozen=True)
class TensorTypeInfo:
    """How a tensor type is laid out on disk and in memory."""

    code: int
    """``ggml_type`` enum value, as stored in a GGUF tensor header."""
    block_size: int
    """Weights per block; a row's length must be a multiple of it."""
    type_size: int
    """Bytes per block."""
    needs_imatrix: bool = False
    """llama.cpp refuses to quantize to this type without an importance matrix."""

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of one row of ``n_elements`` weights (``ggml_row_size``)."""
        if n_elements % self.block_size:
            raise ValueError(
                f"a row of {n_elements} weights is not a multiple of the block size {self.block_size}"
            )
        return n_elements // self.block_size * self.type_size


_NEEDS_IMATRIX: frozenset[TensorType] = frozenset(
    {TensorType.IQ1_S, TensorType.IQ1_M, TensorType.IQ2_XXS, TensorType.IQ2_XS, TensorType.IQ2_S, TensorType.IQ3_XXS}
)
"""Types llama.cpp refuses to quantize to without an importance matrix (``llama-quant.cpp``)."""


def _tensor_type_info(tensor_type: TensorType) -> TensorTypeInfo:
    ggml_type = gguf.GGMLQuantizationType[tensor_type.value]
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return TensorTypeInfo(int(ggml_type), block_size, type_size, tensor_type in _NEEDS_IMATRIX)


TENSOR_TYPES: dict[TensorType, TensorTypeInfo] = {
    t: _tensor_type_info(t) for t in sorted(TensorType, key=lambda t: gguf.GGMLQuantizationType[t.value])
}
"""Every tensor type kquant offers, in ``ggml_type`` order."""

TENSOR_TYPE_BY_CODE: dict[int, TensorType] = {info.code: t for t, info in TENSOR_TYPES.items()}

TENSOR_TYPE_FALLBACK: dict[TensorType, TensorType] = {
    TensorType.IQ1_S: TensorType.IQ4_NL,
    TensorType.IQ1_M: TensorType.IQ4_NL,
    TensorType.IQ2_XXS: TensorType.IQ4_NL,
    TensorType.IQ2_XS: TensorType.IQ4_NL,
    TensorType.IQ2_S: TensorType.IQ4_NL,
    TensorType.IQ3_XXS: TensorType.IQ4_NL,
    TensorType.IQ3_S: TensorType.IQ4_NL,
    TensorType.IQ4_XS: TensorType.IQ4_NL,
    TensorType.Q2_K: TensorType.Q4_0,
    TensorType.Q3_K: TensorType.Q4_0,
    TensorType.TQ1_0: TensorType.Q4_0,
    TensorType.TQ2_0: TensorType.Q4_0,
    TensorType.Q4_K: TensorType.Q5_0,
    TensorType.Q5_K: TensorType.Q5_1,
    TensorType.Q6_K: TensorType.Q8_0,
}
"""What llama.cpp stores when a row's length is not a multiple of a 256-block type's block size
(``tensor_type_fallback`` in ``src/llama-quant.cpp``): a 32-block type of at least as many bits.
When even that does not divide the row, llama.cpp uses F16; :func:`fallback_type` does both steps."""


def fallback_type(wanted: TensorType, row_length: int) -> TensorType:
    """The type llama.cpp really stores for a row of ``row_length`` weights asked to be ``wanted``."""
    if row_length % TENSOR_TYPES[wanted].block_size == 0:
        return wanted
    demoted = TENSOR_TYPE_FALLBACK.get(wanted, wanted)
    if row_length % TENSOR_TYPES[demoted].block_size == 0:
        return demoted
    return TensorType.F16


class FileType(enum.StrEnum):
    """A ``llama-quantize`` target (``llama_ftype``), by the name the CLI accepts."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    Q2_K = "Q2_K"
    Q2_K_S = "Q2_K_S"
    Q3_K_S = "Q3_K_S"
    Q3_K_M = "Q3_K_M"
    Q3_K_L = "Q3_K_L"
    Q4_K_S = "Q4_K_S"
    Q4_K_M = "Q4_K_M"
    Q5_K_S = "Q5_K_S"
    Q5_K_M = "Q5_K_M"
    Q6_K = "Q6_K"
    IQ1_S = "IQ1_S"
    IQ1_M = "IQ1_M"
    IQ2_XXS = "IQ2_XXS"
    IQ2_XS = "IQ2_XS"
    IQ2_S = "IQ2_S"
    IQ2_M = "IQ2_M"
    IQ3_XXS = "IQ3_XXS"
    IQ3_XS = "IQ3_XS"
    IQ3_S = "IQ3_S"
    IQ3_M = "IQ3_M"
    IQ4_NL = "IQ4_NL"
    IQ4_XS = "IQ4_XS"
    TQ1_0 = "TQ1_0"
    TQ2_0 = "TQ2_0"
    MXFP4_MOE = "MXFP4_MOE"


@dataclasses.dataclass(frozen=True)
class FileTypeInfo:
    """What a ``llama-quantize`` target means."""

    code: int
    """``llama_ftype`` enum value (``general.file_type`` in GGUF metadata)."""
    base: TensorType
    """The tensor type most weights get; llama.cpp's rules raise some tensors above it."""
    nominal_bpw: float
    """Average bits per weight llama.cpp quotes for a typical 7-8B model, for estimates only."""


_FILE_TYPE_MIX: dict[FileType, tuple[TensorType, float]] = {
    FileType.F32: (TensorType.F32, 32.0),
    FileType.F16: (TensorType.F16, 16.0),
    FileType.Q4_0: (TensorType.Q4_0, 4.5),
    FileType.Q4_1: (TensorType.Q4_1, 5.0),
    FileType.Q8_0: (TensorType.Q8_0, 8.5),
    FileType.Q5_0: (TensorType.Q5_0, 5.5),
    FileType.Q5_1: (TensorType.Q5_1, 6.0),
    FileType.Q2_K: (TensorType.Q2_K, 3.0),
    FileType.Q3_K_S: (TensorType.Q3_K, 3.5),
    FileType.Q3_K_M: (TensorType.Q3_K, 3.9),
    FileType.Q3_K_L: (TensorType.Q3_K, 4.3),
    FileType.Q4_K_S: (TensorType.Q4_K, 4.6),
    FileType.Q4_K_M: (TensorType.Q4_K, 4.9),
    FileType.Q5_K_S: (TensorType.Q5_K, 5.5),
    FileType.Q5_K_M: (TensorType.Q5_K, 5.7),
    FileType.Q6_K: (TensorType.Q6_K, 6.6),
    FileType.IQ2_XXS: (TensorType.IQ2_XXS, 2.06),
    FileType.IQ2_XS: (TensorType.IQ2_XS, 2.31),
    FileType.Q2_K_S: (TensorType.Q2_K, 2.96),
    FileType.IQ3_XS: (TensorType.IQ3_S, 3.3),
    FileType.IQ3_XXS: (TensorType.IQ3_XXS, 3.06),
    FileType.IQ1_S: (TensorType.IQ1_S, 1.56),
    FileType.IQ4_NL: (TensorType.IQ4_NL, 4.5),
    FileType.IQ3_S: (TensorType.IQ3_S, 3.44),
    FileType.IQ3_M: (TensorType.IQ3_S, 3.66),
    FileType.IQ2_S: (TensorType.IQ2_S, 2.5),
    FileType.IQ2_M: (TensorType.IQ2_S, 2.7),
    FileType.IQ4_XS: (TensorType.IQ4_XS, 4.25),
    FileType.IQ1_M: (TensorType.IQ1_M, 1.75),
    FileType.BF16: (TensorType.BF16, 16.0),
    FileType.TQ1_0: (TensorType.TQ1_0, 1.69),
    FileType.TQ2_0: (TensorType.TQ2_0, 2.06),
    FileType.MXFP4_MOE: (TensorType.MXFP4, 4.25),
}
"""Each file type's base tensor type and llama.cpp's quoted bits per weight: what gguf-py lacks."""


def _llama_ftype(file_type: FileType) -> gguf.LlamaFileType:
    # gguf-py spells llama.h's names: LLAMA_FTYPE_ALL_F32, then LLAMA_FTYPE_MOSTLY_<name>.
    return gguf.LlamaFileType["ALL_F32" if file_type is FileType.F32 else f"MOSTLY_{file_type.value}"]


FILE_TYPES: dict[FileType, FileTypeInfo] = {
    f: FileTypeInfo(int(_llama_ftype(f)), base, bpw)
    for f, (base, bpw) in sorted(_FILE_TYPE_MIX.items(), key=lambda item: _llama_ftype(item[0]))
}
"""Every ``llama-quantize`` target kquant offers, in ``llama_ftype`` order."""


class CacheType(enum.StrEnum):
    """Types llama.cpp accepts for ``--cache-type-k`` / ``--cache-type-v``."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    IQ4_NL = "iq4_nl"

    @property
    def tensor_type(self) -> TensorType:
        return TensorType(self.value.upper())
