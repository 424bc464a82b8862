"""QuantizedModel, version v1alpha1 of the kquant.dev API group.

These models are the one definition of the API. ``hack/gen_crds.py`` turns them into the CRD
(descriptions come from the docstrings and ``Field`` descriptions here, and the CEL rules the API
server runs are declared next to the fields they guard), and the operator parses every watched
object with ``QuantizedModel.model_validate(body)``. The pydantic validators repeat each CEL rule,
so a manifest that the API server refuses is also refused here, and code that builds specs in
Python (tests, the CLI) meets the same rules without a cluster.

Conventions, so that the CRD is friendly to ``kubectl explain`` and to GitOps tools:

* field names are camelCase as a user writes them (``alias_generator``), acronyms in capitals
  (``targetSizeGiB``, ``predictedGPUBytes``), and Python code may use the snake_case names;
* unknown fields are refused (``extra="forbid"``): a typo must not silently drop a setting;
* defaults live here and not in the CRD, so the stored object is what its author wrote (no
  server-side defaulting noise in Git diffs) and a later operator may improve a default;
  descriptions say what the default is.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, Self, TypeAlias

import pydantic
import pydantic.alias_generators
from kquant.quantizer import constants, regex_dialect, settings, units, validation

GROUP = "kquant.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "QuantizedModel"
PLURAL = "quantizedmodels"
SINGULAR = "quantizedmodel"
SHORT_NAMES = ("qm",)
CATEGORIES = ("kquant", "llm")

MAX_VARIANTS = 16
MAX_OVERRIDES = 64
MAX_PATTERN_LENGTH = 256
MAX_NAME_LENGTH = 40
"""Longest QuantizedModel name: derived names (``<name>-<variant>-<digest>`` Jobs, Services)
must stay within the 63 characters of a DNS label."""
MAX_VARIANT_NAME_LENGTH = 12
"""Longest variant name, for the same reason: 40 + 1 + 12 + 1 + 8 (digest) = 62."""

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
HF_REPO = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
REVISION = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$"
POSITIVE_SIZE = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([kMGTPE]|[KMGTPE]i)?$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

MANAGED_SERVER_FLAGS = (
    "-m", "--model", "--host", "--port", "-c", "--ctx-size", "-np", "--parallel",
    "-ngl", "--gpu-layers", "--n-gpu-layers", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
    "-fa", "--flash-attn", "--temp", "--temperature", "--top-p", "--top-k", "--min-p", "-s", "--seed",
)  # fmt: skip
"""llama-server flags that the operator derives from the spec; ``extraArgs`` may not repeat them,
because llama-server takes the last occurrence and the status would then lie."""

REFUSED_SERVER_FLAGS = (
    # Which weights load: another model, a remote one, adapters, vectors, projectors, drafts.
    "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file",
    "-hft", "--hf-token", "-dr", "--docker-repo", "--lora", "--lora-scaled", "--lora-init-without-apply",
    "--control-vector", "--control-vector-scaled", "--control-vector-layer-range",
    "-mm", "--mmproj", "-mmu", "--mmproj-url", "--mmproj-auto", "--override-kv",
    "-md", "--model-draft", "--spec-draft-model", "-hfd", "-hfrd", "--hf-repo-draft", "--spec-draft-hf",
    "--models-dir", "--models-preset", "--models-max", "--models-autoload", "--no-models-autoload",
    # Memory: batch sizes, KV cache size and sharing, fitting, load mode, host buffers.
    "-b", "--batch-size", "-ub", "--ubatch-size", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
    "--kv-unified-per-slot", "--swa-full", "-cram", "--cache-ram", "-ctxcp", "--ctx-checkpoints",
    "--swa-checkpoints", "-fit", "--fit", "-fitt", "--fit-target", "-fitc", "--fit-ctx",
    "-lm", "--load-mode", "--repack", "-nr", "--no-repack", "--no-host",
    "-ctkd", "--cache-type-k-draft", "--spec-draft-type-k", "-ctvd", "--cache-type-v-draft",
    "--spec-draft-type-v",
    # Placement: what goes to which device, or to another machine.
    "-ot", "--override-tensor", "-otd", "--override-tensor-draft", "--spec-draft-override-tensor",
    "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe", "-ncffn", "--n-cpu-ffn",
    "-cmoed", "--cpu-moe-draft", "--spec-draft-cpu-moe", "-ncmoed", "--n-cpu-moe-draft",
    "--spec-draft-n-cpu-moe", "--spec-draft-ncmoe",
    "-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev", "--device",
    "-devd", "--device-draft", "--spec-draft-device", "-ngld", "--gpu-layers-draft",
    "--n-gpu-layers-draft", "--spec-draft-ngl", "--rpc", "--numa",
    "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload", "--op-offload", "--no-op-offload",
    "--mmproj-offload", "--no-mmproj-offload",
)  # fmt: skip
"""llama-server flags (the spellings of llama.cpp's ``common/arg.cpp`` at the pinned version) that
change which weights load, how much memory the server takes or where the weights go: the planner
sized the pod for the spec, and a served model must be the variant that passed its gate, so
``extraArgs`` may not carry them. llama.cpp reads ``--a_b`` as ``--a-b`` (``server_flag``)."""


def server_flag(arg: str) -> str:
    """The flag an ``extraArgs`` item names, as llama.cpp looks it up: the part before ``=``, and
    in a ``--`` flag every ``_`` read as ``-``."""
    flag = arg.split("=", 1)[0]
    return flag.replace("_", "-") if flag.startswith("--") else flag


_CEL_SERVER_FLAG = (
    "(a.startsWith('--') ? (a.contains('=') ? a.substring(0, a.indexOf('=')) : a).replace('_', '-') "
    ": (a.contains('=') ? a.substring(0, a.indexOf('=')) : a))"
)
"""``server_flag`` in CEL, for the item ``a``."""

_UNQUANTIZED_CACHE = (constants.CacheType.F32, constants.CacheType.F16, constants.CacheType.BF16)


def _cel(
    rule: str, message: str, field_path: str | None = None, message_expression: str | None = None
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry; ``field_path`` makes the error name the field, and
    ``message_expression`` (CEL) tells apart the ways one rule can fail."""
    entry = {"rule": rule, "message": message}
    if message_expression:
        entry["messageExpression"] = message_expression
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def _cel_list(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _quoted(values: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


class SpecRuleError(ValueError):
    """A rule across fields failed; ``field`` is the path below the validated object."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------
# Enums. Names of llama.cpp types come from the one table in kquant.quantizer.constants.

TensorType: TypeAlias = constants.TensorType
FileType: TypeAlias = constants.FileType
CacheType: TypeAlias = constants.CacheType
ReferenceType: TypeAlias = settings.ReferenceType
VariantFormat: TypeAlias = settings.VariantFormat
ComputeDtype: TypeAlias = settings.ComputeDtype


class Recipe(enum.StrEnum):
    """How a variant picks the type of each tensor."""

    UNIFORM = "uniform"
    """llama.cpp's own rules for the file type (``llama-quantize`` with ``type``)."""
    DYNAMIC = "dynamic"
    """kquant's per-tensor mix: embeddings, output, attention, ``ffn_down`` and the first dense
    layers keep more bits, MoE experts take ``type``; fitted to ``targetSizeGiB`` if set."""
    PASSTHROUGH = "passthrough"
    """Serve the downloaded GGUF as it is (only with ``source.gguf``): evaluate, never requantize."""


class AccessMode(enum.StrEnum):
    """PersistentVolumeClaim access modes."""

    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_WRITE_MANY = "ReadWriteMany"
    READ_ONLY_MANY = "ReadOnlyMany"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"


class TolerationOperator(enum.StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(enum.StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class FlashAttention(enum.StrEnum):
    """llama-server ``--flash-attn``: ``auto`` lets llama.cpp enable it where the backend can."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Phase(enum.StrEnum):
    """Where a QuantizedModel is on its way from manifest to served model.

    The phase is a summary, computed afresh on every pass from what the watches show (the pass is
    level-triggered), so no transition table constrains it: a Ready model moves back to
    Quantizing when a variant is added, and any phase may go to Failed or start over. The
    conditions, each with its `lastTransitionTime`, carry the history of the moves.
    """

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    CONVERTING = "Converting"
    CALIBRATING = "Calibrating"
    QUANTIZING = "Quantizing"
    EVALUATING = "Evaluating"
    SERVING = "Serving"
    READY = "Ready"
    FAILED = "Failed"


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(enum.StrEnum):
    """Condition types kquant writes. ``Ready``, ``Reconciling`` and ``Stalled`` follow kstatus, so
    Flux and Argo CD judge health without a custom check; the others say which stage is done."""

    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    QUANTIZED = "Quantized"
    EVALUATED = "Evaluated"
    SERVING = "Serving"
    PLAN_VERIFIED = "PlanVerified"
    """llama-server allocated what the planner predicted and offloaded the planned layers."""


# --------------------------------------------------------------------------------------------
# Shared building blocks.


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        alias_generator=pydantic.alias_generators.to_camel,
        populate_by_name=True,
        use_enum_values=False,
        validate_default=False,
    )


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a resource quantity must be >= 0")
        return value
    if not re.fullmatch(units.QUANTITY, value) or value.startswith("-"):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 500m, 2 or 16Gi")
    return value


Quantity = Annotated[
    int | Annotated[str, pydantic.StringConstraints(max_length=64)],
    pydantic.AfterValidator(_check_quantity),
    pydantic.WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            # Bounds the string so the API server can bound the rule's cost.
            "maxLength": 64,
            **_cel_list(
                _cel(
                    "type(self) == int ? self >= 0 : (isQuantity(self) && !self.startsWith('-'))",
                    "must be a non-negative Kubernetes quantity such as 500m, 2 or 16Gi",
                )
            ),
        }
    ),
]
"""A resource quantity as Kubernetes writes it: an integer or a string like ``16Gi``."""


def _check_gpu_layers(value: int | str) -> int | str:
    if value == "auto" or (isinstance(value, int) and 0 <= value <= 1024):
        return value
    raise ValueError(f"{value!r} is neither 'auto' nor a number of layers from 0 to 1024")


GpuLayers = Annotated[
    int | str,
    pydantic.AfterValidator(_check_gpu_layers),
    pydantic.WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            **_cel_list(
                _cel(
                    "type(self) == int ? (self >= 0 && self <= 1024) : self == 'auto'",
                    "must be 'auto' or a number of layers from 0 to 1024",
                )
            ),
        }
    ),
]

_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^({DNS_SUBDOMAIN[1:-1]}/)?{_LABEL_NAME}$"
"""The API server's rule for a label key (a qualified name): an optional DNS-subdomain prefix of
at most 253 characters and ``/``, then a name of at most 63 letters, digits, ``-``, ``_`` and
``.`` that starts and ends with a letter or digit."""
LABEL_VALUE = rf"^({_LABEL_NAME})?$"
"""The API server's rule for a label value: empty, or a name as in ``LABEL_KEY``."""
MAX_LABEL_PREFIX = 253
_LABEL_KEY_OK = f"k.matches(r'{LABEL_KEY}') && (!k.contains('/') || k.indexOf('/') <= {MAX_LABEL_PREFIX})"
_LABEL_KEY_FIX = ("use an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', "
                  "starting and ending with a letter or digit (for example nvidia.com/gpu.product)")
_LABEL_VALUE_FIX = ("use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, "
                    "or leave it empty")
_LABEL_KEY_CEL = f"k.size() <= {MAX_LABEL_PREFIX + 1 + 63} && {_LABEL_KEY_OK}"
_LABEL_VALUE_CEL = f"self[k].matches(r'{LABEL_VALUE}')"
_LABEL_MAP_RULES = _cel_list(
    # The map's keys have no maxLength of their own (a structural schema cannot give one), so the
    # key rule bounds its cost by the size check before the regex: a key over 317 characters
    # (253 + 1 + 63) fails without being matched. The messages are CEL strings in double quotes:
    # the fixes quote characters with single quotes.
    _cel(
        f"self.all(k, {_LABEL_KEY_CEL})",
        f"every key must be a label key the API server accepts: {_LABEL_KEY_FIX}",
        message_expression=f"\"key '\" + self.filter(k, !({_LABEL_KEY_CEL}))[0] + "
        f"\"' is not a label key the API server accepts: {_LABEL_KEY_FIX}\"",
    ),
    _cel(
        f"self.all(k, {_LABEL_VALUE_CEL})",
        f"every value must be a label value the API server accepts: {_LABEL_VALUE_FIX}",
        message_expression=f"self.filter(k, !{_LABEL_VALUE_CEL}).map(k, \"the value '\" + self[k] + \"' of \" + k)[0]"
        f" + \" is not a label value the API server accepts: {_LABEL_VALUE_FIX}\"",
    ),
)


def _label_map(value: dict[str, str]) -> dict[str, str]:
    """The CEL rules of ``LabelMap`` for the operator, which reads objects the API server never checked."""
    for key, item in value.items():
        prefix_ok = "/" not in key or key.index("/") <= MAX_LABEL_PREFIX
        if not re.fullmatch(LABEL_KEY[1:-1], key) or not prefix_ok:
            raise ValueError(f"key {key!r} is not a label key the API server accepts: {_LABEL_KEY_FIX}")
        if not re.fullmatch(LABEL_VALUE[1:-1], item):
            raise ValueError(f"the value {item!r} of {key} is not a label value the API server accepts: "
                             f"{_LABEL_VALUE_FIX}")
    return value


LabelMap = Annotated[
    dict[str, Annotated[str, pydantic.StringConstraints(max_length=63)]],
    pydantic.Field(max_length=32, json_schema_extra=_LABEL_MAP_RULES),
    pydantic.AfterValidator(_label_map),
]



def _image_has_no_whitespace(value: str) -> str:
    if re.search(r"\s", value):
        raise ValueError(f"{value!r} is not an image reference: it holds whitespace; write the image as "
                         "registry/name:tag or registry/name@sha256:digest, without spaces")
    return value


ImageRef = Annotated[
    str,
    pydantic.StringConstraints(min_length=1, max_length=512),
    # The API server refuses an image with whitespace around it in the child pod (and the kubelet
    # one with whitespace inside, as InvalidImageName), so the spec refuses both at admission.
    pydantic.Field(json_schema_extra=_cel_list(_cel(
        "!self.matches(r'\\s')",
        "must not hold whitespace: write the image as registry/name:tag or registry/name@sha256:digest",
        message_expression="\"'\" + self + \"' is not an image reference: it holds whitespace; write the image "
        "as registry/name:tag or registry/name@sha256:digest, without spaces\"",
    ))),
    pydantic.AfterValidator(_image_has_no_whitespace),
]

class SecretKeyRef(_Model):
    """A key of a Secret in the QuantizedModel's namespace."""

    name: str = pydantic.Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret.")
    key: str = pydantic.Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=CONFIG_KEY,
        description="Key inside the Secret whose value is used. Defaults to `token`.",
    )


class ConfigMapKeyRef(_Model):
    """A key of a ConfigMap in the QuantizedModel's namespace."""

    name: str = pydantic.Field(
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the ConfigMap."
    )
    key: str = pydantic.Field(min_length=1, max_length=253, pattern=CONFIG_KEY, description="Key inside the ConfigMap.")


class Toleration(_Model):
    """A toleration, as in a Pod spec, so the pod may run on tainted (GPU) nodes."""

    # The API server's own rule for pods, here so that `kubectl apply` refuses it, not the pass.
    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                 "a toleration with operator Exists matches any value: remove value, or use operator Equal",
                 ".value"),
        )
    )

    key: str | None = pydantic.Field(
        default=None, max_length=317, description="Taint key; empty with operator Exists matches all."
    )
    operator: TolerationOperator = pydantic.Field(
        default=TolerationOperator.EQUAL, description="Exists or Equal. Defaults to Equal."
    )
    value: str | None = pydantic.Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: TaintEffect | None = pydantic.Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = pydantic.Field(
        default=None, ge=0, le=86400 * 365, description="How long a NoExecute taint is tolerated."
    )

    @pydantic.model_validator(mode="after")
    def _exists_takes_no_value(self) -> Self:
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise SpecRuleError(
                "value", "a toleration with operator Exists matches any value: remove value, or use operator Equal"
            )
        return self


class ResourceRequirements(_Model):
    """Compute resources of a container, as in a Pod spec."""

    requests: dict[str, Quantity] | None = pydantic.Field(
        default=None, max_length=16, description="Minimum resources the scheduler reserves."
    )
    limits: dict[str, Quantity] | None = pydantic.Field(
        default=None, max_length=16, description="Maximum resources the container may use."
    )


# --------------------------------------------------------------------------------------------
# spec.source


class _HubSource(_Model):
    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                "!has(self.token)",
                "never write a token into the spec: store it in a Secret and set tokenSecretRef",
                ".token",
            ),
        )
    )

    repo: str = pydantic.Field(
        pattern=HF_REPO,
        max_length=193,
        description="Repository id on the hub, `owner/name`, for example `deepseek-ai/DeepSeek-R1`.",
    )
    revision: str = pydantic.Field(
        default="main",
        pattern=REVISION,
        max_length=255,
        description="Branch, tag or commit. Pin a commit: the build digest includes it, and a moving "
        "branch would rebuild every variant when it moves. Defaults to `main`.",
    )
    allow_patterns: list[Annotated[str, pydantic.StringConstraints(min_length=1, max_length=256)]] | None = (
        pydantic.Field(
            default=None,
            max_length=32,
            description="Glob patterns (huggingface_hub `allow_patterns`) of the files to fetch; all files when unset.",
        )
    )
    allow_code_files: bool = pydantic.Field(
        default=False,
        description="Also fetch files that are programs (`*.py`, `*.so`, `*.sh`, ...). Off by default: "
        "repository content is data, and kquant never runs a repository's code even when it is "
        "fetched (transformers' `auto_map` / `trust_remote_code` is refused).",
    )
    allow_pickles: bool = pydantic.Field(
        default=False,
        description="Also fetch Python pickles (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.pkl`, "
        "`*.ckpt`), which can run code when loaded. Off by default; a repository that ships its "
        "weights only as `pytorch_model.bin` needs it (they are loaded with torch's restricted "
        "`weights_only` unpickler).",
    )
    endpoint: str | None = pydantic.Field(
        default=None,
        max_length=2048,
        description="Base URL of the hub API, for a mirror that speaks the Hugging Face API (for ModelScope "
        "itself use `spec.source.modelscope`). "
        "Defaults to the quantizer's HF_ENDPOINT, normally https://huggingface.co. Part of the "
        "build digest: a mirror's copy of a repository never shares a build with the hub's.",
        json_schema_extra=_cel_list(
            _cel(
                "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHost() != ''",
                "must be an http(s) URL such as https://hf-mirror.example.com",
            )
        ),
    )
    token_secret_ref: SecretKeyRef | None = pydantic.Field(
        default=None,
        description="Secret holding a hub read token, for gated or private repositories. It is "
        "mounted only into the download step.",
    )
    token: str | None = pydantic.Field(
        default=None,
        exclude=True,
        max_length=4096,
        description="Refused. Present only so that a token written here is rejected instead of "
        "silently dropped; use tokenSecretRef.",
    )

    @pydantic.field_validator("token")
    @classmethod
    def _no_token(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("never write a token into the spec: store it in a Secret and set tokenSecretRef")

    @pydantic.field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/:?#\s]+", value):
            raise ValueError(f"{value!r} must be an http(s) URL such as https://hf-mirror.example.com")
        return value


class HuggingFaceSource(_HubSource):
    """A Hugging Face repository with weights in 16 or 32 bits (safetensors), which kquant
    converts to GGUF, calibrates and quantizes."""


class GGUFSource(_HubSource):
    """A hub repository with GGUF files that are already quantized (for example
    `unsloth/DeepSeek-R1-GGUF`). Steps that need 16-bit weights are skipped: variants either
    serve the file as it is (recipe `passthrough`) or requantize it (`allowRequantize`)."""

    file: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=512,
        pattern=r"^[^/].*\.gguf$",
        description="Path of the GGUF inside the repository; for a split model the first shard "
        "(`...-00001-of-00003.gguf`), whose siblings are fetched with it. Unset: the one model "
        "that allowPatterns selects.",
    )


