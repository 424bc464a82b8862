"""One build: fetch -> convert -> calibrate -> reference -> (plan -> quantize -> evaluate -> publish)*.

The order is written out here, step by step, rather than derived from a graph: which steps exist
depends on what the fetch produced (safetensors need converting; a GGUF that is already
quantized is published and evaluated as it is), and a reader should see the whole run in one
function (``BuildRunner._run``). Every step goes through ``steps.run_step`` so a rerun after a crash
skips what is done.

Intermediates live in ``<work>/<source key>/`` (``workDir``, by default ``<storageRoot>/.work``),
published variants in ``<storageRoot>/<digest>/`` (see ``publish``). Every failure a user can
cause or fix (bad repo, bad revision, bad GGUF, unknown type, impossible budget, full disk) ends
as a ``BuildReport`` with status Failed and a reason; the CLI turns that into a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
from kquant.quantizer import (
    bnb,
    constants,
    convert,
    evaluate,
    fetch,
    fetch_modelscope,
    filelock,
    gguf_facts,
    hf_evaluate,
    imatrix,
    progress,
    publish,
    quantize,
    quantize_job,
    recipes,
    report,
    settings,
    shards,
    sizing,
    space,
    steps,
    units,
)

log = logging.getLogger(__name__)

SPACE_MARGIN = space.MARGIN
"""Free space asked for beyond the planned file size: GGUF alignment padding and metadata."""

GATE_FIELDS = {"max_kl_divergence", "max_perplexity_increase", "min_top1_agreement"}
"""Evaluation settings that decide pass or fail but do not change what is measured."""

METRICS_VERSION = 2
"""Bumped when ``report.Metrics`` gains a field, so cached evaluations are redone."""

_UNQUANTIZED_CODES = {
    constants.FILE_TYPES[t].code for t in (constants.FileType.F32, constants.FileType.F16, constants.FileType.BF16)
}
"""``general.file_type`` codes of a GGUF source that is quantized like a converted model."""


class BuildError(Exception):
    """A failure with a reason the user can act on (the report carries the message).

    ``permanent`` unless said otherwise: a missing local path, a corrupt source or a recipe the
    model cannot take are met again by a rerun. A llama.cpp tool that crashed is not (it may have
    met memory pressure on a busy node): those pass ``permanent=False``."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


DiskFullError = space.NoSpaceError
"""The claim cannot hold a write; the message says how much is needed (``space``)."""


class CannotPlanError(BuildError):
    """``prepare`` could not make what a plan needs; the message says why."""


PERMANENT_ERRORS: tuple[type[Exception], ...] = (settings.SpecError, recipes.RecipeError, space.NoSpaceError)
"""Failures a rerun of the same spec meets again, whatever their message: a refused spec or recipe,
and a claim too small (a full disk stays full; the free-space check refuses the rerun at once)."""


def is_permanent(exc: BaseException) -> bool:
    """True when rerunning the build cannot succeed until the user changes something: the quantizer
    then exits with ``report.ExitCode.PERMANENT`` and the Job does not retry. Everything not known
    to be permanent (network, hub 5xx, API errors, a crashed tool, a bug) keeps the Job's retries."""
    if isinstance(exc, PERMANENT_ERRORS):
        return True
    if isinstance(exc, OSError):
        return exc.errno in space.FULL_ERRNOS
    if isinstance(exc, (BuildError, fetch.FetchError, bnb.BnbError)):
        return exc.permanent
    return False


