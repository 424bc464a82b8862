"""What one quantizer run is asked to do: the ``BuildSpec``.

The operator maps a ``QuantizedModel`` onto this model and hands it to the Job as a JSON/YAML file
(``--spec``) or in the ``KQUANT_SPEC`` environment variable. It is deliberately independent of
the CRD models: the quantizer runs (and is tested) without any Kubernetes API in sight, and the
CRD can grow serving fields without the quantizer image changing.

Field names are camelCase on the wire, like the CRD, so an error names the field the way the
user wrote it (``variants[1].targetSizeGiB``). Nothing here performs I/O except ``load_spec``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

import pydantic
import pydantic.alias_generators
import yaml
from kquant.quantizer import constants, regex_dialect, validation

DEFAULT_ENDPOINT = "https://huggingface.co"
"""The public hub: the origin a source has when it names no endpoint."""

MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"
"""ModelScope's public hub: the endpoint of a ``modelscope`` source that names none."""

MODELSCOPE_REVISION = "master"
"""ModelScope's default branch (Hugging Face's is ``main``)."""

MODELSCOPE_TOKEN_ENV = "MODELSCOPE_API_TOKEN"
"""Where the ModelScope client reads a token: the build Job maps ``tokenSecretRef`` there."""

QUANTIZER_VERSION = "0.1.0"
"""Part of every variant digest: a quantizer change that alters output must bump it."""

DEFAULT_SHARD_BYTES = 50 * 10**9
"""Largest GGUF shard kquant writes: the hub's 50 GB file limit, so a built variant can be uploaded
as it is, and small enough that hashing, copying and resuming work file by file."""

SPEC_ENV = "KQUANT_SPEC"
"""Environment variable that may carry the whole spec as JSON or YAML."""

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,38}[a-z0-9])?$")


class _Model(pydantic.BaseModel):
    """camelCase on the wire, snake_case in Python, unknown keys rejected, values frozen."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=pydantic.alias_generators.to_camel,
    )


class _RepoSource(_Model):
    """What a hub repository source has whatever hub serves it: its name and what may be fetched."""

    repo: str
    """``owner/name``."""
    allow_patterns: tuple[str, ...] | None = None
    """Glob patterns of the files to download (``*.safetensors``, ``*UD-IQ1_S*``); all files if unset."""
    allow_code_files: bool = False
    """Fetch ``*.py`` and other programs too (they are still never run)."""
    allow_pickles: bool = False
    """Fetch pickles (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``): loading one can run code."""

    @pydantic.field_validator("repo")
    @classmethod
    def _repo_shape(cls, value: str) -> str:
        if not _REPO_RE.match(value):
            raise ValueError(f"repo is {value!r}, but it must look like 'owner/name'")
        return value


class HuggingFaceSource(_RepoSource):
    """A repository on the Hugging Face hub (or a server that speaks its API)."""

    revision: str = "main"
    """A branch, tag or commit; a 40-hex commit makes the build reproducible."""
    endpoint: str | None = None
    """Hub base URL; defaults to ``HF_ENDPOINT`` or https://huggingface.co. The token comes only
    from the ``HF_TOKEN`` environment variable, never from the spec. Part of every digest and
    key (``origin``): the same repo@revision from a mirror is another source."""


class ModelScopeSource(_RepoSource):
    """A repository on ModelScope (or a server that speaks its ``/api/v1`` API), fetched with the
    ``modelscope`` package's own client: the same trust rules as ``HuggingFaceSource``."""

    revision: str = MODELSCOPE_REVISION
    """A branch or tag; ModelScope's file API takes it as written."""
    endpoint: str | None = None
    """ModelScope base URL; https://www.modelscope.cn if unset. The token comes only from the
    ``MODELSCOPE_API_TOKEN`` environment variable, never from the spec. Always part of the
    digest (``source_identity``)."""

    @property
    def url(self) -> str:
        """The endpoint the fetch calls, without a trailing slash."""
        return (self.endpoint or MODELSCOPE_ENDPOINT).rstrip("/")


class LocalSource(_Model):
    """Weights that are already on the storage volume: a Hugging Face folder or GGUF file(s)."""

    path: Path
    """A folder with ``config.json`` and safetensors, a ``.gguf`` file, or the first shard
    (``name-00001-of-0000N.gguf``) of a split GGUF."""