class ModelScopeSource(_HubSource):
    """A ModelScope repository with weights in 16 or 32 bits (safetensors), fetched with the
    `modelscope` package's own client, for clusters that reach ModelScope but not the Hugging
    Face hub. Converted, calibrated and quantized like a `huggingface` source, under the same
    rules: allowed endpoints, no code files or pickles unless asked for, the token only in the
    download step."""

    repo: str = pydantic.Field(
        pattern=HF_REPO,
        max_length=193,
        description="Model id on ModelScope, `owner/name`, for example `deepseek-ai/DeepSeek-R1`.",
    )
    revision: str = pydantic.Field(
        default=settings.MODELSCOPE_REVISION,
        pattern=REVISION,
        max_length=255,
        description="Branch or tag. Pin a tag: the build digest includes it, and a moving branch "
        "would rebuild every variant when it moves. Defaults to `master`, ModelScope's default branch.",
    )
    endpoint: str | None = pydantic.Field(
        default=None,
        max_length=2048,
        description="Base URL of the ModelScope API, for a mirror or an in-house copy. Defaults to "
        "https://www.modelscope.cn. Part of the build digest.",
        json_schema_extra=_cel_list(
            _cel(
                "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHost() != ''",
                "must be an http(s) URL such as https://www.modelscope.cn",
            )
        ),
    )

    @pydantic.field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/:?#\s]+", value):
            raise ValueError(f"{value!r} must be an http(s) URL such as https://www.modelscope.cn")
        return value


