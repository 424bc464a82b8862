"""What to build: map a QuantizedModel onto quantizer build specs, and name each build.

A build is one variant at one digest. The digest covers what decides the variant's bytes (source
revision, recipe, calibration settings, quantizer version) and nothing else, so editing serving
settings or evaluation thresholds never rebuilds, and a spec edited back to an earlier state
finds its artifact again. The quantizer computes the digest the same way (``settings.
variant_digest``); the operator computes it once and passes it on, so both sides name one folder.

Pure code: no Kubernetes client, no files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kquant.operator import manifests
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import settings, shards, sizing, units

STORAGE_MOUNT = "/var/lib/kquant"
"""Where the storage volume is mounted in quantizer and server pods."""
CALIBRATION_MOUNT = "/etc/kquant/calibration"
EVALUATION_MOUNT = "/etc/kquant/evaluation"
SPEC_KEY = "spec.json"
"""Key of the build spec in the build's ConfigMap; the quantizer reads it from ``KQUANT_SPEC``."""


@dataclasses.dataclass(frozen=True)
class Build:
    """One variant to build at one digest, and the names of everything that belongs to it."""

    model: str
    variant: str
    digest: str
    spec: settings.BuildSpec

    @property
    def name(self) -> str:
        """Job, ConfigMap, ServiceAccount and Role share it: ``<model>-<variant>-<digest[:8]>``."""
        return f"{self.model}-{self.variant}-{self.digest[:8]}"


def _source(spec: api.QuantizedModelSpec) -> settings.Source:
    modelscope = spec.source.modelscope
    if modelscope is not None:
        return settings.Source(modelscope=settings.ModelScopeSource(
            repo=modelscope.repo, revision=modelscope.revision, endpoint=modelscope.endpoint,
            allow_patterns=tuple(modelscope.allow_patterns) if modelscope.allow_patterns else None,
            allow_code_files=modelscope.allow_code_files, allow_pickles=modelscope.allow_pickles,
        ))
    hub = spec.source.hub
    patterns = hub.allow_patterns
    if spec.source.gguf is not None and spec.source.gguf.file:
        shard = spec.source.gguf.file
        # A split model's siblings share the name up to the shard number.
        stem = shards.stem_of(shard)
        patterns = [*(patterns or []), f"{stem}*.gguf"]
    return settings.Source(huggingface=settings.HuggingFaceSource(
        repo=hub.repo, revision=hub.revision, endpoint=hub.endpoint,
        allow_patterns=tuple(patterns) if patterns else None,
        allow_code_files=hub.allow_code_files, allow_pickles=hub.allow_pickles,
    ))


def _calibration(spec: api.QuantizedModelSpec) -> settings.Calibration:
    calibration = spec.calibration or api.Calibration()
    if calibration.config_map_ref is not None:
        return settings.Calibration(
            dataset=settings.DatasetKind.FILE, chunks=calibration.chunks,
            context_size=calibration.context_size,
            path=f"{CALIBRATION_MOUNT}/{calibration.config_map_ref.key}",
        )
    return settings.Calibration(chunks=calibration.chunks, context_size=calibration.context_size)


def _evaluation(spec: api.QuantizedModelSpec) -> settings.Evaluation:
    evaluation = spec.evaluation or api.Evaluation()
    increase = evaluation.max_perplexity_increase_percent
    extra: dict[str, object] = {}
    if evaluation.config_map_ref is not None:
        extra = {"dataset": settings.DatasetKind.FILE,
                 "path": f"{EVALUATION_MOUNT}/{evaluation.config_map_ref.key}"}
    return settings.Evaluation(
        chunks=evaluation.chunks, context_size=evaluation.context_size,
        max_kl_divergence=evaluation.max_kl_divergence,
        max_perplexity_increase=None if increase is None else increase / 100,
        min_top1_agreement=evaluation.min_top1_agreement,
        reference=evaluation.reference,
        **extra,
    )


def variant_spec(variant: api.Variant) -> settings.VariantSpec:
    """The quantizer's model of an API variant (passthrough is quantized nowhere: uniform here)."""
    return settings.VariantSpec(
        name=variant.name,
        type=variant.type,
        format=variant.format,
        bnb=None if variant.bnb is None else settings.BnbSettings(
            double_quant=variant.bnb.double_quant, compute_dtype=variant.bnb.compute_dtype),
        recipe=settings.Recipe(variant.recipe.value) if variant.recipe is not api.Recipe.PASSTHROUGH
        else settings.Recipe.UNIFORM,
        overrides=tuple(settings.TensorOverride(pattern=o.pattern, type=o.type)
                        for o in variant.overrides or []),
        target_size_gib=variant.target_size_gib,
        target_bits_per_weight=variant.target_bits_per_weight,
        output_tensor_type=variant.output_tensor_type,
        token_embedding_type=variant.token_embedding_type,
        leave_output_tensor=variant.leave_output_tensor, pure=variant.pure,
        allow_requantize=variant.allow_requantize, keep_split=variant.keep_split,
    )


def cpu_count(pod: api.PodSettings | None) -> int | None:
    """Whole CPUs a pod may use: its CPU limit, else its request (at least one); None when unset."""
    resources = pod.resources if pod else None
    for values in (resources.limits if resources else None, resources.requests if resources else None):
        cpu = (values or {}).get("cpu")
        if cpu is not None:
            return max(1, int(units.parse_quantity(cpu)))
    return None


