"""The quantizer's output contract: the report JSON the operator reads into ``status.variants``.

Field names on the wire are camelCase and match the CRD's status (``sizeBytes``, ``sha256``,
``bitsPerWeight``, ``klDivergence``, ``perplexity``, ``gatePassed``, ``path``) so the operator
copies them without renaming. The same JSON lands in ``<root>/<digest>/report.json`` per variant
and, for the whole build, in the result ConfigMap's ``data.report``.
"""

from __future__ import annotations

import enum
from typing import Any

import pydantic
import pydantic.alias_generators


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=pydantic.alias_generators.to_camel,
    )

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


class BuildStatus(enum.StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ExitCode(enum.IntEnum):
    """The quantizer's exit status, the contract with the build Job's ``podFailurePolicy``.

    The Job re-runs a failed pod up to ``backoffLimit`` times. That helps a build that met the
    network, a hub 5xx or the API server at a bad moment (``FAILED``), and only burns time and
    pods for one that a rerun meets again: a full claim, a spec or source the quantizer refuses,
    a repository that does not exist. Those end with ``PERMANENT``, and the Job fails at once
    (``build_manifests``). ``USAGE`` (bad command line or spec) is as permanent.
    """

    OK = 0
    FAILED = 1
    """Failed for a reason a rerun may not meet again: the Job retries."""
    USAGE = 2
    """Bad command line or build spec (argparse also exits 2): a rerun fails the same way."""
    PERMANENT = 3
    """Failed for a reason only the user can remove (the report says which): no retry."""


NO_RETRY_EXIT_CODES = (ExitCode.USAGE, ExitCode.PERMANENT)
"""Exit codes after which the build Job fails without running another pod."""


class FileEntry(_Model):
    """One published file; a split GGUF has one entry per shard."""

    name: str
    size_bytes: int
    sha256: str


class SmokeResult(_Model):
    """A short greedy generation through the model's own chat template."""

    prompt: str
    text: str
    prompt_tokens: int
    bos_count: int
    """BOS tokens at the start of the prompt: 0 or 1 is right, 2 means BOS was doubled."""
    passed: bool


class Metrics(_Model):
    """Quality on held-out text, measured against the reference (16-bit) model."""

    tokens: int
    """Token positions scored."""
    parameters: int | None = None
    """Weights in the model as llama.cpp counts them (``llama_model_n_params``)."""
    perplexity: float
    reference_perplexity: float | None = None
    kl_divergence: float | None = None
    """Mean KL(reference || variant) per token, in nats; None without a 16-bit reference."""
    top1_agreement: float | None = None
    """Share of positions where both models rank the same token first."""
    smoke: SmokeResult | None = None


class Gate(_Model):
    passed: bool
    reasons: list[str] = []
    """Every threshold that was missed, or could not be checked, in words."""


class VariantReport(_Model):
    name: str
    digest: str
    type: str
    recipe: str
    format: str = "gguf"
    """``gguf``, or ``bnb-nf4`` / ``bnb-fp4`` (a Hugging Face folder that llama-server cannot serve)."""
    path: str = ""
    """Path of the model file llama.cpp loads (the first shard of a split file); for a bnb variant
    the folder transformers loads."""
    files: list[FileEntry] = []
    size_bytes: int = 0
    sha256: str = ""
    """sha256 of ``path``."""
    bits_per_weight: float = 0.0
    tensor_types: dict[str, int] = {}
    """Tensor count per type, e.g. {"Q4_K": 90, "Q6_K": 30, "F32": 61}."""
    planned_bytes: int | None = None
    metrics: Metrics | None = None
    gate_passed: bool = False
    gate: Gate | None = None
    facts: dict[str, Any] | None = None
    """``gguf_facts.read_facts`` of the published file: what the offload planner needs."""
    kl_divergence: float | None = None
    perplexity: float | None = None


class StepTiming(_Model):
    step: str
    kind: str
    variant: str | None = None
    skipped: bool
    seconds: float


class SizingSummary(_Model):
    """What the build needs, estimated from the hub's listing before the download (``sizing``)."""

    claim_bytes: int
    memory_bytes: int
    cpus: int
    deadline_seconds: int
    base_bytes: int
    variant_bytes: dict[str, int] = {}
    gpus: int = 0
    """GPUs the estimate assumed for calibration and evaluation."""
    gpu_product: str | None = None
    """Their product (``nvidia.com/gpu.product``), when the operator planned them on a node pool."""

    @classmethod
    def from_sizing(cls, s: Any, gpu_product: str | None = None) -> SizingSummary:
        """From a ``sizing.Sizing`` (typed loosely: the report module stays free of imports)."""
        return cls(
            claim_bytes=s.claim_bytes, memory_bytes=s.memory_bytes, cpus=s.cpus,
            deadline_seconds=s.deadline_seconds, base_bytes=s.base_bytes, variant_bytes=dict(s.variant_bytes),
            gpus=s.gpus, gpu_product=gpu_product,
        )  # fmt: skip


class BuildReport(_Model):
    status: BuildStatus
    reason: str | None = None
    """Why the build failed, in words a user can act on."""
    failed_step: str | None = None
    quantizer_version: str
    source_revision: str | None = None
    source_format: str | None = None
    steps: list[StepTiming] = []
    variants: list[VariantReport] = []
    sizing: SizingSummary | None = None
    """Set when the fetch step sized the build from the hub's listing."""


class ListedFile(_Model):
    name: str
    size_bytes: int


class SourceListing(_Model):
    """What ``kquant-quantize size`` found in the source repository before any download: the files
    a build would fetch with their sizes, and the numbers of ``config.json`` that size a model
    (``sizing.trim_config``). The operator sizes every build Job of the model from it."""

    status: BuildStatus
    reason: str | None = None
    """Why the repository could not be listed, in words a user can act on."""
    quantizer_version: str
    revision: str | None = None
    files: list[ListedFile] = []
    config: dict[str, Any] | None = None
