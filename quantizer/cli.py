"""``kquant-quantize``: the command the quantizer Job runs.

    kquant-quantize run  --spec build.yaml [--report out.json]
    kquant-quantize plan --spec build.yaml --variant q4km [--gguf model-f16.gguf]
    kquant-quantize size --spec build.yaml [--report listing.json]

Exit status (``report.ExitCode``): 0 when the build succeeded (a variant that missed its quality
gate is a result, recorded in the report, not a failure), 1 when it failed for a reason a rerun
may not meet again (network, hub 5xx, a tool that crashed), 3 when it failed for a reason only the
user can remove (claim full, spec or source refused, repository not found: the build Job does not
retry these), 2 for a bad command line or spec. The reason is logged and in the report. Expected
failures never print a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kquant.quantizer import (
    fetch,
    fetch_modelscope,
    imatrix,
    pipeline,
    progress,
    quantize,
    redact,
    report,
    settings,
    sizing,
)

log = logging.getLogger("kquant.quantizer")

EXIT_OK = report.ExitCode.OK
EXIT_FAILED = report.ExitCode.FAILED
EXIT_USAGE = report.ExitCode.USAGE
EXIT_PERMANENT = report.ExitCode.PERMANENT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kquant-quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build, evaluate and publish every variant of the spec")
    run.add_argument("--spec", type=Path, help=f"JSON or YAML build spec (default: ${settings.SPEC_ENV})")
    run.add_argument("--report", type=Path, help="also write the build report JSON here")
    plan = sub.add_parser("plan", help="print one variant's per-tensor plan; quantize nothing")
    plan.add_argument("--spec", type=Path, help=f"JSON or YAML build spec (default: ${settings.SPEC_ENV})")
    plan.add_argument("--variant", required=True, help="the variant's name in the spec")
    plan.add_argument(
        "--gguf",
        type=Path,
        help="plan against this 16-bit GGUF instead of fetching and converting the spec's source",
    )
    size = sub.add_parser("size", help="list the source and read its config.json for the operator's sizing; "
                          "download no weights")
    size.add_argument("--spec", type=Path, help=f"JSON or YAML build spec (default: ${settings.SPEC_ENV})")
    size.add_argument("--report", type=Path, help="also write the listing JSON here")
    return parser


def _sink(spec: settings.BuildSpec) -> progress.Sink:
    sinks: list[progress.Sink] = [progress.LogSink()]
    cm = spec.result_config_map
    if cm is not None:
        try:
            sinks.append(progress.ConfigMapSink(progress.kubernetes_patcher(cm.name, cm.namespace)))
        except Exception as exc:  # no cluster config: build anyway, the log still has everything
            log.warning("cannot reach the Kubernetes API for ConfigMap %s/%s: %s", cm.namespace, cm.name, exc)
    return progress.FanOut(*sinks)


def cmd_run(spec: settings.BuildSpec, report_path: Path | None, env: dict[str, str]) -> int:
    runner = pipeline.BuildRunner(spec, _sink(spec), env)
    result = runner.run()
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(redact.redact(result.to_json()))
    for v in result.variants:
        log.info(
            "variant %s: %s, %d bytes, %.2f bpw, KL %s, gate %s",
            v.name,
            v.path,
            v.size_bytes,
            v.bits_per_weight,
            "n/a" if v.kl_divergence is None else f"{v.kl_divergence:.4f}",
            "passed" if v.gate_passed else f"failed ({'; '.join(v.gate.reasons if v.gate else [])})",
        )
    if result.status is report.BuildStatus.FAILED:
        print(
            redact.redact(f"kquant-quantize: build failed in {result.failed_step or 'setup'}: {result.reason}"),
            file=sys.stderr,
        )
        return EXIT_PERMANENT if runner.permanent else EXIT_FAILED
    return EXIT_OK


def _survey(source: settings.Source, scratch: Path, env: dict[str, str]) -> fetch.Survey:
    """The listing and ``config.json`` of the source's repository, with its hub's client."""
    if source.modelscope is not None:
        return fetch_modelscope.survey(source.modelscope, scratch, env=env)
    assert source.huggingface is not None
    return fetch.survey(source.huggingface, scratch, env=env)


def cmd_size(spec: settings.BuildSpec, report_path: Path | None, env: dict[str, str]) -> int:
    """The sizing Job: the files a build would fetch and the sizing numbers of config.json, into the
    result ConfigMap's ``listing``. Weights never move, and no file is written outside /tmp."""
    if spec.source.repo is None:
        print("kquant-quantize: size needs a source.huggingface or source.modelscope repository", file=sys.stderr)
        return EXIT_USAGE
    try:
        with tempfile.TemporaryDirectory(prefix="kquant-size-") as scratch:
            found = _survey(spec.source, Path(scratch), env)
    except fetch.FetchError as exc:
        listing = report.SourceListing(status=report.BuildStatus.FAILED, reason=str(exc),
                                       quantizer_version=settings.QUANTIZER_VERSION)  # fmt: skip
    else:
        listing = report.SourceListing(
            status=report.BuildStatus.SUCCEEDED, quantizer_version=settings.QUANTIZER_VERSION,
            revision=found.revision,
            files=[report.ListedFile(name=f.name, size_bytes=f.size or 0) for f in found.files],
            config=sizing.trim_config(found.config) if found.config is not None else None,
        )  # fmt: skip
    text = redact.redact(listing.to_json())
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(text)
    cm = spec.result_config_map
    if cm is not None:
        done = "done" if listing.status is report.BuildStatus.SUCCEEDED else f"failed: {listing.reason}"
        try:
            sink = progress.ConfigMapSink(progress.kubernetes_patcher(cm.name, cm.namespace))
        except Exception as exc:  # no cluster config: the log and --report still have it
            log.warning("cannot reach the Kubernetes API for ConfigMap %s/%s: %s", cm.namespace, cm.name, exc)
        else:
            sink.final({"progress": done, "listing": text})
    if listing.status is report.BuildStatus.FAILED:
        print(redact.redact(f"kquant-quantize: cannot size the build: {listing.reason}"), file=sys.stderr)
        return EXIT_FAILED
    log.info("sized %s at %s: %d file(s), %d bytes", spec.source.repo, listing.revision, len(listing.files),
             sum(f.size_bytes for f in listing.files))
    return EXIT_OK