class Source(_Model):
    """Where the weights come from; exactly one of ``huggingface``, ``modelscope`` and ``local``."""

    huggingface: HuggingFaceSource | None = None
    modelscope: ModelScopeSource | None = None
    local: LocalSource | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if [self.huggingface, self.modelscope, self.local].count(None) != 2:
            raise ValueError("set exactly one of source.huggingface, source.modelscope and source.local")
        return self

    @property
    def repo(self) -> str | None:
        """The hub repository, or None for a local source."""
        hub = self.huggingface or self.modelscope
        return hub.repo if hub is not None else None


class DatasetKind(enum.StrEnum):
    BUILTIN = "builtin"
    """The text shipped in ``kquant.quantizer/data``."""
    FILE = "file"
    """A text file given by ``path`` (the operator mounts a ConfigMap there)."""


class Calibration(_Model):
    """The importance matrix: which text, and how much of it."""

    dataset: DatasetKind = DatasetKind.BUILTIN
    path: Path | None = None
    chunks: Annotated[int, pydantic.Field(ge=0, le=100_000)] = 128
    """Chunks of ``contextSize`` tokens; 0 computes no importance matrix."""
    context_size: Annotated[int, pydantic.Field(ge=16, le=131_072)] = 512
    gpu_layers: Annotated[int | None, pydantic.Field(ge=0)] = None
    """``llama-imatrix -ngl`` (the operator's plan for the build pod's GPUs); unset lets llama.cpp
    fit the free device memory, which is nothing on a host without GPUs."""

    @pydantic.model_validator(mode="after")
    def _path_for_file(self) -> Self:
        if self.dataset is DatasetKind.FILE and self.path is None:
            raise ValueError("dataset is 'file', so path must be set")
        return self


class ConvertType(enum.StrEnum):
    """``convert_hf_to_gguf.py --outtype``: the reference model's precision."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    AUTO = "auto"


class Recipe(enum.StrEnum):
    UNIFORM = "uniform"
    """llama.cpp's own per-tensor rules for the file type, plus the explicit overrides."""
    DYNAMIC = "dynamic"
    """Per-tensor types by role and sensitivity, fitted to a size budget."""


class VariantFormat(enum.StrEnum):
    """What a variant is written as: a GGUF file llama.cpp serves, or a bitsandbytes 4-bit
    safetensors folder that transformers loads (for QLoRA fine-tuning; never served here)."""

    GGUF = "gguf"
    BNB_NF4 = "bnb-nf4"
    BNB_FP4 = "bnb-fp4"

    @property
    def is_bnb(self) -> bool:
        return self is not VariantFormat.GGUF


class ComputeDtype(enum.StrEnum):
    """``bnb_4bit_compute_dtype``: the dtype the 4-bit weights are dequantized to for each matmul."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class BnbSettings(_Model):
    """bitsandbytes' 4-bit settings (``BitsAndBytesConfig``) of a ``bnb-*`` variant."""

    double_quant: bool = True
    """``bnb_4bit_use_double_quant``: quantize the per-block scales too (about 0.37 bits per weight saved)."""
    compute_dtype: ComputeDtype = ComputeDtype.BFLOAT16


class TensorOverride(_Model):
    """A regex over GGUF tensor names (searched, as llama.cpp does) and the type matching tensors
    get; first match wins."""

    pattern: str
    type: constants.TensorType

    @pydantic.field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        # llama.cpp runs the pattern with std::regex and the planner with Python's re: only what
        # both read alike is accepted (see regex_dialect).
        error = regex_dialect.ecmascript_error(value)
        if error:
            raise ValueError(
                f"pattern {value!r} is not a valid regular expression for llama.cpp's std::regex (ECMAScript): {error}"
            )
        return value


