"""The one table of llama.cpp quantization types.

Everything that needs to know about a quantization type (the API's list of valid types, the
recipes that mix types per tensor, the offload planner's byte counts) reads it from here, so a
new llama.cpp type is added in one place. Two kinds of names exist in llama.cpp and both live here:

* a *tensor type* (``ggml_type``) is how one tensor is stored: a block of ``block_size`` weights
  takes ``type_size`` bytes;
* a *file type* (``llama_ftype``) is what ``llama-quantize`` is asked for: a default tensor type
  plus llama.cpp's own per-tensor rules (``Q4_K_M`` keeps some tensors at ``Q6_K``, for example).

The codes are llama.cpp's on-disk and ABI numbers; a unit test checks them against gguf-py and
llama-cpp-python so drift is caught when either is upgraded.
"""

from __future__ import annotations

import dataclasses
import enum


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


TENSOR_TYPES: dict[TensorType, TensorTypeInfo] = {
    TensorType.F32: TensorTypeInfo(0, 1, 4),
    TensorType.F16: TensorTypeInfo(1, 1, 2),
    TensorType.Q4_0: TensorTypeInfo(2, 32, 18),
    TensorType.Q4_1: TensorTypeInfo(3, 32, 20),
    TensorType.Q5_0: TensorTypeInfo(6, 32, 22),
    TensorType.Q5_1: TensorTypeInfo(7, 32, 24),
    TensorType.Q8_0: TensorTypeInfo(8, 32, 34),
    TensorType.Q2_K: TensorTypeInfo(10, 256, 84),
    TensorType.Q3_K: TensorTypeInfo(11, 256, 110),
    TensorType.Q4_K: TensorTypeInfo(12, 256, 144),
    TensorType.Q5_K: TensorTypeInfo(13, 256, 176),
    TensorType.Q6_K: TensorTypeInfo(14, 256, 210),
    TensorType.IQ2_XXS: TensorTypeInfo(16, 256, 66, needs_imatrix=True),
    TensorType.IQ2_XS: TensorTypeInfo(17, 256, 74, needs_imatrix=True),
    TensorType.IQ3_XXS: TensorTypeInfo(18, 256, 98, needs_imatrix=True),
    TensorType.IQ1_S: TensorTypeInfo(19, 256, 50, needs_imatrix=True),
    TensorType.IQ4_NL: TensorTypeInfo(20, 32, 18),
    TensorType.IQ3_S: TensorTypeInfo(21, 256, 110),
    TensorType.IQ2_S: TensorTypeInfo(22, 256, 82, needs_imatrix=True),
    TensorType.IQ4_XS: TensorTypeInfo(23, 256, 136),
    TensorType.IQ1_M: TensorTypeInfo(29, 256, 56, needs_imatrix=True),
    TensorType.BF16: TensorTypeInfo(30, 1, 2),
    TensorType.TQ1_0: TensorTypeInfo(34, 256, 54),
    TensorType.TQ2_0: TensorTypeInfo(35, 256, 66),
    TensorType.MXFP4: TensorTypeInfo(39, 32, 17),
}

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


FILE_TYPES: dict[FileType, FileTypeInfo] = {
    FileType.F32: FileTypeInfo(0, TensorType.F32, 32.0),
    FileType.F16: FileTypeInfo(1, TensorType.F16, 16.0),
    FileType.Q4_0: FileTypeInfo(2, TensorType.Q4_0, 4.5),
    FileType.Q4_1: FileTypeInfo(3, TensorType.Q4_1, 5.0),
    FileType.Q8_0: FileTypeInfo(7, TensorType.Q8_0, 8.5),
    FileType.Q5_0: FileTypeInfo(8, TensorType.Q5_0, 5.5),
    FileType.Q5_1: FileTypeInfo(9, TensorType.Q5_1, 6.0),
    FileType.Q2_K: FileTypeInfo(10, TensorType.Q2_K, 3.0),
    FileType.Q3_K_S: FileTypeInfo(11, TensorType.Q3_K, 3.5),
    FileType.Q3_K_M: FileTypeInfo(12, TensorType.Q3_K, 3.9),
    FileType.Q3_K_L: FileTypeInfo(13, TensorType.Q3_K, 4.3),
    FileType.Q4_K_S: FileTypeInfo(14, TensorType.Q4_K, 4.6),
    FileType.Q4_K_M: FileTypeInfo(15, TensorType.Q4_K, 4.9),
    FileType.Q5_K_S: FileTypeInfo(16, TensorType.Q5_K, 5.5),
    FileType.Q5_K_M: FileTypeInfo(17, TensorType.Q5_K, 5.7),
    FileType.Q6_K: FileTypeInfo(18, TensorType.Q6_K, 6.6),
    FileType.IQ2_XXS: FileTypeInfo(19, TensorType.IQ2_XXS, 2.06),
    FileType.IQ2_XS: FileTypeInfo(20, TensorType.IQ2_XS, 2.31),
    FileType.Q2_K_S: FileTypeInfo(21, TensorType.Q2_K, 2.96),
    FileType.IQ3_XS: FileTypeInfo(22, TensorType.IQ3_S, 3.3),
    FileType.IQ3_XXS: FileTypeInfo(23, TensorType.IQ3_XXS, 3.06),
    FileType.IQ1_S: FileTypeInfo(24, TensorType.IQ1_S, 1.56),
    FileType.IQ4_NL: FileTypeInfo(25, TensorType.IQ4_NL, 4.5),
    FileType.IQ3_S: FileTypeInfo(26, TensorType.IQ3_S, 3.44),
    FileType.IQ3_M: FileTypeInfo(27, TensorType.IQ3_S, 3.66),
    FileType.IQ2_S: FileTypeInfo(28, TensorType.IQ2_S, 2.5),
    FileType.IQ2_M: FileTypeInfo(29, TensorType.IQ2_S, 2.7),
    FileType.IQ4_XS: FileTypeInfo(30, TensorType.IQ4_XS, 4.25),
    FileType.IQ1_M: FileTypeInfo(31, TensorType.IQ1_M, 1.75),
    FileType.BF16: FileTypeInfo(32, TensorType.BF16, 16.0),
    FileType.TQ1_0: FileTypeInfo(36, TensorType.TQ1_0, 1.69),
    FileType.TQ2_0: FileTypeInfo(37, TensorType.TQ2_0, 2.06),
    FileType.MXFP4_MOE: FileTypeInfo(38, TensorType.MXFP4, 4.25),
}


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
