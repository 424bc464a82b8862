"""Reading llama.cpp's log: failure reasons and dry-run tensor lines (pure text parsing)."""

from __future__ import annotations

from pathlib import Path

from kquant.quantizer import constants, quantize, quantize_job

JOB = quantize_job.QuantizeJob(file_type=constants.FileType.IQ2_XXS)

NEEDS_IMATRIX_LOG = """
============================================================================
 ERROR: this quantization requires an importance matrix!
        - offending tensor: blk.0.attn_k.weight
        - target type: iq2_xxs
============================================================================

llama_model_quantize: failed to quantize: this quantization requires an imatrix!
"""


def test_missing_imatrix_names_the_type_and_the_tensor() -> None:
    message = quantize._failure_message(Path("m.gguf"), JOB, NEEDS_IMATRIX_LOG)
    assert message.startswith("type IQ2_XXS needs an importance matrix")
    assert "blk.0.attn_k.weight as IQ2_XXS" in message


def test_other_failures_carry_llama_cpp_reason() -> None:
    log = "llama_model_quantize: failed to quantize: requantizing from type q8_0 is disabled\n"
    message = quantize._failure_message(Path("m.gguf"), JOB, log)
    assert message == "llama.cpp could not quantize m.gguf to IQ2_XXS: requantizing from type q8_0 is disabled"


def test_silent_failure_still_says_so() -> None:
    assert "no reason in llama.cpp's log" in quantize._failure_message(Path("m.gguf"), JOB, "")


def test_dry_run_lines_parse_both_forms() -> None:
    log = (
        "[   1/  10]                    output.weight - [  256,   512,     1,     1], type =    f16, "
        "size =     0.25 MiB ->     0.10 MiB (q6_K)\n"
        "[   2/  10]               output_norm.weight - [  256,     1,     1,     1], type =    f32, "
        "size =    0.001 MiB\n"
    )
    found = {m["name"]: (m["new"] or m["old"]).upper() for m in quantize._TENSOR_LINE.finditer(log)}
    assert found == {"output.weight": "Q6_K", "output_norm.weight": "F32"}