class VariantSpec(_Model):
    """One quantized file to build from the source: the quantizer's one model of a variant.

    The recipe planner (``recipes``, where it is also called ``VariantRecipe``), the quantize step's
    job (``recipes.base_job``) and ``kquant plan``'s estimates (``commands.shapes``, through
    ``operator.builds.variant_spec``) all take this model, so a field is declared and checked once."""

    name: str
    """DNS-label style (``q4km``): it names files and appears in status."""
    type: constants.FileType | None = None
    """The llama.cpp file type; required for a GGUF variant, absent for a bnb one."""
    format: VariantFormat = VariantFormat.GGUF
    bnb: BnbSettings | None = None
    """Only for a ``bnb-*`` format; unset there means the defaults."""
    recipe: Recipe = Recipe.UNIFORM
    overrides: tuple[TensorOverride, ...] = ()
    target_size_gib: Annotated[float | None, pydantic.Field(gt=0, alias="targetSizeGiB")] = None
    """File size the dynamic mix must fit, in GiB (2^30 bytes)."""
    target_bits_per_weight: Annotated[float | None, pydantic.Field(gt=0, le=32)] = None
    """Average bits per weight the dynamic mix must not exceed."""
    output_tensor_type: constants.TensorType | None = None
    token_embedding_type: constants.TensorType | None = None
    leave_output_tensor: bool = False
    pure: bool = False
    allow_requantize: bool = False
    keep_split: bool = False
    """Keep a split source's split (a converted 16-bit source is always kept)."""
    digest: str | None = None
    """Set by the operator when it has computed the digest itself; else ``variant_digest``."""
    spec_index: Annotated[int | None, pydantic.Field(ge=0)] = None
    """The variant's place in the QuantizedModel's ``spec.variants`` (the operator's build spec
    holds one variant): messages then name the field the user wrote. Not part of the digest."""

    @pydantic.field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"name is {value!r}, but it must be lowercase letters, digits and '-', at most 40")
        return value

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.format.is_bnb:
            return self._bnb_consistent()
        if self.type is None:
            raise ValueError(f"variant {self.name}: type is required for format gguf")
        if self.bnb is not None:
            raise ValueError(f"variant {self.name}: bnb settings need format bnb-nf4 or bnb-fp4, not gguf")
        if self.target_size_gib is not None and self.target_bits_per_weight is not None:
            raise ValueError(
                f"variant {self.name}: set targetSizeGiB ({self.target_size_gib}) or "
                f"targetBitsPerWeight ({self.target_bits_per_weight}), not both"
            )
        base = constants.FILE_TYPES[self.type].base
        sixteen = (constants.TensorType.F32, constants.TensorType.F16, constants.TensorType.BF16)
        if self.recipe is Recipe.DYNAMIC and base in sixteen:
            raise ValueError(
                f"variant {self.name}: recipe is dynamic but type is {self.type}; a dynamic mix needs a quantized "
                "base type (llama.cpp ignores per-tensor types for F32/F16/BF16 files)"
            )
        return self

    def _bnb_consistent(self) -> Self:
        """A bnb variant takes none of llama.cpp's settings: name the first one that is set."""
        gguf_only = gguf_only_fields(self)
        if gguf_only:
            raise ValueError(
                f"variant {self.name}: format {self.format} is a bitsandbytes safetensors folder, so it takes no "
                f"GGUF settings; remove {', '.join(gguf_only)}"
            )
        return self

    @property
    def gguf_type(self) -> constants.FileType:
        """``type`` of a GGUF variant (the validator makes it present there)."""
        if self.type is None:
            raise ValueError(f"variant {self.name}: format {self.format} has no llama.cpp type")
        return self.type

    @property
    def bnb_settings(self) -> BnbSettings:
        return self.bnb or BnbSettings()

    @property
    def target_size_bytes(self) -> int | None:
        return None if self.target_size_gib is None else int(self.target_size_gib * 2**30)


def gguf_only_fields(variant: VariantSpec) -> list[str]:
    """The llama.cpp-only fields ``variant`` sets, named as the user writes them."""
    checks = {
        "type": variant.type is not None,
        "recipe": variant.recipe is not Recipe.UNIFORM,
        "overrides": bool(variant.overrides),
        "targetSizeGiB": variant.target_size_gib is not None,
        "targetBitsPerWeight": variant.target_bits_per_weight is not None,
        "outputTensorType": variant.output_tensor_type is not None,
        "tokenEmbeddingType": variant.token_embedding_type is not None,
        "leaveOutputTensor": variant.leave_output_tensor,
        "pure": variant.pure,
        "allowRequantize": variant.allow_requantize,
        "keepSplit": variant.keep_split,
    }
    return [name for name, is_set in checks.items() if is_set]


class ReferenceType(enum.StrEnum):
    """What the variants are measured against (``spec.evaluation.reference``)."""

    F16 = "F16"
    """The 16-bit GGUF the pipeline converted (or the 16-bit GGUF source)."""
    Q8_0 = "Q8_0"
    """A Q8_0 quantization of it, made once per build."""


