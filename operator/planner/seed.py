"""The seed's offload formula, kept selectable (``planner: seed``) so the real planner can be compared.

``floor(VRAM / file size * (layers - 4))`` scales the layer count by how much of the file fits in
VRAM and keeps four layers in reserve. It ignores the KV cache, the compute buffer and the CUDA
context, and it treats ``-ngl`` as a count of blocks, while llama.cpp puts the output layer (often
the largest tensor) on the GPU first.
"""

from __future__ import annotations


def seed_gpu_layers(vram_bytes: int, file_bytes: int, n_layer: int) -> int:
    """The seed's ``-ngl``, clamped to what llama.cpp accepts (0 .. ``n_layer + 1``)."""
    if file_bytes <= 0:
        raise ValueError(f"file size is {file_bytes} bytes, but it must be positive")
    if vram_bytes < 0:
        raise ValueError(f"GPU memory is {vram_bytes} bytes, but it must not be negative")
    raw = vram_bytes * (n_layer - 4) // file_bytes
    return max(0, min(raw, n_layer + 1))
