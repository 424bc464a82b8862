"""The type table's codes come from gguf-py; llama.cpp's ABI, as llama-cpp-python states it, must agree.

gguf-py is a separate package from the llama.cpp that quantizes, and the two are upgraded apart;
a code that differs would make llama.cpp quantize to a different type than the plan shows.
"""

from __future__ import annotations

import llama_cpp
import pytest
from kquant.quantizer import constants


def test_tensor_type_codes_are_llama_cpps() -> None:
    # llama-cpp-python names most ggml types (not BF16, TQ1_0 or TQ2_0): those it names must agree.
    codes = {t: getattr(llama_cpp, f"GGML_TYPE_{t.value}", None) for t in constants.TensorType}
    named = {t: code for t, code in codes.items() if code is not None}
    assert len(named) >= len(constants.TensorType) - 3
    assert {t: constants.TENSOR_TYPES[t].code for t in named} == named


@pytest.mark.parametrize("file_type", list(constants.FileType))
def test_file_type_codes_are_llama_cpps(file_type: constants.FileType) -> None:
    name = "ALL_F32" if file_type is constants.FileType.F32 else f"MOSTLY_{file_type.value}"
    assert constants.FILE_TYPES[file_type].code == getattr(llama_cpp, f"LLAMA_FTYPE_{name}")


def test_every_type_is_in_the_tables_once() -> None:
    assert set(constants.TENSOR_TYPES) == set(constants.TensorType)
    assert set(constants.FILE_TYPES) == set(constants.FileType)
    assert len(constants.TENSOR_TYPE_BY_CODE) == len(constants.TensorType)
    assert {c.tensor_type for c in constants.CacheType} <= set(constants.TensorType)


def test_layouts() -> None:
    q4_k = constants.TENSOR_TYPES[constants.TensorType.Q4_K]
    assert (q4_k.block_size, q4_k.type_size, q4_k.bits_per_weight) == (256, 144, 4.5)
    assert constants.TENSOR_TYPES[constants.TensorType.IQ2_XXS].needs_imatrix
    assert not constants.TENSOR_TYPES[constants.TensorType.IQ4_NL].needs_imatrix
    assert constants.FILE_TYPES[constants.FileType.Q4_K_M].base is constants.TensorType.Q4_K
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        q4_k.row_bytes(100)