def base_spec(qm: api.QuantizedModel, variant: api.Variant) -> settings.BuildSpec:
    """The quantizer's spec for one variant, before the operator adds its digest and ConfigMap.

    ``threads`` follows the build pod's CPUs: llama.cpp otherwise starts one thread per core of the
    node (224 on a large one for a 16-CPU request). ``maxShardBytes`` comes from
    ``spec.storage.shardSize``; the claim's name only makes full-disk reasons name it."""
    storage = qm.spec.storage
    shard = units.quantity_bytes(storage.shard_size) or settings.DEFAULT_SHARD_BYTES
    return settings.BuildSpec(
        source=_source(qm.spec), calibration=_calibration(qm.spec), variants=(variant_spec(variant),),
        evaluation=_evaluation(qm.spec), storage_root=STORAGE_MOUNT, threads=cpu_count(qm.spec.quantizer) or 0,
        max_shard_bytes=shard, storage_claim=manifests.storage_claim_name(qm),
    )


def plan_builds(qm: api.QuantizedModel, namespace: str) -> list[Build]:
    """One ``Build`` per declared variant, in spec order, with its digest and result ConfigMap."""
    builds = []
    for index, variant in enumerate(qm.spec.variants):
        spec = base_spec(qm, variant)
        digest = settings.variant_digest(spec, spec.variants[0])
        name = f"{qm.metadata.name}-{variant.name}-{digest[:8]}"
        pinned = spec.variants[0].model_copy(update={"digest": digest, "spec_index": index})
        spec = spec.model_copy(update={
            "variants": (pinned,),
            "result_config_map": settings.ResultConfigMap(name=name, namespace=namespace),
        })
        builds.append(Build(model=qm.metadata.name, variant=variant.name, digest=digest, spec=spec))
    return builds


def discarding_intermediates(build: Build, qm: api.QuantizedModel) -> Build:
    """``build``, set to delete the model's intermediates (download, 16-bit GGUF, importance matrix,
    reference logits) when it is done, unless the spec keeps them. The pass asks this of the model's last
    build only, as the others still need them. Not part of the digest: the file it makes is the same."""
    if qm.spec.storage.keep_intermediates:
        return build
    return dataclasses.replace(build, spec=build.spec.model_copy(update={"remove_intermediates": True}))


@dataclasses.dataclass(frozen=True)
class SizingStep:
    """The model's sizing Job: it lists the source and reads its config.json (no weights) before the
    first build, so that every build Job is sized, and a claim that is too small refused, before a
    byte is downloaded. One per source (and ``kquant retry`` token): editing variants re-sizes from
    the same listing without another Job."""

    model: str
    digest: str
    spec: settings.BuildSpec

    @property
    def name(self) -> str:
        """``<model>-size-<digest[:8]>``: the Job, its ConfigMap, account and Role."""
        return f"{self.model}-size-{self.digest[:8]}"


def plan_sizing(qm: api.QuantizedModel, namespace: str) -> SizingStep:
    """The sizing Job's spec: the model's source (the only thing it reads) and its result ConfigMap."""
    first = base_spec(qm, qm.spec.variants[0])
    identity = {"source": settings.source_identity(first.source)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    step = SizingStep(model=qm.metadata.name, digest=digest, spec=first)
    spec = first.model_copy(update={"result_config_map": settings.ResultConfigMap(name=step.name,
                                                                                   namespace=namespace)})
    return dataclasses.replace(step, spec=spec)


def size_builds(qm: api.QuantizedModel, files: Sequence[sizing.HubFile], config: Mapping[str, Any] | None,
                gpus: int | None = None) -> sizing.Sizing:
    """What the builds of every variant of ``qm`` need, from the files a build fetches (after
    ``allowPatterns``) and config.json: the rules of ``kquant.quantizer.sizing``, with the spec's
    calibration, evaluation, shard size and CPU count. ``gpus`` overrides ``spec.quantizer.gpus``."""
    built = [v for v in qm.spec.variants if v.recipe is not api.Recipe.PASSTHROUGH]
    specs = [base_spec(qm, v) for v in built]
    first = specs[0] if specs else base_spec(qm, qm.spec.variants[0])
    quantizer = qm.spec.quantizer or api.Quantizer()
    return sizing.size_build(
        files, config, [s.variants[0] for s in specs],
        calibration=first.calibration, evaluation=first.evaluation, convert_type=first.convert_type,
        shard_bytes=first.max_shard_bytes, cpus=cpu_count(quantizer),
        gpus=quantizer.gpus if gpus is None else gpus,
    )  # fmt: skip


def claim_shortfall(qm: api.QuantizedModel, found: sizing.Sizing) -> str | None:
    """Why the claim the operator makes cannot hold the builds, with the numbers; None when it can,
    or when the claim is the user's own (``claimName``: its size is not in the spec; the build's
    fetch step checks its free space before the download)."""
    pvc = qm.spec.storage.pvc
    if pvc.claim_name or pvc.size is None:
        return None
    have = units.parse_quantity(pvc.size)
    if have >= found.claim_bytes:
        return None
    gib = units.GiB
    parts = (f"download {found.source_bytes / gib:.1f} GiB, 16-bit GGUF {found.base_bytes / gib:.1f} GiB, "
             f"reference {found.reference_bytes / gib:.1f} GiB, variants "
             f"{sum(found.variant_bytes.values()) / gib:.1f} GiB, margin {found.margin_bytes / gib:.1f} GiB")
    return (f"spec.storage.pvc.size is {pvc.size}, but the builds need about {sizing.claim_quantity(found)} "
            f"({parts}), from the source's listing; set spec.storage.pvc.size to at least "
            f"{sizing.claim_quantity(found)} (nothing was downloaded)")