SOURCE_KINDS = ("huggingface", "modelscope", "gguf")
"""The fields of spec.source, exactly one of which is set."""
_SOURCE_NONE = "spec.source sets none of huggingface, modelscope and gguf: set exactly one"
_SOURCE_KEEP = ": keep exactly one of huggingface, modelscope and gguf"
_SOURCE_COUNT = " + ".join(f"(has(self.{kind}) ? 1 : 0)" for kind in SOURCE_KINDS)
_SOURCE_SETS = [[k for i, k in enumerate(SOURCE_KINDS) if mask >> i & 1] for mask in (7, 3, 5, 6)]
"""The ways to set more than one kind, all three first (a message names the ones that are set)."""


def _sources_set_message(kinds: list[str]) -> str:
    """The message for zero or several source kinds; the CEL rule below builds the same text."""
    return f"spec.source sets {' and '.join(kinds)}{_SOURCE_KEEP}" if kinds else _SOURCE_NONE


class Source(_Model):
    """Where the weights come from. Exactly one of `huggingface`, `modelscope` or `gguf`."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                f"{_SOURCE_COUNT} == 1",
                "exactly one of spec.source.huggingface, spec.source.modelscope or spec.source.gguf must be set",
                # constant strings only: a built one (filter, join) is over the API server's cost budget
                message_expression="".join(
                    " && ".join(f"has(self.{k})" for k in kinds) + f" ? '{_sources_set_message(kinds)}' : "
                    for kinds in _SOURCE_SETS
                ) + f"'{_SOURCE_NONE}'",
            )
        )
    )

    huggingface: HuggingFaceSource | None = pydantic.Field(
        default=None, description="A repository with unquantized weights to convert and quantize."
    )
    modelscope: ModelScopeSource | None = pydantic.Field(
        default=None, description="A ModelScope repository with unquantized weights to convert and quantize."
    )
    gguf: GGUFSource | None = pydantic.Field(
        default=None, description="A repository with GGUF files that are already quantized."
    )

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> Self:
        kinds = [kind for kind in SOURCE_KINDS if getattr(self, kind) is not None]
        if len(kinds) != 1:
            raise ValueError(_sources_set_message(kinds))
        return self

    @property
    def hub(self) -> HuggingFaceSource | ModelScopeSource | GGUFSource:
        """The one source that is set."""
        source = self.huggingface or self.modelscope or self.gguf
        assert source is not None  # guaranteed by _exactly_one
        return source

    @property
    def kind(self) -> str:
        """The field that is set, as the user writes it (`huggingface`, `modelscope`, `gguf`)."""
        return next(kind for kind in SOURCE_KINDS if getattr(self, kind) is not None)


# --------------------------------------------------------------------------------------------
# spec.calibration, spec.variants, spec.evaluation


class Calibration(_Model):
    """How the importance matrix is computed: mean squared activations per weight column over a
    calibration text, which tells the quantizer which weights matter."""

    config_map_ref: ConfigMapKeyRef | None = pydantic.Field(
        default=None,
        description="ConfigMap key with the calibration text. Unset: the text the quantizer ships.",
    )
    chunks: int = pydantic.Field(
        default=128, ge=1, le=100_000, description="Number of text chunks to run. Defaults to 128."
    )
    context_size: int = pydantic.Field(default=512, ge=32, le=131_072, description="Tokens per chunk. Defaults to 512.")


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a regular expression that llama.cpp (C++ std::regex, ECMAScript),
    kquant's planner (Python ``re``) and the API server (RE2) all read alike, or None; see
    ``kquant.quantizer.regex_dialect``."""
    return regex_dialect.ecmascript_error(pattern)


_ESCAPED = r"(^|[^\\])(\\\\)*\\"
"""RE2 for an odd run of backslashes: the character after it is escaped (as a CEL raw string)."""
_PATTERN_DIALECT_RULES = (
    _cel(
        "!self.matches(r'" + _ESCAPED + "[AzZQEpPCGKkuU0-9]')",
        r"must not use \A, \z, \Q, \p{..}, \u or backreferences: llama.cpp reads tensor patterns with "
        "C++ std::regex (ECMAScript), which has none of them",
    ),
    _cel(
        "!self.matches(r'" + r"(^|[^\\])(\\\\)*\(\?($|[^:])" + "')",
        "must not use inline flags such as (?i), named groups (?P<n>...), look-arounds or atomic "
        "groups: llama.cpp reads tensor patterns with C++ std::regex (ECMAScript); only (?:...) is allowed",
    ),
)
"""What CEL can check of the ECMAScript dialect. CEL's ``matches()`` is RE2, so the rule above
it catches syntax errors and (RE2 having none) backreferences and look-arounds; these two refuse
what RE2 accepts and std::regex does not. The finer points (a lone ``{``, a class starting with
``]``, possessive quantifiers, which RE2 rejects anyway) are left to the operator's pydantic check."""


