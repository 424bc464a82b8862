"""Offload planning: which GPUs can serve a GGUF model, and with which llama.cpp arguments.

Pure code only (no kopf, no Kubernetes client): ``memory`` models llama.cpp's allocations,
``plan`` chooses ``-ngl``, ``-ts``, ``--n-cpu-moe`` and the context, ``seed`` keeps the old formula
for comparison, ``nodes`` reads GPU capacity from node labels and pod requests.
"""