def _parse_fraction(value: Any) -> Any:
    """``"5%"`` -> 0.05; numbers are already fractions."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage like '5%'") from None
    return value


Fraction = Annotated[float, pydantic.BeforeValidator(_parse_fraction), pydantic.Field(ge=0)]


class Evaluation(_Model):
    """The quality gate: measured on held-out text against the 16-bit model."""

    dataset: DatasetKind = DatasetKind.BUILTIN
    path: Path | None = None
    context_size: Annotated[int, pydantic.Field(ge=16, le=131_072)] = 512
    chunks: Annotated[int, pydantic.Field(ge=1, le=10_000)] = 4
    """At most this many chunks of held-out text are scored."""
    max_kl_divergence: Annotated[float | None, pydantic.Field(ge=0, alias="maxKLDivergence")] = None
    max_perplexity_increase: Fraction | None = None
    """Relative to the reference, as a fraction (0.05) or a percentage string ("5%")."""
    min_top1_agreement: Annotated[float | None, pydantic.Field(ge=0, le=1)] = None
    smoke_prompt: str = "Name three colours of the rainbow."
    smoke_tokens: Annotated[int, pydantic.Field(ge=1, le=512)] = 24
    gpu_layers: Annotated[int | None, pydantic.Field(ge=-1)] = None
    """``n_gpu_layers`` for the reference and every variant: the operator's plan for the build
    pod's GPUs; -1 puts everything on the GPUs; unset fits what the free GPU memory holds (0
    layers on a host without GPUs). The weights are memory-mapped either way."""
    reference: ReferenceType = ReferenceType.F16
    """The model the variants are compared with: the converted 16-bit GGUF, or a Q8_0 copy of it
    (half the memory and time, for models whose 16-bit weights do not fit the build node; its KL
    to the 16-bit model was 0.0044 nats per token on SmolLM2-135M, and a Q4_K_M variant's KL measured
    against it came out 10% higher than against the 16-bit model; see docs/quantizer.md)."""

    @pydantic.model_validator(mode="after")
    def _path_for_file(self) -> Self:
        if self.dataset is DatasetKind.FILE and self.path is None:
            raise ValueError("dataset is 'file', so path must be set")
        return self


class ResultConfigMap(_Model):
    """The ConfigMap the CLI writes progress and the final report into."""

    name: str
    namespace: str


class BuildSpec(_Model):
    """Everything one quantizer run does."""

    source: Source
    calibration: Calibration = Calibration()
    convert_type: ConvertType = ConvertType.AUTO
    variants: tuple[VariantSpec, ...]
    evaluation: Evaluation = Evaluation()
    storage_root: Path
    """Published variants go to ``<storageRoot>/<digest>/``; intermediates to ``<storageRoot>/.work/``."""
    work_dir: Path | None = None
    """Intermediates (download, 16-bit GGUF, imatrix, reference logits); ``<storageRoot>/.work`` if unset."""
    result_config_map: ResultConfigMap | None = None
    threads: Annotated[int, pydantic.Field(ge=0)] = 0
    """CPU threads for quantization and evaluation; 0 lets llama.cpp choose."""
    max_shard_bytes: Annotated[int, pydantic.Field(ge=1 << 20)] = DEFAULT_SHARD_BYTES
    """Largest GGUF file written: the 16-bit GGUF is converted into shards of at most this many bytes
    (``<name>-0000N-of-0000M.gguf``) and every variant keeps that split. Part of the variant digest
    when it is not the default, as it changes the files on disk (see ``variant_digest``)."""
    storage_claim: str | None = None
    """The PersistentVolumeClaim behind ``storageRoot``, named in a full-disk reason; not in a digest."""
    remove_intermediates: bool = False
    """Delete the intermediates in the work folder once this build succeeded. The operator sets it on
    a model's last build when ``spec.storage.keepIntermediates`` is false. Not part of any digest."""

    @pydantic.field_validator("variants")
    @classmethod
    def _unique_names(cls, value: tuple[VariantSpec, ...]) -> tuple[VariantSpec, ...]:
        if not value:
            raise ValueError("list at least one variant")
        seen: set[str] = set()
        for v in value:
            if v.name in seen:
                raise ValueError(f"variant name {v.name!r} appears twice; names must be unique")
            seen.add(v.name)
        return value

    def variant(self, name: str) -> VariantSpec:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise KeyError(f"variants has no entry named {name!r} (known: {known})")


class SpecError(Exception):
    """The spec could not be read or is invalid; the message names the field and the rule."""


def parse_spec(data: Any) -> BuildSpec:
    """Validate already-parsed JSON/YAML; raise ``SpecError`` naming every bad field."""
    try:
        return BuildSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(f"invalid build spec: {'; '.join(validation.describe_all(exc, root='spec'))}") from None