class TensorOverride(_Model):
    """A rule giving every tensor whose name matches `pattern` the type `type`."""

    pattern: str = pydantic.Field(
        min_length=1,
        max_length=MAX_PATTERN_LENGTH,
        description="Regular expression searched in GGUF tensor names (`blk.3.ffn_down_exps.weight`); "
        "the first matching rule wins. Must be valid in RE2 and in C++ std::regex (ECMAScript): "
        "no backreferences or look-arounds.",
        json_schema_extra=_cel_list(
            # A pattern that is not a literal is compiled when the rule runs: an invalid one makes
            # matches() fail, and a rule that fails refuses the object. (Not `... || true`: CEL's
            # `||` swallows an error when the other side is true.)
            _cel("type(''.matches(self)) == bool", "must be a valid regular expression"),
            *_PATTERN_DIALECT_RULES,
        ),
    )
    type: TensorType = pydantic.Field(description="llama.cpp tensor type for the matching tensors.")

    @pydantic.field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        error = pattern_error(value)
        if error:
            raise ValueError(
                f"{value!r} is not a valid regular expression for llama.cpp's std::regex (ECMAScript): {error}"
            )
        return value


_IS_BNB = "(has(self.format) && self.format != 'gguf')"
"""CEL: the variant ``self`` is a bitsandbytes one."""

_GGUF_ONLY_CEL = {
    "type": "has(self.type)",
    "recipe": "(has(self.recipe) && self.recipe != 'uniform')",
    "overrides": "has(self.overrides)",
    "targetSizeGiB": "has(self.targetSizeGiB)",
    "targetBitsPerWeight": "has(self.targetBitsPerWeight)",
    "outputTensorType": "has(self.outputTensorType)",
    "tokenEmbeddingType": "has(self.tokenEmbeddingType)",
    "pure": "(has(self.pure) && self.pure)",
    "leaveOutputTensor": "(has(self.leaveOutputTensor) && self.leaveOutputTensor)",
    "allowRequantize": "(has(self.allowRequantize) && self.allowRequantize)",
    "keepSplit": "(has(self.keepSplit) && self.keepSplit)",
}
"""llama.cpp-only fields of a variant and the CEL that finds each set (``settings.gguf_only_fields``)."""

_GGUF_ONLY = " || ".join(_GGUF_ONLY_CEL.values())
_BNB_GGUF_ONLY = (
    "writes a bitsandbytes safetensors folder, so it takes none of llama.cpp's settings (type, recipe other "
    "than uniform, overrides, targets, tensor types, pure, leaveOutputTensor, allowRequantize, keepSplit): remove "
)
_BNB_GGUF_ONLY_EXPRESSION = (
    "'format ' + self.format + ' " + _BNB_GGUF_ONLY.replace("'", "\\'") + "' + "
    + "".join(f"({cel} ? '{name}' : " for name, cel in _GGUF_ONLY_CEL.items())
    + "''" + ")" * len(_GGUF_ONLY_CEL)
)
"""The message naming the first llama.cpp-only field the bnb variant sets."""
_BNB_SETTINGS_NEED_BNB = "bnb settings apply only to format bnb-nf4 or bnb-fp4; remove bnb or set the format"


class BnbSettings(_Model):
    """bitsandbytes' 4-bit settings (transformers' ``BitsAndBytesConfig``) of a bnb variant."""

    double_quant: bool = pydantic.Field(
        default=True,
        description="Quantize the per-block scales as well (`bnb_4bit_use_double_quant`), about 0.4 bits "
        "per weight less. Defaults to true.",
    )
    compute_dtype: ComputeDtype = pydantic.Field(
        default=ComputeDtype.BFLOAT16,
        description="The dtype the 4-bit weights are dequantized to for each matmul "
        "(`bnb_4bit_compute_dtype`), also the dtype LoRA adapters train in. Defaults to bfloat16.",
    )


class Variant(_Model):
    """One quantized file built from the source and measured against it."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                f"has(self.type) || (has(self.recipe) && self.recipe == 'passthrough') || {_IS_BNB}",
                "type is required unless recipe is passthrough or format is bnb-nf4/bnb-fp4",
                ".type",
            ),
            _cel(f"!{_IS_BNB} || !({_GGUF_ONLY})", "format bnb-nf4/bnb-fp4 " + _BNB_GGUF_ONLY + "them",
                 ".format", _BNB_GGUF_ONLY_EXPRESSION),
            _cel(f"!has(self.bnb) || {_IS_BNB}", _BNB_SETTINGS_NEED_BNB, ".bnb"),
            _cel(
                "!(has(self.targetSizeGiB) && has(self.targetBitsPerWeight))",
                "set at most one of targetSizeGiB and targetBitsPerWeight",
                ".targetBitsPerWeight",
            ),
            _cel(
                "!((has(self.targetSizeGiB) || has(self.targetBitsPerWeight)) && "
                "!(has(self.recipe) && self.recipe == 'dynamic'))",
                "a size or bits-per-weight target needs recipe dynamic",
                ".recipe",
            ),
            _cel(
                "!(has(self.pure) && self.pure) || !((has(self.recipe) && self.recipe == 'dynamic') || "
                "has(self.overrides) || has(self.outputTensorType) || has(self.tokenEmbeddingType))",
                "pure gives every tensor the same type, so it excludes recipe dynamic, overrides, "
                "outputTensorType and tokenEmbeddingType",
                ".pure",
            ),
            _cel(
                "!(has(self.leaveOutputTensor) && self.leaveOutputTensor && has(self.outputTensorType))",
                "leaveOutputTensor keeps output.weight unquantized, so outputTensorType must be unset",
                ".outputTensorType",
            ),
            _cel(
                "!(has(self.recipe) && self.recipe == 'passthrough') || !(has(self.overrides) || "
                "has(self.outputTensorType) || has(self.tokenEmbeddingType) || has(self.targetSizeGiB) "
                "|| has(self.targetBitsPerWeight) || (has(self.pure) && self.pure) || "
                "(has(self.leaveOutputTensor) && self.leaveOutputTensor) || "
                "(has(self.allowRequantize) && self.allowRequantize) || "
                "(has(self.keepSplit) && self.keepSplit))",
                "recipe passthrough serves the source file as it is, so it takes no quantization settings",
                ".recipe",
            ),
        )
    )

    name: str = pydantic.Field(
        min_length=1,
        max_length=MAX_VARIANT_NAME_LENGTH,
        pattern=DNS_LABEL,
        description="Name of the variant, unique in the list; spec.serving.variant refers to it. "
        "A DNS label of at most 12 characters, as it becomes part of Job and file names.",
    )
    type: FileType | None = pydantic.Field(
        default=None,
        description="llama.cpp file type (`llama-quantize` target) such as Q4_K_M or IQ1_S. With recipe "
        "dynamic it is the type of the bulk of the weights (MoE experts). Optional only for recipe "
        "passthrough, where it states the type the file is expected to have; unset for a bnb format.",
    )
    format: VariantFormat = pydantic.Field(
        default=VariantFormat.GGUF,
        description="gguf: a llama.cpp file, servable. bnb-nf4 / bnb-fp4: the 16-bit safetensors model "
        "quantized by transformers and bitsandbytes to 4 bits (NF4 or FP4) and saved as a Hugging Face "
        "folder with its quantization_config, for QLoRA fine-tuning; measured by the same gate, never "
        "served by llama-server. Needs a huggingface source. Defaults to gguf.",
    )
    bnb: BnbSettings | None = pydantic.Field(
        default=None, description="bitsandbytes settings of a bnb format. Unset: their defaults."
    )
    recipe: Recipe = pydantic.Field(
        default=Recipe.UNIFORM,
        description="uniform: llama.cpp's rules for `type`; dynamic: kquant's per-tensor mix; "
        "passthrough: the GGUF source as it is. Defaults to uniform.",
    )
    overrides: list[TensorOverride] | None = pydantic.Field(
        default=None,
        max_length=MAX_OVERRIDES,
        description="Per-tensor rules, tried in order before the recipe's own; the first match wins.",
    )
    target_size_gib: float | None = pydantic.Field(
        default=None,
        alias="targetSizeGiB",
        gt=0,
        le=16384,
        description="File size the dynamic mix must fit, in GiB (2^30 bytes).",
    )
    target_bits_per_weight: float | None = pydantic.Field(
        default=None,
        gt=1,
        le=32,
        description="Average bits per weight the dynamic mix must not exceed.",
    )
    output_tensor_type: TensorType | None = pydantic.Field(
        default=None, description="Type of output.weight (`--output-tensor-type`)."
    )
    token_embedding_type: TensorType | None = pydantic.Field(
        default=None, description="Type of token_embd.weight (`--token-embedding-type`)."
    )
    pure: bool = pydantic.Field(
        default=False,
        description="Give every tensor exactly `type`, without llama.cpp's per-tensor rules (`--pure`).",
    )
    leave_output_tensor: bool = pydantic.Field(
        default=False, description="Leave output.weight unquantized (`--leave-output-tensor`)."
    )
    allow_requantize: bool = pydantic.Field(
        default=False,
        description="Allow quantizing tensors that are already quantized (`--allow-requantize`); "
        "required for a variant built from a GGUF source, as it loses quality.",
    )
    keep_split: bool = pydantic.Field(
        default=False,
        description="Write the variant as shards like its split source (`--keep-split`), instead of one file.",
    )

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.format.is_bnb:
            first = self._first_gguf_only_field()
            if first is not None:
                raise SpecRuleError("format", f"format {self.format} {_BNB_GGUF_ONLY}{first}")
            return self
        if self.bnb is not None:
            raise SpecRuleError("bnb", _BNB_SETTINGS_NEED_BNB)
        if self.type is None and self.recipe != Recipe.PASSTHROUGH:
            raise SpecRuleError("type", "type is required unless recipe is passthrough or format is bnb-nf4/bnb-fp4")
        if self.target_size_gib is not None and self.target_bits_per_weight is not None:
            raise SpecRuleError("targetBitsPerWeight", "set at most one of targetSizeGiB and targetBitsPerWeight")
        has_target = self.target_size_gib is not None or self.target_bits_per_weight is not None
        if has_target and self.recipe != Recipe.DYNAMIC:
            raise SpecRuleError("recipe", "a size or bits-per-weight target needs recipe dynamic")
        per_tensor = (
            self.recipe == Recipe.DYNAMIC
            or self.overrides is not None
            or self.output_tensor_type is not None
            or self.token_embedding_type is not None
        )
        if self.pure and per_tensor:
            raise SpecRuleError(
                "pure",
                "pure gives every tensor the same type, so it excludes recipe dynamic, overrides, "
                "outputTensorType and tokenEmbeddingType",
            )
        if self.leave_output_tensor and self.output_tensor_type is not None:
            raise SpecRuleError(
                "outputTensorType",
                "leaveOutputTensor keeps output.weight unquantized, so outputTensorType must be unset",
            )
        if self.recipe == Recipe.PASSTHROUGH and self._sets_quantization():
            raise SpecRuleError(
                "recipe",
                "recipe passthrough serves the source file as it is, so it takes no quantization settings",
            )
        return self

    def _first_gguf_only_field(self) -> str | None:
        """The first field of ``_GGUF_ONLY_CEL`` this variant sets, as the user writes it."""
        set_fields = {
            "type": self.type is not None, "recipe": self.recipe != Recipe.UNIFORM,
            "overrides": self.overrides is not None, "targetSizeGiB": self.target_size_gib is not None,
            "targetBitsPerWeight": self.target_bits_per_weight is not None,
            "outputTensorType": self.output_tensor_type is not None,
            "tokenEmbeddingType": self.token_embedding_type is not None, "pure": self.pure,
            "leaveOutputTensor": self.leave_output_tensor, "allowRequantize": self.allow_requantize,
            "keepSplit": self.keep_split,
        }  # fmt: skip
        return next((name for name in _GGUF_ONLY_CEL if set_fields[name]), None)

    def _sets_quantization(self) -> bool:
        """Any of llama.cpp's quantization settings besides type and recipe is set."""
        return (
            self.overrides is not None or self.output_tensor_type is not None or self.token_embedding_type is not None
            or self.target_size_gib is not None or self.target_bits_per_weight is not None or self.pure
            or self.leave_output_tensor or self.allow_requantize or self.keep_split
        )  # fmt: skip