def cmd_plan(spec: settings.BuildSpec, variant_name: str, gguf: Path | None, env: dict[str, str]) -> int:
    try:
        variant = spec.variant(variant_name)
    except KeyError as exc:
        print(f"kquant-quantize: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if gguf is None:
        try:
            prepared = pipeline.prepare(spec, _sink(spec), env)
        except pipeline.CannotPlanError as exc:
            print(redact.redact(f"kquant-quantize: cannot plan: {exc}"), file=sys.stderr)
            return EXIT_FAILED
        gguf, imatrix_path = prepared.base, prepared.imatrix
    else:
        imatrix_path = None
    data = None
    if imatrix_path is not None:
        data = imatrix.read_gguf(imatrix_path)
    try:
        plan = quantize.plan(gguf, variant, data)
    except Exception as exc:  # recipe errors are the user's to fix: show the reason, not a trace
        print(f"kquant-quantize: variant {variant.name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(plan.render())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Never let a library log request headers (the hub token) even at debug level; and mask
    # anything token-shaped in every line that is logged anyway (the log is also the pod's
    # termination message).
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    redact.install()
    # The token leaves the process environment before anything runs: only the fetch step gets
    # it, and no later step or subprocess (the converter) can read it.
    token = fetch.take_token(os.environ)
    modelscope_token = fetch_modelscope.take_token(os.environ)
    env = dict(os.environ)
    if token:
        env[fetch.TOKEN_ENV] = token
    if modelscope_token:
        env[fetch_modelscope.TOKEN_ENV] = modelscope_token
    try:
        spec = settings.load_spec(args.spec)
    except settings.SpecError as exc:
        print(redact.redact(f"kquant-quantize: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    if args.command == "run":
        return cmd_run(spec, args.report, env)
    if args.command == "size":
        return cmd_size(spec, args.report, env)
    return cmd_plan(spec, args.variant, args.gguf, env)


if __name__ == "__main__":
    sys.exit(main())