def source_key(spec: settings.BuildSpec) -> str:
    """Names the work folder: the same source (from the same origin: a mirror's copy of a repo is
    another source) and conversion settings share intermediates."""
    data = settings.source_identity(spec.source)
    blob = json.dumps({"source": data, "convert": spec.convert_type.value}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every path a build uses."""

    root: Path
    work: Path

    @classmethod
    def for_spec(cls, spec: settings.BuildSpec) -> Layout:
        work_root = spec.work_dir or spec.storage_root / ".work"
        return cls(spec.storage_root, work_root / source_key(spec))

    @property
    def stamps(self) -> steps.StampStore:
        return steps.StampStore(self.work / "stamps")

    @property
    def download(self) -> Path:
        return self.work / "source"

    def base_gguf(self, outtype: settings.ConvertType) -> Path:
        """The converted GGUF's name: the file itself, or the stem of its shards, in a folder of its
        own (``base-f16/model-f16-00001-of-00027.gguf``) that the convert step replaces as a whole."""
        return self.work / f"base-{outtype.value}" / f"model-{outtype.value}.gguf"

    @property
    def imatrix(self) -> Path:
        return self.work / "imatrix.gguf"

    @property
    def reference(self) -> Path:
        return self.work / "reference"

    @property
    def hf_reference(self) -> Path:
        """The 16-bit safetensors model's log-probabilities, scored by transformers (bnb variants)."""
        return self.work / "reference-hf"

    def metrics(self, variant: str, digest: str) -> Path:
        return self.work / f"metrics-{variant}-{digest}.json"


def _file_type_code(path: Path) -> int | None:
    """``general.file_type`` of a GGUF, or None when the header does not say."""
    return gguf_facts.read_facts(path).file_type


def check_space(folder: Path, needed: int, what: str, claim: str | None = None) -> None:
    """Refuse to start a write that cannot fit: a clear reason now beats ENOSPC half-way."""
    folder.mkdir(parents=True, exist_ok=True)
    space.check(folder, needed, what, claim)


@dataclasses.dataclass(frozen=True)
class HFPrepared:
    """What bnb variants are built from: the downloaded safetensors folder and its reference."""

    source: Path
    digest: str
    reference: Path


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the variants are built from."""

    base: Path
    """The GGUF llama.cpp reads (first shard of a split file)."""
    shards: tuple[Path, ...]
    base_digest: str
    imatrix: Path | None
    quantizable: bool
    """True for a 16-bit (or f32) base; an already quantized GGUF is published as it is."""
    converted: bool = False
    """The base was converted here (and split at ``maxShardBytes``): every variant keeps its split."""


def prepare(spec: settings.BuildSpec, sink: progress.Sink, env: dict[str, str] | None = None) -> Prepared:
    """Run the steps a plan needs (fetch, convert, calibrate; cached) and return what they made.

    Raises :class:`CannotPlanError`, carrying the reason, when a step fails or when the source is
    already quantized and there is nothing to plan.
    """
    runner = BuildRunner(spec, sink, env)
    handled: tuple[type[Exception], ...] = (*_expected_errors(), OSError)
    try:
        src = runner.prepare()
    except handled as exc:
        raise CannotPlanError(str(exc)) from exc
    if not src.quantizable:
        raise CannotPlanError(
            "the source GGUF is already quantized: it is published as it is, there is nothing to plan"
        )
    return src


class BuildRunner:
    """Runs one ``BuildSpec`` and always produces a ``BuildReport``."""

    def __init__(self, spec: settings.BuildSpec, sink: progress.Sink, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.sink = sink
        self.env = env
        self.layout = Layout.for_spec(spec)
        self.report = report.BuildReport(status=report.BuildStatus.FAILED, quantizer_version=settings.QUANTIZER_VERSION)
        self._current: str | None = None
        self._variant: tuple[str, int] | None = None
        self.permanent = False
        """Set by ``run`` when the build failed for a reason a rerun meets again (``is_permanent``)."""

    # ------------------------------------------------------------ plumbing

    def _listener(self, step: steps.Step, fraction: float) -> None:
        index = self._variant[1] if self._variant else 0
        line = progress.ProgressLine(
            step.kind.value, fraction, step.variant, index, len(self.spec.variants) if step.variant else 0
        )
        self.sink.progress(line)

    def _step(
        self,
        key: str,
        kind: steps.StepKind,
        inputs: dict[str, Any],
        outputs: tuple[Path, ...],
        run: Callable[[steps.Progress], None],
        *,
        variant: str | None = None,
    ) -> steps.Step:
        step = steps.Step(key, kind, inputs, outputs, run, variant)
        self._current = key
        outcome = steps.run_step(step, self.layout.stamps, self._listener)
        self.report.steps.append(
            report.StepTiming(
                step=key,
                kind=kind.value,
                variant=variant,
                skipped=outcome.skipped,
                seconds=round(outcome.seconds, 3),
            )
        )
        return step

    def run(self) -> report.BuildReport:
        try:
            self._run()
            self.report.status = report.BuildStatus.SUCCEEDED
        except _expected_errors() as exc:
            self.permanent = is_permanent(exc)
            self._fail(str(exc))
        except OSError as exc:
            self.permanent = is_permanent(exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                folder = Path(exc.filename).parent if exc.filename else self.layout.root
                what = f"step {self._current or 'start'}"
                self._fail(space.full_message(folder, None, what, self.spec.storage_claim))
            else:
                self._fail(f"{type(exc).__name__} while {self._current or 'starting'}: {exc}")
        except Exception as exc:  # a bug: keep the traceback in the log, still hand in a report
            log.exception("unexpected error")
            self._fail(f"internal error while {self._current or 'starting'}: {type(exc).__name__}: {exc}")
        self.sink.report(self.report)
        return self.report

    def _fail(self, reason: str) -> None:
        self.report.status = report.BuildStatus.FAILED
        self.report.reason = reason
        self.report.failed_step = self._current
        log.error("build failed in step %s: %s", self._current, reason)

    # ------------------------------------------------------------ the run

    def _run(self) -> None:
        # The operator runs one Job per variant; Jobs of one source share the work folder, so the
        # shared steps run under a lock: the first Job does them, the others then find them done.
        bnb_only = all(v.format.is_bnb for v in self.spec.variants)
        with filelock.exclusive(self.layout.work / ".lock"):
            # a bnb variant needs no GGUF: nothing is converted or calibrated for it
            src = None if bnb_only else self.prepare()
            ref_dir = self._reference(src.base, src.base_digest) if src and src.quantizable else None
            hf = self._prepare_hf() if any(v.format.is_bnb for v in self.spec.variants) else None
        for index, variant in enumerate(self.spec.variants, start=1):
            self._variant = (variant.name, index)
            if variant.format.is_bnb:
                assert hf is not None
                vr = self._bnb_variant(variant, hf)
            elif src is None:
                raise AssertionError("a GGUF variant without a prepared GGUF")
            elif src.quantizable:
                vr = self._quantized_variant(variant, src, ref_dir)
            else:
                vr = self._as_is_variant(variant, src.shards, src.base_digest)
            self.report.variants.append(vr)
        self._variant = None
        self._current = None
        if self.spec.remove_intermediates:
            self._remove_intermediates()

    def _remove_intermediates(self) -> None:
        """Free the work folder after the last build of a model that keeps no intermediates. Under
        the work lock, so a build of the same source that is preparing is not cut short; the lock
        file itself stays."""
        work = self.layout.work
        with filelock.exclusive(work / ".lock"):
            freed = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
            for child in work.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != ".lock":
                    child.unlink()
        log.info("removed the intermediates in %s (%.2f GiB): keepIntermediates is false", work, freed / units.GiB)

    def prepare(self) -> Prepared:
        """fetch, then convert and calibrate when the source is safetensors."""
        self.layout.work.mkdir(parents=True, exist_ok=True)
        source_dir, fetch_digest = self._fetch()
        fmt = fetch.detect_format(source_dir)
        self.report.source_format = fmt.value
        if fmt is fetch.SourceFormat.SAFETENSORS:
            base_files, base_digest = self._convert(source_dir, fetch_digest)
            # llama-imatrix opens a split GGUF by its first shard, as llama-server does
            imatrix_path = self._calibrate(base_files[0], base_digest)
            return Prepared(base_files[0], base_files, base_digest, imatrix_path, True, converted=True)
        model = self._check_gguf(fetch.single_gguf_model(source_dir))
        base_digest = steps.inputs_digest(
            {"fetch": fetch_digest, "files": [steps.file_identity(s) for s in model.shards]}
        )
        quantizable = _file_type_code(model.first) in _UNQUANTIZED_CODES
        log.info(
            "source is a GGUF file (%s): %s; %s",
            "16-bit" if quantizable else "already quantized",
            "quantizing it" if quantizable else "publishing and evaluating it as it is",
            imatrix.GGUF_ONLY_NOTE,
        )
        return Prepared(model.first, model.shards, base_digest, None, quantizable)

    def _prepare_hf(self) -> HFPrepared:
        """fetch, then score the 16-bit safetensors model with transformers (bnb variants only).

        A GGUF source or an architecture transformers cannot load without the repository's code
        is refused here, permanently, naming the first bnb variant's ``format``."""
        self.layout.work.mkdir(parents=True, exist_ok=True)
        index, first = next((i, v) for i, v in enumerate(self.spec.variants) if v.format.is_bnb)
        field = f"spec.variants[{spec_index(first, index)}].format"
        source_dir, fetch_digest = self._fetch()
        fmt = fetch.detect_format(source_dir)
        self.report.source_format = fmt.value
        if fmt is not fetch.SourceFormat.SAFETENSORS:
            raise BuildError(
                f"{field} is {first.format}: bitsandbytes quantizes a 16-bit safetensors "
                f"model, but the source is {fmt.value}; use format gguf"
            )
        try:
            bnb.check_architecture(source_dir, field)
        except bnb.BnbError as exc:
            raise BuildError(str(exc)) from None
        ev = self.spec.evaluation
        text = evaluate.dataset_text(ev.dataset, ev.path, "heldout.txt")
        scoring = evaluate.LlamaEvalSettings.from_spec(ev, self.spec.threads)
        out = self.layout.hf_reference
        inputs = {"source": fetch_digest, "text": text_sha(text), "contextSize": ev.context_size,
                  "chunks": ev.chunks, "tool": "transformers"}  # fmt: skip
        step = self._step(
            "reference-hf",
            steps.StepKind.REFERENCE,
            inputs,
            evaluate.reference_outputs(out),
            lambda p: hf_evaluate.build_reference(source_dir, text, out, scoring, p),
        )
        return HFPrepared(source_dir, step.digest, out)

    def _bnb_variant(self, variant: settings.VariantSpec, hf: HFPrepared) -> report.VariantReport:
        """Quantize with transformers + bitsandbytes into the staging folder, evaluate, publish."""
        digest = settings.variant_digest(self.spec, variant)
        published = self._already_published(variant, digest, hf.digest, hf.reference)
        if published is not None:
            return published
        stage = publish.staging_dir(self.layout.root, digest)
        staged = stage / variant.name
        planned = bnb.planned_bytes(sum(f.stat().st_size for f in hf.source.glob("*.safetensors")))
        check_space(stage, planned, f"variant {variant.name}", self.spec.storage_claim)

        def run_quantize(p: steps.Progress) -> None:
            try:
                bnb.quantize(hf.source, staged, variant, p)
            except bnb.BnbError as exc:
                raise BuildError(f"variants[{self._variant_index()}] ({variant.name}): {exc}",
                                 permanent=exc.permanent) from None

        q_inputs = {"source": hf.digest, "bnb": bnb.config_kwargs(variant), "tool": bnb.tool_versions()}
        try:
            self._step(f"quantize-{variant.name}", steps.StepKind.QUANTIZE, q_inputs, (staged,), run_quantize,
                       variant=variant.name)
            base_report = report.VariantReport(
                name=variant.name, digest=digest, type=variant.format.value, recipe=variant.recipe.value,
                format=variant.format.value, planned_bytes=planned,
            )  # fmt: skip
            return self._evaluate_and_publish(
                variant, digest, [staged], base_digest=hf.digest, base_report=base_report, ref_dir=hf.reference
            )
        except BaseException:
            publish.discard_staging(self.layout.root, digest)
            raise

    def _fetch(self) -> tuple[Path, str]:
        src = self.spec.source
        if src.local is not None:
            path = src.local.path
            if not path.exists():
                raise BuildError(f"source.local.path {path} does not exist")
            return path, steps.inputs_digest({"local": str(path)})
        hub = src.huggingface or src.modelscope
        assert hub is not None
        field = fetch.field_of(hub)
        dest = self.layout.download
        inputs: dict[str, Any] = {"repo": hub.repo, "revision": hub.revision, "allowPatterns": hub.allow_patterns}
        if field != "huggingface":
            inputs["hub"] = field  # the stamps of Hugging Face builds stay as they were
        # Where the files came from, and which kinds were let in: a download from a mirror, or
        # one without pickles, is not the same input (only set when not the default, so the
        # stamps of earlier builds stay valid).
        inputs.update({k: v for k, v in settings.source_identity(src)[field].items() if k not in inputs})
        step = self._step(
            "fetch", steps.StepKind.FETCH, inputs, (dest / fetch.MANIFEST,),
            lambda p: _discard(self._download(dest, p)),
        )  # fmt: skip
        done = fetch.read_manifest(dest)
        assert done is not None
        self.report.source_revision = done.revision
        return dest, steps.inputs_digest({"fetch": step.digest, "revision": done.revision})

    def _download(self, dest: Path, done: steps.Progress) -> fetch.FetchResult:
        """The fetch step's work, with the client of the source's hub."""
        src = self.spec.source
        if src.modelscope is not None:
            return fetch_modelscope.fetch_source(
                src.modelscope, dest, env=self.env, progress=done, before_download=self._check_listing
            )
        assert src.huggingface is not None
        return fetch.fetch(src.huggingface, dest, env=self.env, progress=done, before_download=self._check_listing)

    def _check_listing(self, files: list[fetch.RemoteFile], config: dict[str, Any] | None) -> None:
        """Before a byte of weights is fetched: does this build fit the claim? The hub's listing gives
        the download's size, ``config.json`` the rest (``sizing``); the need is what is not on disk yet."""
        dest = self.layout.download
        remaining = fetch.remaining_bytes(dest, files)
        what = f"the download of {len(files)} file(s) of {self.spec.source.repo or 'the source'}"
        if config is None:  # a GGUF source: the download is what is known
            check_space(dest, remaining, what, self.spec.storage_claim)
            return
        spec = self.spec
        plan = sizing.size_build(
            [sizing.HubFile(f.name, f.size or 0) for f in files], config, spec.variants,
            calibration=spec.calibration, evaluation=spec.evaluation, convert_type=spec.convert_type,
            shard_bytes=spec.max_shard_bytes, cpus=spec.threads or None,
        )  # fmt: skip
        self.report.sizing = report.SizingSummary.from_sizing(plan)
        base_dir = self.layout.base_gguf(spec.convert_type).parent
        work = remaining + (0 if base_dir.is_dir() else plan.base_bytes) + plan.reference_bytes + plan.imatrix_bytes
        root = self.layout.root
        published = {v.name for v in spec.variants if publish.is_published(root, settings.variant_digest(spec, v))}
        store = sum(n for name, n in plan.variant_bytes.items() if name not in published)
        parts = (
            f"download {space.gib(remaining)}, 16-bit GGUF {space.gib(plan.base_bytes)}, reference "
            f"{space.gib(plan.reference_bytes)}, variants {space.gib(store)}, margin {space.gib(plan.margin_bytes)}"
        )
        if space.same_volume(dest, self.layout.root):
            check_space(dest, work + store + plan.margin_bytes, f"this build ({parts})", spec.storage_claim)
        else:
            check_space(dest, work + plan.margin_bytes, f"this build's work folder ({parts})", spec.storage_claim)
            check_space(self.layout.root, store, f"this build's variants ({parts})", spec.storage_claim)

    def _convert(self, source_dir: Path, fetch_digest: str) -> tuple[tuple[Path, ...], str]:
        outtype = self.spec.convert_type
        out = self.layout.base_gguf(outtype)
        inputs = {
            "source": fetch_digest,
            "outtype": outtype.value,
            "converter": convert.LLAMA_CPP_PYTHON_VERSION,
            "maxShardBytes": self.spec.max_shard_bytes,
        }
        needed = 0

        def run(p: steps.Progress) -> None:
            nonlocal needed
            # The converter's output size, from the safetensors headers: known before it writes.
            needed = sizing.gguf_bytes_from_shapes(convert.safetensors_elements(source_dir), outtype)
            old = sum(f.stat().st_size for f in out.parent.glob("*.gguf")) if out.parent.is_dir() else 0
            check_space(out.parent.parent, max(needed - old, 0), f"the {outtype.value} GGUF (convert)",
                        self.spec.storage_claim)  # fmt: skip
            convert.convert(
                source_dir, out, outtype, split_max_bytes=self.spec.max_shard_bytes, needed_bytes=needed,
                claim=self.spec.storage_claim, progress=p,
            )  # fmt: skip

        step = self._step("convert", steps.StepKind.CONVERT, inputs, (out.parent,), run)
        written = sorted(out.parent.glob("*.gguf"))
        first = shards.first(written)
        return (first, *(f for f in written if f != first)), step.digest

    def _calibrate(self, base: Path, base_digest: str) -> Path | None:
        """llama-imatrix on the converted GGUF (memory-mapped: host memory does not grow with the
        model; see imatrix.run_llama_imatrix and docs/quantizer.md for why not torch)."""
        cal = self.spec.calibration
        if cal.chunks == 0:
            log.info("calibration.chunks is 0: no importance matrix")
            return None
        text = evaluate.dataset_text(cal.dataset, cal.path, "calibration.txt")
        out = self.layout.imatrix
        inputs = {
            "base": base_digest,
            "chunks": cal.chunks,
            "contextSize": cal.context_size,
            "text": text_sha(text),
            "tool": f"llama-imatrix {convert.LLAMA_CPP_PYTHON_VERSION}",
        }

        def run(p: steps.Progress) -> None:
            text_file = self.layout.work / "calibration.txt"
            text_file.write_text(text, encoding="utf-8")
            try:
                imatrix.run_llama_imatrix(
                    base,
                    text_file,
                    out,
                    chunks=cal.chunks,
                    context_size=cal.context_size,
                    threads=self.spec.threads,
                    gpu_layers=cal.gpu_layers,
                    progress=p,
                )
            except imatrix.ImatrixError as exc:
                raise BuildError(f"calibration failed: {exc}", permanent=False) from None

        self._step("calibrate", steps.StepKind.CALIBRATE, inputs, (out,), run)
        return out

    def _check_gguf(self, model: fetch.GGUFModel) -> fetch.GGUFModel:
        """Read the header now: a corrupt or truncated source fails here, not deep in llama.cpp."""
        try:
            facts = gguf_facts.read_facts(model.first)
        except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError, KeyError
            raise BuildError(
                f"source GGUF {model.first.name} is corrupt or truncated: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        cut = _truncation(model.shards)
        if cut is not None:
            raise BuildError(f"source GGUF {model.first.name} is corrupt or truncated: {cut}")
        log.info("source GGUF %s: %s, %d layers", model.first.name, facts.architecture, facts.block_count)
        return model

    def _reference(self, base: Path, base_digest: str) -> Path:
        ev = self.spec.evaluation
        text = evaluate.dataset_text(ev.dataset, ev.path, "heldout.txt")
        scoring = evaluate.LlamaEvalSettings.from_spec(ev, self.spec.threads)
        out = self.layout.reference
        model, model_digest = base, base_digest
        if ev.reference is settings.ReferenceType.Q8_0 and _file_type_code(base) != constants.FILE_TYPES[
            constants.FileType.Q8_0
        ].code:
            model, model_digest = self._q8_reference(base, base_digest)
        inputs = {
            "base": model_digest,
            "text": text_sha(text),
            "contextSize": ev.context_size,
            "chunks": ev.chunks,
        }
        self._step(
            "reference",
            steps.StepKind.REFERENCE,
            inputs,
            evaluate.reference_outputs(out),
            lambda p: evaluate.build_reference(model, text, out, scoring, p),
        )
        return out

    def _q8_reference(self, base: Path, base_digest: str) -> tuple[Path, str]:
        """``evaluation.reference: Q8_0``: the 16-bit GGUF quantized to Q8_0 once (no imatrix: Q8_0
        does not use one), the reference the variants are scored against."""
        out = self.layout.work / "reference-q8_0.gguf"
        job = quantize_job.QuantizeJob(file_type=constants.FileType.Q8_0, nthread=self.spec.threads)
        check_space(out.parent, gguf_facts.read_facts(base).total_bytes * 17 // 32, "the Q8_0 reference")
        step = self._step(
            "reference-model",
            steps.StepKind.REFERENCE,
            {"base": base_digest, "type": "Q8_0"},
            (out,),
            lambda p: quantize.quantize(base, out, job, None, progress=p),
        )
        return out, step.digest

    def _quantized_variant(
        self, variant: settings.VariantSpec, src: Prepared, ref_dir: Path | None
    ) -> report.VariantReport:
        base, base_digest, imatrix_path = src.base, src.base_digest, src.imatrix
        # llama.cpp writes one output shard per input shard: a converted (split) base gives split variants.
        keep_split = (variant.keep_split or src.converted) and shards.is_shard(base.name)
        digest = settings.variant_digest(self.spec, variant)
        published = self._already_published(variant, digest, base_digest, ref_dir)
        if published is not None:
            return published
        data = None
        if imatrix_path is not None:
            data = imatrix.read_gguf(imatrix_path)
        self._current = f"plan-{variant.name}"
        self._listener(steps.Step(self._current, steps.StepKind.PLAN, {}, (), lambda p: None, variant.name), 0.0)
        try:
            plan = quantize.plan(base, variant, data)
        except (recipes.RecipeError, ValueError) as exc:
            raise BuildError(f"variants[{self._variant_index()}] ({variant.name}): {exc}") from None
        log.info("plan for %s:\n%s", variant.name, plan.render())
        job = dataclasses.replace(plan.job, nthread=self.spec.threads, keep_split=keep_split)
        stage = publish.staging_dir(self.layout.root, digest)
        staged = stage / _staged_name(variant, base, keep_split)
        check_space(stage, plan.total_bytes, f"variant {variant.name}", self.spec.storage_claim)
        q_inputs = {
            "base": base_digest,
            "job": dataclasses.asdict(job),
            "imatrix": None if imatrix_path is None else steps.file_identity(imatrix_path),
        }

        def run_quantize(p: steps.Progress) -> None:
            try:
                quantize.quantize(base, staged, job, data, progress=p)
            except quantize.QuantizeError as exc:
                raise BuildError(
                    f"variants[{self._variant_index()}] ({variant.name}): {exc}", permanent=False
                ) from None

        try:
            self._step(
                f"quantize-{variant.name}",
                steps.StepKind.QUANTIZE,
                q_inputs,
                (staged,),
                run_quantize,
                variant=variant.name,
            )
            staged_files = _shards_of(staged)
            base_report = report.VariantReport(
                name=variant.name,
                digest=digest,
                type=variant.gguf_type.value,
                recipe=variant.recipe.value,
                planned_bytes=plan.total_bytes,
            )
            return self._evaluate_and_publish(
                variant, digest, staged_files, base_digest=base_digest, base_report=base_report, ref_dir=ref_dir
            )
        except BaseException:
            publish.discard_staging(self.layout.root, digest)
            raise

    def _as_is_variant(
        self, variant: settings.VariantSpec, shards: tuple[Path, ...], base_digest: str
    ) -> report.VariantReport:
        """A GGUF source that is already quantized: link it into place, evaluate it, publish it."""
        digest = settings.variant_digest(self.spec, variant)
        published = self._already_published(variant, digest, base_digest, None)
        if published is not None:
            return published
        stage = publish.staging_dir(self.layout.root, digest)
        check_space(stage, 0, f"variant {variant.name}")
        staged: list[Path] = []
        try:
            for shard in shards:
                target = stage / shard.name
                target.unlink(missing_ok=True)
                try:
                    os.link(shard, target)  # same volume: no copy
                except OSError:
                    check_space(stage, shard.stat().st_size, f"a copy of {shard.name}")
                    shutil.copyfile(shard, target)
                staged.append(target)
            ftype = _file_type_code(shards[0])
            names = {info.code: name.value for name, info in constants.FILE_TYPES.items()}
            base_report = report.VariantReport(
                name=variant.name,
                digest=digest,
                type=names.get(ftype or -1, variant.gguf_type.value),
                recipe="as-is",
            )
            return self._evaluate_and_publish(
                variant, digest, staged, base_digest=base_digest, base_report=base_report, ref_dir=None
            )
        except BaseException:
            publish.discard_staging(self.layout.root, digest)
            raise

    def _evaluate(
        self, variant: settings.VariantSpec, digest: str, model: Path, base_digest: str, ref_dir: Path | None
    ) -> tuple[report.Metrics, str]:
        """The evaluate step (stamped by what the file is, not where it is) and its metrics."""
        ev = self.spec.evaluation
        text = evaluate.dataset_text(ev.dataset, ev.path, "heldout.txt")
        scoring = evaluate.LlamaEvalSettings.from_spec(ev, self.spec.threads)
        metrics_path = self.layout.metrics(variant.name, digest)
        e_inputs = {
            # The variant digest names the file's content, the base digest the reference: the
            # same inputs whether the file is still staged or already published.
            "variant": digest,
            "base": base_digest,
            # the quantize step's stamp: a requantized file (new imatrix, same digest) is re-evaluated
            "quantize": self.layout.stamps.read(f"quantize-{variant.name}"),
            "reference": None if ref_dir is None else self.layout.stamps.read(ref_dir.name),
            "text": text_sha(text),
            # what changes the numbers; the thresholds only change the gate, judged after the step
            "evaluation": ev.model_dump(mode="json", by_alias=True, exclude=GATE_FIELDS),
            "metricsVersion": METRICS_VERSION,
        }

        def run_evaluate(p: steps.Progress) -> None:
            if variant.format.is_bnb:
                assert ref_dir is not None
                metrics = hf_evaluate.evaluate_folder(model, ref_dir, scoring, ev, p)
            else:
                metrics = evaluate.evaluate(model, ref_dir, text, scoring, ev, progress=p)
            metrics_path.write_text(metrics.model_dump_json(by_alias=True))

        e = self._step(
            f"evaluate-{variant.name}",
            steps.StepKind.EVALUATE,
            e_inputs,
            (metrics_path,),
            run_evaluate,
            variant=variant.name,
        )
        return report.Metrics.model_validate_json(metrics_path.read_text()), e.digest

    def _judged(self, base_report: report.VariantReport, metrics: report.Metrics) -> report.VariantReport:
        verdict = evaluate.gate(metrics, self.spec.evaluation)
        return base_report.model_copy(
            update={
                "metrics": metrics,
                "gate": verdict,
                "gate_passed": verdict.passed,
                "kl_divergence": metrics.kl_divergence,
                "perplexity": metrics.perplexity,
            }
        )

    def _evaluate_and_publish(
        self,
        variant: settings.VariantSpec,
        digest: str,
        staged: list[Path],
        *,
        base_digest: str,
        base_report: report.VariantReport,
        ref_dir: Path | None,
    ) -> report.VariantReport:
        metrics, e_digest = self._evaluate(variant, digest, staged[0], base_digest, ref_dir)
        done_report = self._judged(base_report, metrics)
        final = publish.variant_dir(self.layout.root, digest) / publish.REPORT_NAME
        result: list[report.VariantReport] = []
        self._step(
            f"publish-{variant.name}",
            steps.StepKind.PUBLISH,
            {"evaluate": e_digest},
            (final,),
            lambda p: result.append(
                publish.publish_folder(staged[0], self.layout.root, done_report, parameters=metrics.parameters)
                if variant.format.is_bnb
                else publish.publish(staged, self.layout.root, done_report, parameters=metrics.parameters)
            ),
            variant=variant.name,
        )
        return result[0] if result else report.VariantReport.model_validate_json(final.read_text())

    def _already_published(
        self, variant: settings.VariantSpec, digest: str, base_digest: str, ref_dir: Path | None
    ) -> report.VariantReport | None:
        """A variant whose report.json exists under its digest is built: nothing is rebuilt. Its
        evaluation is redone only when the evaluation settings changed (the step's stamp says), and
        the gate is always judged against the current thresholds, so editing a threshold re-gates
        a variant without rebuilding it."""
        if not publish.is_published(self.layout.root, digest):
            return None
        path = publish.variant_dir(self.layout.root, digest) / publish.REPORT_NAME
        existing = report.VariantReport.model_validate_json(path.read_text())
        log.info("variant %s is already published at %s", variant.name, path.parent)
        metrics, _ = self._evaluate(variant, digest, Path(existing.path), base_digest, ref_dir)
        updated = self._judged(existing, metrics)
        if updated != existing:
            publish.rewrite_report(self.layout.root, updated)
        self.report.steps.append(
            report.StepTiming(
                step=f"publish-{variant.name}",
                kind="publishing",
                variant=variant.name,
                skipped=True,
                seconds=0.0,
            )
        )
        return updated

    def _variant_index(self) -> int:
        """The current variant's place in the user's ``spec.variants`` (the operator's
        ``specIndex``), else in this build's list."""
        position = (self._variant[1] - 1) if self._variant else 0
        return spec_index(self.spec.variants[position], position)


def spec_index(variant: settings.VariantSpec, position: int) -> int:
    """Where ``variant`` is in the QuantizedModel's ``spec.variants``: the operator says
    (``specIndex``); a build spec written by hand is its own list (``position``)."""
    return variant.spec_index if variant.spec_index is not None else position


def _staged_name(variant: settings.VariantSpec, base: Path, keep_split: bool) -> str:
    """``<variant>.gguf``; when the split is kept and the source is split, the first shard's name."""
    shard = shards.parse(base.name)
    if keep_split and shard is not None:
        return shards.format_name(variant.name, 1, shard.count)
    return f"{variant.name}.gguf"


def _shards_of(first: Path) -> list[Path]:
    """The quantize step's output: one file, or with keepSplit every shard next to the first."""
    return shards.siblings(first)


def _truncation(shards: tuple[Path, ...]) -> str | None:
    """Describe the first shard whose tensor data runs past its end, if any."""
    for s in shards:
        try:
            reader = gguf.GGUFReader(s)
        except Exception as exc:  # a cut header: gguf-py fails while parsing it
            return f"{s.name} cannot be parsed ({type(exc).__name__}: {str(exc)[:120]})"
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        size = s.stat().st_size
        if size < end:
            return f"{s.name} has {size} bytes, but its tensors need {end}"
    return None


def _discard(_: object) -> None:
    """Steps return nothing; results are read back from their output files."""


def _expected_errors() -> tuple[type[Exception], ...]:
    return (
        BuildError,
        settings.SpecError,
        fetch.FetchError,
        convert.ConvertError,
        evaluate.EvaluateError,
        publish.PublishError,
        bnb.BnbError,
        quantize.QuantizeError,
        imatrix.ImatrixError,
        recipes.RecipeError,
        space.NoSpaceError,
    )