class Evaluation(_Model):
    """The quality gate. Every variant is measured against the unquantized model on a held-out
    text; a variant passes when every threshold that is set holds. Unset thresholds only record
    the numbers. A GGUF source has no unquantized reference, so only maxPerplexity applies to
    its passthrough variant."""

    config_map_ref: ConfigMapKeyRef | None = pydantic.Field(
        default=None,
        description="ConfigMap key with the evaluation text. Unset: the held-out text the quantizer ships.",
    )
    chunks: int = pydantic.Field(default=16, ge=1, le=10_000, description="Chunks to score. Defaults to 16.")
    context_size: int = pydantic.Field(default=512, ge=32, le=131_072, description="Tokens per chunk. Defaults to 512.")
    max_kl_divergence: float | None = pydantic.Field(
        default=None,
        alias="maxKLDivergence",
        ge=0,
        le=100,
        description="Highest mean KL divergence (nats per token) from the unquantized model's "
        "next-token distribution. KL is less noisy than perplexity on short texts.",
    )
    max_perplexity_increase_percent: float | None = pydantic.Field(
        default=None,
        ge=0,
        le=10_000,
        description="Highest perplexity increase over the unquantized model, in percent.",
    )
    min_top1_agreement: float | None = pydantic.Field(
        default=None,
        ge=0,
        le=1,
        description="Lowest share of positions (0 to 1) where the variant's most likely next token "
        "is the unquantized model's.",
    )
    max_perplexity: float | None = pydantic.Field(
        default=None,
        gt=1,
        le=1e9,
        description="Highest absolute perplexity, for sources without a reference.",
    )
    reference: ReferenceType = pydantic.Field(
        default=ReferenceType.F16,
        description="What the variants are measured against: `F16`, the converted 16-bit model, or "
        "`Q8_0`, a Q8_0 copy of it made once per build. Q8_0 needs half the memory, disk and time "
        "of the 16-bit model, for models whose 16-bit weights do not fit the build node; its own "
        "KL from the 16-bit model (0.0044 nats per token on SmolLM2-135M) shifts every variant's "
        "KL (a Q4_K_M measured 10% higher against it), so maxKLDivergence gates should allow for "
        "that. Defaults to F16.",
    )


# --------------------------------------------------------------------------------------------
# spec.storage, spec.quantizer, spec.serving


_PVC_BOTH = "spec.storage.pvc sets both claimName and size: an existing claim has its own size"
_PVC_NONE = "spec.storage.pvc sets neither claimName nor size: name an existing claim or size a new one"