def load_spec(path: Path | None, env: dict[str, str] | None = None) -> BuildSpec:
    """Read the spec from ``path`` (JSON or YAML), or from ``KQUANT_SPEC`` when no path is given."""
    environ = os.environ if env is None else env
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read spec file {path}: {exc.strerror}") from None
        origin = str(path)
    elif environ.get(SPEC_ENV):
        text, origin = environ[SPEC_ENV], SPEC_ENV
    else:
        raise SpecError(f"no spec: pass --spec FILE or set {SPEC_ENV}")
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin} is neither JSON nor YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{origin} must hold a mapping, got {type(data).__name__}")
    return with_environment_endpoint(parse_spec(data), environ)


def origin(endpoint: str | None) -> str | None:
    """The hub a source comes from, normalised (scheme and host lower case, no trailing slash),
    or None for the public hub, so that every key made before mirrors counted stays the same."""
    if not endpoint:
        return None
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", endpoint.strip())
    text = f"{m[1].lower()}://{m[2].lower()}{m[3]}" if m else endpoint.strip()
    text = text.rstrip("/")
    return None if text == DEFAULT_ENDPOINT else text


def source_identity(source: Source) -> dict[str, Any]:
    """What names a source in digests and work-folder keys: repo, revision, patterns, and its
    origin and opt-in switches only when they differ from the defaults (older keys stay valid)."""
    data: dict[str, Any] = source.model_dump(mode="json", by_alias=True)
    if data.get("modelscope") is None:
        data.pop("modelscope")  # keys made before ModelScope sources existed stay the same
    hub = data.get("huggingface")
    if source.huggingface is not None and hub is not None:
        hub.pop("endpoint", None)
        where = origin(source.huggingface.endpoint)
        if where is not None:
            hub["origin"] = where
    if source.modelscope is not None:
        # ModelScope keys never existed without an origin: it is always named, the default too, so
        # ``modelscope:owner/name@master`` from two hubs never shares a build.
        hub = data["modelscope"]
        hub.pop("endpoint", None)
        hub["origin"] = origin(source.modelscope.url) or source.modelscope.url
    if hub is not None:
        for switch in ("allowCodeFiles", "allowPickles"):
            if not hub.get(switch):
                hub.pop(switch, None)
    return data


def with_environment_endpoint(spec: BuildSpec, env: Mapping[str, str]) -> BuildSpec:
    """``spec`` with ``HF_ENDPOINT`` written into a hub source that names no endpoint, so the
    mirror the process would download from is also the one its digests and keys name."""
    hub = spec.source.huggingface
    mirror = env.get("HF_ENDPOINT")
    if hub is None or hub.endpoint or not mirror:
        return spec
    source = spec.source.model_copy(update={"huggingface": hub.model_copy(update={"endpoint": mirror})})
    return spec.model_copy(update={"source": source})


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def variant_digest(spec: BuildSpec, variant: VariantSpec) -> str:
    """hash(source and its origin, recipe, imatrix settings, quantizer version), 16 hex digits.

    The evaluation settings and storage root are left out: they do not change the file. An
    explicit ``variant.digest`` (from the operator) wins so both sides name the same folder.
    """
    if variant.digest:
        return variant.digest
    # A GGUF variant's recipe is dumped without the fields bnb variants brought (format, bnb), so
    # the digests of every GGUF variant built before them stay where they were.
    extra = {"format", "bnb"} if not variant.format.is_bnb else set()
    recipe = variant.model_dump(mode="json", by_alias=True, exclude={"digest", "spec_index", *extra})
    payload: dict[str, Any] = {
        "source": source_identity(spec.source),
        "convertType": spec.convert_type.value,
        # where the imatrix runs (GPU layers) does not change what it is
        "calibration": spec.calibration.model_dump(mode="json", by_alias=True, exclude={"gpu_layers"}),
        "recipe": recipe,
        "quantizer": QUANTIZER_VERSION,
    }
    if spec.max_shard_bytes != DEFAULT_SHARD_BYTES:
        # A different split is different files (names, count, split headers, sha256s) and a published
        # folder never changes, so it gets its own digest. Left out at the default so that the
        # digests of builds from before shards existed, and of every model below 50 GB (one file
        # either way), do not move.
        payload["maxShardBytes"] = spec.max_shard_bytes
    return hashlib.sha256(_canonical(payload)).hexdigest()[:16]
