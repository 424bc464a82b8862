"""What one ``llama_model_quantize`` call is asked to do, in kquant's own names.

The recipes build jobs and the planner shows them long before anything is quantized, in processes
(``kquant plan``, the operator) that never load llama.cpp; the quantize step turns a job into
llama.cpp's parameter struct. Keeping the record here, apart from :mod:`kquant.quantizer.quantize`,
lets the planning side import it without loading the C library.
"""

from __future__ import annotations

import dataclasses

from kquant.quantizer import constants


@dataclasses.dataclass(frozen=True)
class QuantizeJob:
    """Everything ``llama_model_quantize`` is asked to do, in kquant's own names.

    ``overrides`` are (regex, type) pairs that llama.cpp tries in order with ``std::regex_search``
    on each tensor name; the first match wins and takes precedence over llama.cpp's own rules, but
    not over ``output_tensor_type`` and ``token_embedding_type``.
    """

    file_type: constants.FileType
    overrides: tuple[tuple[str, constants.TensorType], ...] = ()
    output_tensor_type: constants.TensorType | None = None
    token_embedding_type: constants.TensorType | None = None
    leave_output_tensor: bool = False
    pure: bool = False
    allow_requantize: bool = False
    keep_split: bool = False
    nthread: int = 0
    """0 lets llama.cpp use every hardware thread."""