class PVCStorage(_Model):
    """The PersistentVolumeClaim that holds downloads and built variants. Either `claimName`
    (an existing claim) or `size` (kquant creates `<name>-storage`)."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                "has(self.claimName) != has(self.size)",
                "set either claimName (an existing claim) or size (a new claim), not both or neither",
                message_expression="has(self.size) ? '" + _PVC_BOTH + "' : '" + _PVC_NONE + "'",
            ),
            _cel(
                "!has(self.claimName) || !(has(self.storageClassName) || has(self.accessMode))",
                "storageClassName and accessMode apply only to a claim kquant creates (size)",
                ".claimName",
            ),
        )
    )

    claim_name: str | None = pydantic.Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="An existing PersistentVolumeClaim to use; kquant never deletes it.",
    )
    size: str | None = pydantic.Field(
        default=None,
        max_length=32,
        pattern=POSITIVE_SIZE,
        description="Size of the claim kquant creates, for example `200Gi`: room for the source, "
        "its 16-bit GGUF and every variant.",
        json_schema_extra=_cel_list(
            _cel(
                "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                "must be a positive quantity such as 200Gi",
            )
        ),
    )
    storage_class_name: str | None = pydantic.Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="StorageClass of the new claim; the cluster default when unset.",
    )
    access_mode: AccessMode | None = pydantic.Field(
        default=None,
        description="Access mode of the new claim. ReadWriteMany lets serving replicas on several "
        "nodes share it. Defaults to ReadWriteOnce.",
    )
    keep_on_delete: bool = pydantic.Field(
        default=True,
        description="Keep the claim kquant created when the QuantizedModel is deleted: it holds hours of "
        "downloads and builds. Set false to delete it with the QuantizedModel. Defaults to true.",
    )

    @pydantic.field_validator("size")
    @classmethod
    def _positive(cls, value: str | None) -> str | None:
        if value is not None and units.parse_quantity(value) <= 0:
            raise ValueError(f"{value!r} must be a positive quantity such as 200Gi")
        return value

    @pydantic.model_validator(mode="after")
    def _one_claim(self) -> Self:
        if self.claim_name is not None and self.size is not None:
            raise SpecRuleError("size", _PVC_BOTH)
        if self.claim_name is None and self.size is None:
            raise SpecRuleError("size", _PVC_NONE)
        if self.claim_name is not None and (self.storage_class_name or self.access_mode):
            raise SpecRuleError(
                "claimName", "storageClassName and accessMode apply only to a claim kquant creates (size)"
            )
        return self


class Storage(_Model):
    """Where downloads and variants live."""

    pvc: PVCStorage = pydantic.Field(description="The PersistentVolumeClaim to use or create.")
    keep_intermediates: bool = pydantic.Field(
        default=True,
        description=(
            "Keep the download, the 16-bit GGUF, the importance matrix and the reference logits on the claim "
            "(under `.work/`) after the builds, so that a new variant or recipe starts at quantization. false "
            "deletes them when the model's last build succeeds, which frees about twice the model's 16-bit "
            "size (the download and the 16-bit GGUF); a later build then downloads and converts again. Keep "
            "them when several models share one claim and one source."
        ),
    )
    shard_size: str | None = pydantic.Field(
        default=None,
        max_length=32,
        pattern=POSITIVE_SIZE,
        description="Largest GGUF file kquant writes, as a quantity (`50G`, `20Gi`). The 16-bit GGUF is "
        "converted into shards of at most this size, named as llama.cpp names them "
        "(`model-bf16-00001-of-00027.gguf`), and every variant keeps that split; servers load the first "
        "shard and llama.cpp finds the others. A model smaller than this stays one file. Defaults to 50G, "
        "the largest file the Hugging Face hub accepts, so a variant can be uploaded as it is. Changing it "
        "builds variants anew (the files differ), under new digests.",
        json_schema_extra=_cel_list(
            _cel(
                "isQuantity(self) && quantity(self).compareTo(quantity('1Mi')) >= 0",
                "must be a quantity of at least 1Mi such as 50G",
            )
        ),
    )

    @pydantic.field_validator("shard_size")
    @classmethod
    def _shard_at_least_a_mebibyte(cls, value: str | None) -> str | None:
        if value is not None and units.parse_quantity(value) < units.MiB:
            raise ValueError(f"{value!r} must be a quantity of at least 1Mi such as 50G")
        return value


class PodSettings(_Model):
    """Scheduling and resources shared by the quantizer Job and the serving Deployment."""

    image: ImageRef | None = pydantic.Field(
        default=None, description="Container image; see each section's default."
    )
    gpus: int = pydantic.Field(
        default=1, ge=0, le=16, description="NVIDIA GPUs (`nvidia.com/gpu`) per pod. Defaults to 1."
    )
    node_selector: LabelMap | None = pydantic.Field(
        default=None, description="Node labels the pod requires, for example a GPU product label."
    )
    tolerations: list[Toleration] | None = pydantic.Field(
        default=None, max_length=16, description="Tolerations for tainted (GPU) nodes."
    )
    resources: ResourceRequirements | None = pydantic.Field(
        default=None, description="CPU and memory; the GPU count comes from `gpus`."
    )


class Quantizer(PodSettings):
    """The quantizer Job that downloads, converts, calibrates, quantizes and evaluates."""

    image: ImageRef | None = pydantic.Field(
        default=None,
        description="Quantizer image. Defaults to the operator's KQUANT_QUANTIZER_IMAGE (Helm value quantizerImage).",
    )
    backoff_limit: int = pydantic.Field(
        default=2, ge=0, le=10, description="Retries of a failed build Job. Defaults to 2."
    )
    active_deadline_seconds: int | None = pydantic.Field(
        default=None, ge=60, le=7 * 86400, description="Time limit of one build Job, in seconds."
    )


class Sampling(_Model):
    """Default sampling parameters of the server; requests may override them."""

    temperature: float | None = pydantic.Field(default=None, ge=0, le=5, description="`--temp`.")
    top_p: float | None = pydantic.Field(default=None, ge=0, le=1, description="`--top-p`.")
    top_k: int | None = pydantic.Field(default=None, ge=0, le=100_000, description="`--top-k`; 0 disables it.")
    min_p: float | None = pydantic.Field(default=None, ge=0, le=1, description="`--min-p`.")
    seed: int | None = pydantic.Field(
        default=None, ge=-1, le=2**32 - 1, description="`--seed`; -1 picks a random seed."
    )


API_KEY_FLAGS = ("--api-key", "--api-key-file")
"""llama-server's API key flags: a key in extraArgs lands in Git and in the pod's argument list,
which anyone who may read the Deployment sees; apiKeySecretRef mounts it as a file instead."""
_API_KEY_IN_ARGS = ("never put an API key into extraArgs (--api-key, --api-key-file): store it in a Secret "
                    "and set spec.serving.apiKeySecretRef")

DEFAULT_SERVER_IMAGE = "ghcr.io/kquant-dev/llama-server:0.1.0-cuda"
"""llama-server (CUDA) from the llama.cpp that llama-cpp-python 0.3.36 vendors, the build the quantizer
links and the tests run (images/cuda.Dockerfile). Its tag is the chart's appVersion, as `make images`
tags it; tests/unit/test_image_tags.py keeps the two equal."""


class Serving(PodSettings):
    """How the promoted variant is served: llama-server behind a Service. Promotion is a change
    of `variant` (a one-line Git change); kquant refuses a variant that failed its gate."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                "!has(self.cacheTypeV) || self.cacheTypeV in "
                + _quoted(_UNQUANTIZED_CACHE)
                + " || !has(self.flashAttention) || self.flashAttention != 'off'",
                "a quantized V cache needs flash attention: set flashAttention to auto or on",
                ".cacheTypeV",
            ),
        )
    )

    variant: str = pydantic.Field(
        min_length=1,
        max_length=MAX_VARIANT_NAME_LENGTH,
        pattern=DNS_LABEL,
        description="Name of the variant to serve; must be one of spec.variants and must pass its gate.",
    )
    replicas: int = pydantic.Field(default=1, ge=0, le=64, description="Server replicas. Defaults to 1.")
    image: ImageRef | None = pydantic.Field(
        default=None,
        description="llama-server image. Defaults to the operator's KQUANT_SERVER_IMAGE (Helm value "
        f"serverImage), normally `{DEFAULT_SERVER_IMAGE}`.",
    )
    context_size: int = pydantic.Field(
        default=4096,
        ge=256,
        le=4_194_304,
        description="Context size in tokens, shared by all parallel slots (`-c`). Defaults to 4096.",
    )
    parallel: int = pydantic.Field(default=1, ge=1, le=256, description="Parallel slots (`-np`). Defaults to 1.")
    cache_type_k: CacheType = pydantic.Field(
        default=CacheType.F16, description="K cache type (`--cache-type-k`). Defaults to f16."
    )
    cache_type_v: CacheType = pydantic.Field(
        default=CacheType.F16,
        description="V cache type (`--cache-type-v`); a quantized one needs flash attention. Defaults to f16.",
    )
    flash_attention: FlashAttention = pydantic.Field(
        default=FlashAttention.AUTO, description="`--flash-attn`. Defaults to auto."
    )
    gpu_layers: GpuLayers = pydantic.Field(
        default="auto",
        description="Layers on the GPU (`-ngl`): `auto` lets kquant's planner pick from the GGUF, "
        "the node's GPU memory and the context; a number forces it. Defaults to auto.",
    )
    sampling: Sampling | None = pydantic.Field(default=None, description="Default sampling parameters.")
    api_key_secret_ref: SecretKeyRef | None = pydantic.Field(
        default=None,
        description="Secret holding the API key(s) that clients must send as `Authorization: Bearer "
        "<key>` (one per line; lines starting with # are comments). It is mounted read-only as a file "
        "into the server pod and passed as `--api-key-file`, so the key is in no argument list, "
        "environment variable or spec. Every path but /health then answers 401 without a key, "
        "/metrics included. Unset: the server accepts any request that reaches it.",
    )
    extra_args: list[Annotated[str, pydantic.StringConstraints(min_length=1, max_length=256)]] | None = pydantic.Field(
        default=None,
        max_length=32,
        description="More llama-server arguments. Flags kquant sets from this spec are refused.",
        json_schema_extra=_cel_list(
            _cel(
                "self.all(a, !(" + _CEL_SERVER_FLAG + " in "
                + _quoted(MANAGED_SERVER_FLAGS)
                + "))",
                "must not repeat a flag that kquant derives from spec.serving (model, host, port, "
                "context, parallel, gpu layers, cache types, flash attention, sampling)",
            ),
            _cel("self.all(a, !(" + _CEL_SERVER_FLAG + " in " + _quoted(API_KEY_FLAGS) + "))", _API_KEY_IN_ARGS),
            _cel(
                "self.all(a, !(" + _CEL_SERVER_FLAG + " in " + _quoted(REFUSED_SERVER_FLAGS) + "))",
                "must not carry a flag that changes which weights load, the server's memory or where "
                "the weights go (-m, -hf, --lora, -ub, -b, --fit, -ot, -ts, --n-cpu-moe, --rpc, ...): "
                "kquant sizes and places the server from spec.serving",
                message_expression="'extraArgs must not carry ' + self.filter(a, " + _CEL_SERVER_FLAG + " in "
                + _quoted(REFUSED_SERVER_FLAGS)
                + ")[0] + ': it changes which weights load, the memory of the server or where the weights go, "
                "and kquant sizes and places the server from spec.serving'",
            ),
        ),
    )

    @pydantic.field_validator("extra_args")
    @classmethod
    def _not_managed(cls, value: list[str] | None) -> list[str] | None:
        for arg in value or ():
            flag = server_flag(arg)
            if flag in MANAGED_SERVER_FLAGS:
                raise ValueError(f"{arg!r} repeats a flag that kquant derives from spec.serving")
            if flag in API_KEY_FLAGS:
                raise ValueError(_API_KEY_IN_ARGS)
            if flag in REFUSED_SERVER_FLAGS:
                raise ValueError(
                    f"{arg!r} changes which weights load, the server's memory or where the weights go; "
                    "kquant sizes and places the server from spec.serving (use its fields, or build "
                    "another variant)"
                )
        return value

    @pydantic.model_validator(mode="after")
    def _flash_for_quantized_v(self) -> Self:
        if self.cache_type_v not in _UNQUANTIZED_CACHE and self.flash_attention is FlashAttention.OFF:
            raise SpecRuleError(
                "cacheTypeV", "a quantized V cache needs flash attention: set flashAttention to auto or on"
            )
        return self


# --------------------------------------------------------------------------------------------
# spec


_SERVING_BNB = (
    "spec.serving.variant names a bnb-nf4/bnb-fp4 variant, but llama-server serves GGUF only: name a format "
    "gguf variant (a bnb variant is loaded with transformers for fine-tuning, see docs/fine-tuning.md)"
)
_BNB_NEEDS_SAFETENSORS = (
    "format bnb-nf4/bnb-fp4 quantizes 16-bit safetensors, so it needs spec.source.huggingface, not spec.source.gguf"
)


class QuantizedModelSpec(_Model):
    """What to download, which variants to build, how to judge them and which one to serve."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                "!has(self.serving) || self.variants.exists(v, v.name == self.serving.variant)",
                "spec.serving.variant must name one of spec.variants",
                ".serving.variant",
            ),
            _cel(
                "has(self.source.gguf) || self.variants.all(v, !has(v.recipe) || v.recipe != 'passthrough')",
                "recipe passthrough needs a gguf source; a huggingface or modelscope source is always quantized",
                ".variants",
            ),
            _cel(
                "!has(self.source.gguf) || self.variants.all(v, (has(v.recipe) && v.recipe == 'passthrough') "
                "|| (has(v.allowRequantize) && v.allowRequantize))",
                "with a gguf source a variant is either recipe passthrough or sets allowRequantize",
                ".variants",
            ),
            _cel(
                "!has(self.serving) || !self.variants.exists(v, v.name == self.serving.variant && "
                "has(v.format) && v.format != 'gguf')",
                _SERVING_BNB,
                ".serving.variant",
            ),
            _cel(
                "!has(self.source.gguf) || self.variants.all(v, !has(v.format) || v.format == 'gguf')",
                _BNB_NEEDS_SAFETENSORS,
                ".variants",
            ),
            _cel(
                "self.variants.filter(v, has(v.recipe) && v.recipe == 'passthrough').size() <= 1",
                "at most one variant may be recipe passthrough: two would be the same file",
                ".variants",
            ),
        )
    )

    source: Source = pydantic.Field(description="Where the weights come from.")
    calibration: Calibration | None = pydantic.Field(
        default=None, description="Importance-matrix calibration. Unset: the defaults below."
    )
    variants: list[Variant] = pydantic.Field(
        min_length=1,
        max_length=MAX_VARIANTS,
        description="Variants to build, each measured by the quality gate. Names are unique.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    evaluation: Evaluation | None = pydantic.Field(
        default=None, description="The quality gate. Unset: numbers are recorded, every variant passes."
    )
    storage: Storage = pydantic.Field(description="Where downloads and variants live.")
    quantizer: Quantizer | None = pydantic.Field(default=None, description="The build Job's pod settings.")
    serving: Serving | None = pydantic.Field(
        default=None, description="The served variant. Unset: variants are built and evaluated only."
    )

    @pydantic.model_validator(mode="after")
    def _cross_field(self) -> Self:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SpecRuleError("variants", f"variant names must be unique; repeated: {', '.join(duplicates)}")
        if self.serving is not None and self.serving.variant not in names:
            raise SpecRuleError(
                "serving.variant",
                f"{self.serving.variant!r} must name one of spec.variants ({', '.join(names)})",
            )
        if self.serving is not None and self.variant(self.serving.variant).format.is_bnb:
            raise SpecRuleError("serving.variant", _SERVING_BNB)
        if self.source.gguf is not None and any(v.format.is_bnb for v in self.variants):
            raise SpecRuleError("variants", _BNB_NEEDS_SAFETENSORS)
        passthrough = [v.name for v in self.variants if v.recipe == Recipe.PASSTHROUGH]
        if passthrough and self.source.gguf is None:
            raise SpecRuleError(
                "variants",
                "recipe passthrough needs a gguf source; a huggingface or modelscope source is always quantized",
            )
        if self.source.gguf is not None:
            bad = [v.name for v in self.variants if v.recipe != Recipe.PASSTHROUGH and not v.allow_requantize]
            if bad:
                raise SpecRuleError(
                    "variants",
                    "with a gguf source a variant is either recipe passthrough or sets allowRequantize "
                    f"({', '.join(bad)} does neither)",
                )
        if len(passthrough) > 1:
            raise SpecRuleError("variants", "at most one variant may be recipe passthrough: two would be the same file")
        return self

    def variant(self, name: str) -> Variant:
        """The variant called ``name``; KeyError if there is none."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# status


class Condition(_Model):
    """A kstatus-compatible condition (the shape of metav1.Condition)."""

    type: str = pydantic.Field(
        min_length=1, max_length=316, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$",
        description="Condition type, CamelCase; see ConditionType for those kquant writes.",
    )  # fmt: skip
    status: ConditionStatus = pydantic.Field(description="True, False or Unknown.")
    reason: str = pydantic.Field(
        min_length=1, max_length=1024, pattern=CONDITION_REASON,
        description="CamelCase reason for the last transition, for machines.",
    )  # fmt: skip
    message: str = pydantic.Field(default="", max_length=32768, description="Details for humans.")
    last_transition_time: datetime.datetime = pydantic.Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = pydantic.Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )

    @pydantic.field_validator("last_transition_time")
    @classmethod
    def _whole_seconds_utc(cls, value: datetime.datetime) -> datetime.datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC).replace(microsecond=0)


def set_condition(conditions: Sequence[Condition], new: Condition) -> list[Condition]:
    """Return ``conditions`` with ``new`` in place of the one of its type.

    lastTransitionTime keeps its old value when the status did not change, as metav1 conditions
    require; that is what lets kstatus and humans see how long a condition has held.
    """
    result: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        replaced = True
        if old.status == new.status:
            new = new.model_copy(update={"last_transition_time": old.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    return result


class VariantStatus(_Model):
    """What was built for one variant and how it measured."""

    name: str = pydantic.Field(max_length=MAX_VARIANT_NAME_LENGTH, description="The variant's name.")
    digest: str | None = pydantic.Field(
        default=None, max_length=128,
        description="Build digest: hash of source revision, recipe, calibration and quantizer version. "
        "A variant is rebuilt when it changes.",
    )  # fmt: skip
    type: str | None = pydantic.Field(
        default=None, max_length=32, description="llama.cpp file type built (the format for a bnb variant)."
    )
    format: VariantFormat | None = pydantic.Field(
        default=None, description="gguf, or bnb-nf4 / bnb-fp4: a Hugging Face folder that is never served."
    )
    size_bytes: int | None = pydantic.Field(default=None, ge=0, description="Total bytes of the GGUF file(s).")
    sha256: str | None = pydantic.Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the (first) GGUF file."
    )
    bits_per_weight: float | None = pydantic.Field(default=None, ge=0, description="Average bits per weight.")
    kl_divergence: float | None = pydantic.Field(
        default=None, alias="klDivergence", ge=0, description="Mean KL divergence from the unquantized model."
    )
    perplexity: float | None = pydantic.Field(default=None, ge=0, description="Perplexity on the evaluation text.")
    top1_agreement: float | None = pydantic.Field(
        default=None, ge=0, le=1, description="Share of positions with the unquantized model's top token."
    )
    gate_passed: bool | None = pydantic.Field(
        default=None, description="Whether the quality gate passed; unset until evaluated."
    )
    path: str | None = pydantic.Field(
        default=None, max_length=1024,
        description="Path of the GGUF (first shard) on the storage volume; of the folder for a bnb variant.",
    )  # fmt: skip
    message: str | None = pydantic.Field(
        default=None, max_length=4096, description="Why the build or the gate failed, if it did."
    )


class DevicePlanCheck(_Model):
    """One device of a served pod: the planner's bytes against what llama-server allocated."""

    device: str = pydantic.Field(max_length=64, description="`GPU0`, `GPU1` ... in the plan's order, or `Host`.")
    name: str | None = pydantic.Field(
        default=None, max_length=256,
        description="What llama.cpp called the device, such as `CUDA0 (NVIDIA H100 80GB HBM3)`; empty when it "
        "found no such device.",
    )  # fmt: skip
    predicted_bytes: int = pydantic.Field(ge=0, description="Weights, KV cache and compute buffer the plan predicts.")
    measured_bytes: int | None = pydantic.Field(
        default=None, ge=0, description="The same buffers as llama-server's startup log reports them."
    )
    error_ratio: float | None = pydantic.Field(
        default=None, description="(measured - predicted) / predicted: positive when llama.cpp allocated more."
    )
    judged: bool | None = pydantic.Field(
        default=None,
        description="Whether the device counts for PlanVerified (the host only when the model is served on CPU: "
        "with a GPU plan it holds the memory-mapped file, page cache rather than an allocation).",
    )  # fmt: skip


class PlanCheck(_Model):
    """The plan against one Ready server pod's startup log (read once per pod)."""

    pod: str | None = pydantic.Field(default=None, max_length=253, description="The server pod whose log was read.")
    pod_uid: str | None = pydantic.Field(default=None, max_length=64, description="Its uid: each pod is read once.")
    node: str | None = pydantic.Field(default=None, max_length=253, description="The node the pod runs on.")
    gpu_product: str | None = pydantic.Field(
        default=None, max_length=256, description="The node's `nvidia.com/gpu.product` label, if any."
    )
    planned_layers: int | None = pydantic.Field(default=None, ge=0, description="Layers the plan puts on GPUs.")
    offloaded_layers: int | None = pydantic.Field(
        default=None, ge=0, description="Layers llama.cpp put on GPUs (0 when it found no GPU)."
    )
    total_layers: int | None = pydantic.Field(default=None, ge=0, description="Layers, counting the output layer.")
    devices: list[DevicePlanCheck] | None = pydantic.Field(
        default=None, max_length=17, description="Per device; measured fields once the pod is Ready."
    )
    verified: bool | None = pydantic.Field(
        default=None, description="Every judged device within tolerance and every planned layer offloaded."
    )
    message: str | None = pydantic.Field(default=None, max_length=4096, description="The verdict with the numbers.")


class ServingStatus(_Model):
    """What is served and why it was planned that way."""

    variant: str | None = pydantic.Field(
        default=None, max_length=MAX_VARIANT_NAME_LENGTH, description="Served variant."
    )
    size: str | None = pydantic.Field(
        default=None, max_length=32, description="Size of the served GGUF for humans, such as `131.4GiB`."
    )
    gpu_layers: int | None = pydantic.Field(default=None, ge=0, description="`-ngl` passed to llama-server.")
    total_layers: int | None = pydantic.Field(
        default=None, ge=0, description="Layers in the model, counting the output layer."
    )
    predicted_gpu_bytes: int | None = pydantic.Field(
        default=None, alias="predictedGPUBytes", ge=0, description="GPU memory the planner predicts per GPU."
    )
    node_gpu_bytes: int | None = pydantic.Field(
        default=None, alias="nodeGPUBytes", ge=0, description="GPU memory per GPU on the planned node."
    )
    endpoint: str | None = pydantic.Field(
        default=None, max_length=1024, description="In-cluster URL of the OpenAI-compatible API."
    )
    explanation: str | None = pydantic.Field(
        default=None, max_length=8192, description="Why the planner chose this placement."
    )
    ready_replicas: int | None = pydantic.Field(default=None, ge=0, description="Ready server replicas.")
    plan_check: PlanCheck | None = pydantic.Field(
        default=None, description="The prediction per device and, once a server pod is Ready, what it allocated."
    )


class QuantizedModelStatus(_Model):
    """Observed state, written by the operator only (status subresource)."""

    observed_generation: int | None = pydantic.Field(
        default=None, ge=0, description="metadata.generation this status describes."
    )
    phase: Phase | None = pydantic.Field(default=None, description="Overall phase; see conditions for details.")
    progress: str | None = pydantic.Field(
        default=None, max_length=256, description="Short progress note, such as `q4km 2/5 quantizing 63%`."
    )
    conditions: list[Condition] | None = pydantic.Field(
        default=None,
        max_length=32,
        description="Standard conditions: Ready, Reconciling and Stalled (kstatus) and one per stage.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    variants: list[VariantStatus] | None = pydantic.Field(
        default=None,
        max_length=MAX_VARIANTS,
        description="One entry per built variant.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    serving: ServingStatus | None = pydantic.Field(default=None, description="The served variant and its plan.")
    kopf: dict[str, Any] | None = pydantic.Field(
        default=None,
        description="kopf's own bookkeeping (handler progress); not part of the API.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    def condition(self, type_: str) -> Condition | None:
        """The condition of type ``type_``, if present."""
        return next((c for c in self.conditions or () if c.type == type_), None)

    def to_patch(self) -> dict[str, Any]:
        """The status as JSON for a merge patch of the status subresource (camelCase, no nulls)."""
        body: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return body


# --------------------------------------------------------------------------------------------
# The object


_NAME_RULE = (
    "must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter) of at most "
    f"{MAX_NAME_LENGTH} characters, as it names the model's Service and Jobs"
)


class ObjectMeta(pydantic.BaseModel):
    """The part of metadata kquant reads; the rest is kept as it is."""

    model_config = pydantic.ConfigDict(extra="allow", alias_generator=pydantic.alias_generators.to_camel,
                                       populate_by_name=True)  # fmt: skip

    name: str = pydantic.Field(min_length=1, max_length=253)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class QuantizedModel(_Model):
    """A model to download, quantize into variants, measure, and serve.

    ``QuantizedModel.model_validate(body)`` accepts a raw object as the API server or kopf
    returns it (``apiVersion``, ``kind``, ``metadata``, ``spec``, ``status``).
    """

    model_config = pydantic.ConfigDict(
        json_schema_extra=_cel_list(
            _cel(
                f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{DNS_1035_LABEL}')",
                f"metadata.name {_NAME_RULE}",
            ),
        )
    )

    KIND: ClassVar[str] = KIND

    api_version: Literal["kquant.dev/v1alpha1"] = pydantic.Field(default="kquant.dev/v1alpha1", alias="apiVersion")
    kind: Literal["QuantizedModel"] = "QuantizedModel"
    metadata: ObjectMeta
    spec: QuantizedModelSpec
    status: QuantizedModelStatus | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _plain(cls, data: Any) -> Any:
        # kopf hands over Mapping views, not dicts; pydantic wants dicts at every level.
        return _to_plain(data) if isinstance(data, Mapping) else data

    @pydantic.field_validator("metadata")
    @classmethod
    def _name(cls, value: ObjectMeta) -> ObjectMeta:
        if len(value.name) > MAX_NAME_LENGTH or not re.fullmatch(DNS_1035_LABEL, value.name):
            raise SpecRuleError(
                "name",
                f"{value.name!r} {_NAME_RULE}",
            )
        return value

    @property
    def ref(self) -> str:
        """``namespace/name``, as error messages name the object."""
        return f"{self.metadata.namespace or 'default'}/{self.metadata.name}"

    def to_body(self) -> dict[str, Any]:
        """The object as JSON for the API server (camelCase, no nulls, no status)."""
        body: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
        return body


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Parsing a raw object, with errors that name the object and the fields as its author wrote them.


def describe_errors(error: pydantic.ValidationError, body: Mapping[str, Any] | None = None) -> list[str]:
    """Each validation error as ``QuantizedModel ns/name: field.path is <value>: rule``, the field
    named as the user writes it (camelCase, list indices), as ``kquant.quantizer.validation``
    writes every kquant model's errors. A rule across fields (``SpecRuleError``) fails on the
    object that holds them, so its line names the field below that object which the rule blames."""
    meta = (body or {}).get("metadata") or {}
    prefix = f"{KIND} {meta.get('namespace') or 'default'}/{meta.get('name') or '?'}: " if body else ""
    lines = []
    for item in error.errors(include_url=False):
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, SpecRuleError):
            lines.append(f"{prefix}{validation.field_path([*item['loc'], *cause.field.split('.')])}: {cause.message}")
        else:
            lines.append(f"{prefix}{validation.describe(item)}")
    return lines


def validate_body(body: Mapping[str, Any]) -> QuantizedModel:
    """Parse a raw object; on failure raise ValueError whose text names the object and fields."""
    try:
        return QuantizedModel.model_validate(body)
    except pydantic.ValidationError as error:
        raise ValueError("; ".join(describe_errors(error, body))) from error


__all__ = [
    "API_VERSION",
    "CATEGORIES",
    "CONDITION_REASON",
    "CONFIG_KEY",
    "DEFAULT_SERVER_IMAGE",
    "DNS_1035_LABEL",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "GROUP",
    "HF_REPO",
    "KIND",
    "MANAGED_SERVER_FLAGS",
    "MAX_NAME_LENGTH",
    "MAX_OVERRIDES",
    "MAX_PATTERN_LENGTH",
    "MAX_VARIANTS",
    "MAX_VARIANT_NAME_LENGTH",
    "PLURAL",
    "POSITIVE_SIZE",
    "REFUSED_SERVER_FLAGS",
    "REVISION",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "AccessMode",
    "CacheType",
    "Calibration",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "ConfigMapKeyRef",
    "Evaluation",
    "FileType",
    "FlashAttention",
    "GGUFSource",
    "GpuLayers",
    "HuggingFaceSource",
    "ImageRef",
    "LabelMap",
    "ModelScopeSource",
    "ObjectMeta",
    "PVCStorage",
    "Phase",
    "PodSettings",
    "Quantity",
    "QuantizedModel",
    "QuantizedModelSpec",
    "QuantizedModelStatus",
    "Quantizer",
    "Recipe",
    "ResourceRequirements",
    "Sampling",
    "SecretKeyRef",
    "Serving",
    "ServingStatus",
    "Source",
    "SpecRuleError",
    "Storage",
    "TaintEffect",
    "TensorOverride",
    "TensorType",
    "Toleration",
    "TolerationOperator",
    "Variant",
    "VariantStatus",
    "describe_errors",
    "pattern_error",
    "server_flag",
    "set_condition",
    "validate_body",
]  # fmt: skip
